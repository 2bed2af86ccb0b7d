"""On a real GPU: the CUDA attention paths that `auto` picks (cuDNN SDPA for MLA's 192/128 heads,
FlashAttention's varlen kernel for sliding windows) agree with the fp32 eager reference, forward
and gradients. Skipped where there is no CUDA device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from model.attention.kernels import attend, resolve_backend  # noqa: E402

CASES = [
    # B, H, h, T, dqk, dv, window
    (2, 16, 16, 300, 192, 128, 0),   # MLA head dims, full causal
    (1, 4, 1, 700, 256, 256, 64),    # gemma3-like MQA, window
    (2, 8, 2, 257, 128, 128, 100),   # GQA, window, T not a multiple of the tile
    (1, 4, 4, 128, 64, 64, 1),       # window 1: each token sees itself only
]


@pytest.mark.parametrize("B,H,h,T,dqk,dv,W", CASES)
def test_cuda_auto_matches_eager(B, H, h, T, dqk, dv, W):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, d, generator=g) for n, d in ((H, dqk), (h, dqk), (h, dv)))
    scale = dqk ** -0.5
    ref = [t.cuda().requires_grad_() for t in (q, k, v)]
    out_ref = attend(*ref, window=W, scale=scale, backend="eager")
    bf = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    which = resolve_backend("auto", bf[0], bf[2], W)
    out = attend(*bf, window=W, scale=scale, backend="auto")
    go = torch.randn_like(out_ref)
    out_ref.backward(go)
    out.backward(go.bfloat16())
    assert which in ("sdpa", "varlen", "flex")
    torch.testing.assert_close(out.float(), out_ref, atol=3e-2, rtol=3e-2, msg=f"{which} forward")
    for a, b, name in zip(bf, ref, "qkv"):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=6e-2, rtol=6e-2, msg=f"{which} d{name}")
