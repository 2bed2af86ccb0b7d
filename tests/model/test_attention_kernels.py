"""The attention kernel seam (``attend``), RoPE / YaRN and RMSNorm, on CPU.

FlexAttention on CPU is forward-only: any input with requires_grad raises, so it gets detached
inputs here. Its compiled CUDA path is exercised by the GPU tests.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from model.attention import attend
from model.attention.kernels import flex_block_mask, resolve_backend, window_mask
from model.config import RopeConfig
from model.norms import RMSNorm
from model.rope import (
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
    yarn_attention_factor,
    yarn_softmax_mscale,
)


def _qkv(gen, B, H, h, T, Dk, Dv, requires_grad=False):
    q = torch.randn(B, H, T, Dk, generator=gen)
    k = torch.randn(B, h, T, Dk, generator=gen)
    v = torch.randn(B, h, T, Dv, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _naive(q, k, v, window, scale):
    """Loop-over-queries reference, written from the definition ``i - W < j <= i``."""
    B, H, T, _ = q.shape
    rep = H // k.shape[1]
    out = torch.empty(B, H, T, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        lo = 0 if window == 0 else max(0, i - window + 1)
        for hh in range(H):
            kk = k[:, hh // rep, lo:i + 1].double()
            vv = v[:, hh // rep, lo:i + 1].double()
            s = torch.einsum("bd,bjd->bj", q[:, hh, i].double(), kk) * scale
            out[:, hh, i] = torch.einsum("bj,bjd->bd", s.softmax(-1), vv)
    return out


def _flex(q, k, v, window, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()" on CPU
        return attend(q.detach(), k.detach(), v.detach(), window=window, scale=scale, backend="flex")


# (B, H, h, T, Dk, Dv, window)
SHAPES = [
    (1, 4, 4, 1, 16, 16, 0),       # one token
    (1, 4, 4, 1, 16, 16, 3),
    (2, 4, 2, 17, 16, 16, 0),
    (2, 4, 2, 17, 16, 16, 1),      # only the diagonal
    (1, 8, 1, 33, 8, 8, 4),        # MQA
    (3, 6, 3, 64, 16, 16, 64),     # window == T
    (1, 4, 2, 20, 16, 16, 100),    # window > T
    (2, 4, 4, 40, 24, 16, 0),      # MLA-like: v head dim != qk head dim
    (1, 4, 4, 130, 24, 16, 7),     # crosses flex's 128 block
    (1, 2, 1, 200, 8, 8, 129),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_backends_agree_forward(shape):
    B, H, h, T, Dk, Dv, W = shape
    gen = torch.Generator().manual_seed(T * 31 + W)
    q, k, v = _qkv(gen, B, H, h, T, Dk, Dv)
    scale = 1.0 / math.sqrt(Dk) * 1.3
    ref = _naive(q, k, v, W, scale)
    outs = {b: attend(q, k, v, window=W, scale=scale, backend=b) for b in ("eager", "sdpa", "auto")}
    outs["flex"] = _flex(q, k, v, W, scale)
    for name, out in outs.items():
        assert out.shape == (B, H, T, Dv) and out.dtype == q.dtype, name
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"backend {name}")


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] <= 64])
def test_sdpa_backward_matches_eager(shape):
    B, H, h, T, Dk, Dv, W = shape
    gen = torch.Generator().manual_seed(7 + T + W)
    grads = {}
    for backend in ("eager", "sdpa"):
        gen.manual_seed(7 + T + W)
        q, k, v = _qkv(gen, B, H, h, T, Dk, Dv, requires_grad=True)
        g = torch.randn(B, H, T, Dv, generator=gen)
        (attend(q, k, v, window=W, scale=0.25, backend=backend) * g).sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for name, a, b in zip("qkv", grads["sdpa"], grads["eager"]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


def test_window_mask_edges():
    m = window_mask(6, 3)
    # query i sees keys i-2, i-1, i (HF: kv_idx > q_idx - sliding_window and kv_idx <= q_idx)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert torch.equal(window_mask(5, 1), torch.eye(5, dtype=torch.bool))
    assert torch.equal(window_mask(5, 0), torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(window_mask(5, 5), window_mask(5, 0))
    assert not torch.equal(window_mask(6, 5), window_mask(6, 0))


def test_window_matches_hf_mask_functions():
    tr = pytest.importorskip("transformers.masking_utils")
    T = 9
    for W in (1, 2, 4, 9, 12):
        mod = tr.and_masks(tr.causal_mask_function, tr.sliding_window_overlay(W))
        zero = torch.tensor(0)
        hf = mod(zero, zero, torch.arange(T)[:, None], torch.arange(T)[None, :])
        assert torch.equal(window_mask(T, W), hf), W


def test_window_edge_effect_on_output():
    """Key i-W is just outside the window: changing it must not change query i's output."""
    gen = torch.Generator().manual_seed(0)
    T, W = 12, 4
    q, k, v = _qkv(gen, 1, 2, 2, T, 8, 8)
    base = attend(q, k, v, window=W, scale=0.5, backend="sdpa")
    i = 9
    k2, v2 = k.clone(), v.clone()
    k2[:, :, i - W] += 5.0
    v2[:, :, i - W] += 5.0
    moved = attend(q, k2, v2, window=W, scale=0.5, backend="sdpa")
    assert torch.equal(moved[:, :, i], base[:, :, i])
    # ... while key i-W+1 is inside it.
    k3 = k.clone()
    k3[:, :, i - W + 1] += 5.0
    assert not torch.allclose(attend(q, k3, v, window=W, scale=0.5, backend="sdpa")[:, :, i], base[:, :, i])


