"""model/fused.py: several projections of one input as one GEMM, same results and gradients as the
separate layers, and the fallback for layers with their own forward (torchao's Float8Linear)."""

import pytest
import torch
from torch import nn

from model.fused import fusable, fused_linear
from moe.experts import GroupedExperts, cat_last


def _layers(bias, outs=(48, 16, 16), d=32, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(d, n, bias=bias) for n in outs]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_the_layers_outputs_and_gradients(bias):
    mods, ref = _layers(bias), _layers(bias)
    x = torch.randn(3, 5, 32)
    ys = fused_linear(x, mods)
    ys_ref = [m(x) for m in ref]
    for y, y_ref in zip(ys, ys_ref):
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref)
    w = [torch.randn_like(y) for y in ys]
    sum((y * g).sum() for y, g in zip(ys, w)).backward()
    sum((y * g).sum() for y, g in zip(ys_ref, w)).backward()
    for m, r in zip(mods, ref):
        torch.testing.assert_close(m.weight.grad, r.weight.grad)
        assert m.weight.grad.is_contiguous()
        if bias:
            torch.testing.assert_close(m.bias.grad, r.bias.grad)


def test_fused_linear_under_bf16_autocast_returns_bf16_and_fp32_weight_grads():
    mods = _layers(False)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = fused_linear(x, mods)
        ref = [m(x) for m in mods]
    for y, r in zip(ys, ref):
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, r)
    sum(y.float().sum() for y in ys).backward()
    assert all(m.weight.grad.dtype == torch.float32 for m in mods)


class _OwnForward(nn.Linear):  # stands in for torchao's Float8Linear: a Linear with its own forward
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_layers_with_their_own_forward_or_mixed_biases_are_not_fused():
    a, b = nn.Linear(8, 8), _OwnForward(8, 8)
    assert not fusable([a, b])
    assert not fusable([nn.Linear(8, 8, bias=True), nn.Linear(8, 8, bias=False)])
    assert not fusable([nn.Linear(8, 8), nn.Linear(4, 8)])
    assert fusable([nn.Linear(8, 8), nn.Linear(8, 16)])
    fused_linear(torch.randn(2, 8), [a, b])
    assert _OwnForward.calls == 1  # its forward ran, so an fp8 layer still quantizes


def test_cat_last_gradients_come_back_contiguous_in_each_weights_dtype():
    torch.manual_seed(0)
    w1 = torch.randn(4, 8, 6, requires_grad=True)
    w3 = torch.randn(4, 8, 6, dtype=torch.bfloat16, requires_grad=True)
    out = cat_last(torch.bfloat16, w1, w3)
    assert out.shape == (4, 8, 12) and out.dtype == torch.bfloat16
    g = torch.randn(4, 8, 12, dtype=torch.bfloat16)
    out.backward(g)
    assert w1.grad.dtype == torch.float32 and w3.grad.dtype == torch.bfloat16
    assert w1.grad.is_contiguous() and w3.grad.is_contiguous()
    torch.testing.assert_close(w1.grad, g[..., :6].float())
    torch.testing.assert_close(w3.grad, g[..., 6:])


def test_grouped_experts_fused_gate_up_matches_the_per_expert_loop():
    """The grouped path (gate and up as one grouped GEMM) against the loop reference, values and
    weight gradients; rows past the counts give zeros."""
    torch.manual_seed(0)
    loop = GroupedExperts(4, 16, 32, impl="loop")
    grouped = GroupedExperts(4, 16, 32, impl="grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(12, 16)  # 2 rows past the sum: dropped assignments
    try:
        y = grouped(x, counts)
    except (RuntimeError, NotImplementedError) as e:  # grouped_mm on CPU needs torch >= 2.13
        pytest.skip(f"grouped_mm not available on this CPU build: {e}")
    y_ref = loop(x, counts)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert torch.all(y[10:] == 0)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for name in ("w1", "w2", "w3"):
        p, r = getattr(grouped, name), getattr(loop, name)
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5)
        assert p.grad.is_contiguous()
