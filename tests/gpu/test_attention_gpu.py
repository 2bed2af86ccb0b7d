"""On a real GPU: the CUDA attention paths (cuDNN SDPA for MLA's 192/128 heads; for sliding
windows cuDNN's band kernel through cudnn-frontend, FlashAttention's varlen kernel and flex) agree
with the fp32 eager reference, forward and gradients. Skipped where there is no CUDA device; the
``cudnn`` cases are skipped where nvidia-cudnn-frontend is not installed."""

from __future__ import annotations

import pytest
import torch
pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from model.attention import cudnn_band  # noqa: E402
from model.attention.kernels import attend, resolve_backend  # noqa: E402

CASES = [
    # B, H, h, T, dqk, dv, window
    (2, 16, 16, 300, 192, 128, 0),   # MLA head dims, full causal
    (1, 4, 1, 700, 256, 256, 64),    # gemma3-like MQA, window
    (2, 8, 2, 257, 128, 128, 100),   # GQA, window, T not a multiple of the tile
    (1, 4, 4, 128, 64, 64, 1),       # window 1: each token sees itself only
    (1, 4, 2, 200, 128, 128, 500),   # window wider than the sequence: full causal
]


def _cudnn_missing() -> str:
    return cudnn_band.unavailable_reason(torch.zeros(1, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flex"])
@pytest.mark.parametrize("B,H,h,T,dqk,dv,W", CASES)
def test_cuda_backend_matches_eager(B, H, h, T, dqk, dv, W, backend):
    if backend == "cudnn" and _cudnn_missing():
        pytest.skip(_cudnn_missing())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, d, generator=g) for n, d in ((H, dqk), (h, dqk), (h, dv)))
    scale = dqk ** -0.5
    ref = [t.cuda().requires_grad_() for t in (q, k, v)]
    out_ref = attend(*ref, window=W, scale=scale, backend="eager")
    bf = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    which = resolve_backend(backend, bf[0], bf[2], W)
    out = attend(*bf, window=W, scale=scale, backend=backend)
    go = torch.randn_like(out_ref)
    out_ref.backward(go)
    out.backward(go.bfloat16())
    assert which in ("sdpa", "varlen", "flex", "cudnn")
    torch.testing.assert_close(out.float(), out_ref, atol=3e-2, rtol=3e-2, msg=f"{which} forward")
    for a, b, name in zip(bf, ref, "qkv"):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=6e-2, rtol=6e-2, msg=f"{which} d{name}")


def test_auto_takes_flex_for_windows_and_sdpa_for_full_causal():
    q = torch.zeros(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q, q, 16) == "flex"
    assert resolve_backend("auto", q, q, 0) == "sdpa"


def test_cudnn_band_under_torch_compile_matches_eager():
    if _cudnn_missing():
        pytest.skip(_cudnn_missing())
    cudnn_band.preload()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 256, 64, generator=g) for n in (4, 2, 2))
    ref = [t.cuda().requires_grad_() for t in (q, k, v)]
    bf = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    fn = torch.compile(lambda a, b, c: attend(a, b, c, window=32, scale=0.125, backend="cudnn"), fullgraph=True)
    out = fn(*bf)
    out_ref = attend(*ref, window=32, scale=0.125, backend="eager")
    out.float().sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(out.float(), out_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(bf[0].grad.float(), ref[0].grad, atol=6e-2, rtol=6e-2)