def test_auto_backend_choice():
    q = torch.zeros(1, 2, 4, 8)
    v = torch.zeros(1, 2, 4, 8)
    assert resolve_backend("auto", q, v, 0) == "sdpa"
    assert resolve_backend("auto", q, v, 3) == "sdpa"
    assert resolve_backend("flex", q, v, 0) == "flex"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("triton", q, v, 0)


def test_attend_rejects_bad_shapes():
    q = torch.zeros(1, 6, 4, 8)
    with pytest.raises(ValueError, match="divide"):
        attend(q, torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8), window=0, scale=1.0)
    with pytest.raises(ValueError, match="window"):
        attend(q, torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), window=-1, scale=1.0)


def test_cudnn_backend_off_cuda_says_why():
    """backend=cudnn needs a CUDA tensor (and cudnn-frontend); elsewhere a clear error, no fallback."""
    q = torch.zeros(1, 2, 4, 8)
    assert resolve_backend("cudnn", q, q, 2) == "cudnn"
    with pytest.raises(ValueError, match="backend 'cudnn': it needs a CUDA tensor"):
        attend(q, q, q, window=2, scale=1.0, backend="cudnn")


def test_flex_block_mask_cached():
    a = flex_block_mask(48, 5, torch.device("cpu"))
    assert flex_block_mask(48, 5, torch.device("cpu")) is a
    assert flex_block_mask(48, 6, torch.device("cpu")) is not a


# --------------------------------------------------------------------------------------------- RoPE

def test_rope_default_values():
    cfg = RopeConfig(theta=100.0)
    cos, sin = rope_cos_sin(8, 5, cfg, device="cpu")
    assert cos.shape == sin.shape == (5, 8)
    inv = 1.0 / 100.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = torch.arange(5, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat((ang, ang), -1)
    torch.testing.assert_close(cos.double(), ang.cos(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin.double(), ang.sin(), rtol=1e-6, atol=1e-6)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    c16, _ = rope_cos_sin(8, 5, cfg, device="cpu", dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16


def test_apply_rope_is_a_rotation_and_relative():
    gen = torch.Generator().manual_seed(1)
    cfg = RopeConfig()
    D, T = 16, 10
    cos, sin = rope_cos_sin(D, T, cfg)
    x = torch.randn(2, 3, T, D, generator=gen)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # norm preserved (attention factor 1)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])            # position 0 untouched
    # <R_m q, R_n k> depends only on m - n.
    q = torch.randn(D, generator=gen).expand(T, D)
    k = torch.randn(D, generator=gen).expand(T, D)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    dots = rq @ rk.T
    for d in range(1, 4):
        diag = torch.diagonal(dots, offset=-d)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-5, atol=1e-5)
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def _hf_yarn(dim, theta, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=dim,
                           max_position_embeddings=int(factor * orig),
                           rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                                            "original_max_position_embeddings": orig,
                                            "beta_fast": beta_fast, "beta_slow": beta_slow,
                                            "mscale": mscale, "mscale_all_dim": mscale_all_dim})
    return _compute_yarn_parameters(cfg)


YARN_CASES = [
    # dim, theta, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 1.0),     # DeepSeek-V3
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, 0.707, 0.707),
    (32, 500000.0, 8.0, 8192, 16.0, 2.0, 1.0, 0.5),
    (16, 10000.0, 4.0, 64, 32.0, 1.0, 1.0, 0.0),
    (128, 1000000.0, 2.0, 32768, 32.0, 1.0, 0.0, 1.0),
]


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_matches_hf(case):
    pytest.importorskip("transformers")
    dim, theta, factor, orig, bf, bs, ms, msa = case
    rope = RopeConfig(theta=theta, yarn_factor=factor, yarn_original_max_position=orig, yarn_beta_fast=bf,
                      yarn_beta_slow=bs, yarn_mscale=ms, yarn_mscale_all_dim=msa)
    hf_inv, hf_factor = _hf_yarn(dim, theta, factor, orig, bf, bs, ms, msa)
    torch.testing.assert_close(rope_inv_freq(dim, rope), hf_inv, rtol=1e-6, atol=0)
    assert yarn_attention_factor(rope) == pytest.approx(hf_factor, rel=1e-12)
    cos, sin = rope_cos_sin(dim, 7, rope)
    ang = torch.arange(7, dtype=torch.float32)[:, None] * hf_inv[None]
    ang = torch.cat((ang, ang), -1)
    torch.testing.assert_close(cos, ang.cos() * hf_factor)
    torch.testing.assert_close(sin, ang.sin() * hf_factor)
    # Softmax scale multiplier, as HF's DeepseekV3Attention (yarn_apply_mscale).
    m = 0.1 * msa * math.log(factor) + 1.0
    assert yarn_softmax_mscale(rope) == pytest.approx(m * m if msa else 1.0)


def test_yarn_off_is_plain_rope():
    rope = RopeConfig(theta=10000.0, yarn_factor=1.0, yarn_mscale_all_dim=1.0)
    assert yarn_softmax_mscale(rope) == 1.0 and yarn_attention_factor(rope) == 1.0
    inv = rope_inv_freq(32, rope)
    torch.testing.assert_close(inv, 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    yarn = rope_inv_freq(32, RopeConfig(yarn_factor=4.0, yarn_original_max_position=256))
    # Fast dims keep their frequency, the slowest are divided by the factor.
    assert yarn[0] == inv[0]
    torch.testing.assert_close(yarn[-1], inv[-1] / 4.0)


# --------------------------------------------------------------------------------------------- norm

def test_rmsnorm():
    n = RMSNorm(8, eps=1e-6)
    assert torch.equal(n.weight, torch.ones(8))
    with torch.no_grad():
        n.weight.mul_(2.0)
    n.reset_parameters()
    assert torch.equal(n.weight, torch.ones(8))
    x = torch.randn(3, 8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(n(x), ref)
    xb = x.bfloat16()
    yb = n(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, ref.bfloat16())
