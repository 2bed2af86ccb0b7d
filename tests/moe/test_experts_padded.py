"""The static-shape ``padded`` experts path (XLA/Trainium) computes what the per-expert loop does:
values and gradients, dropless and capacity-limited, with rows past the routed total."""

import pytest
import torch

from moe.config import MoEConfig
from moe.experts import GroupedExperts
from moe.layer import MoELayer


def _pair(E=4, D=8, F=16, cf=0.0):
    torch.manual_seed(0)
    a = GroupedExperts(E, D, F, impl="loop", capacity_factor=cf)
    b = GroupedExperts(E, D, F, impl="padded", capacity_factor=cf)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("counts,extra", [([3, 0, 5, 2], 0), ([0, 0, 7, 1], 3), ([1, 1, 1, 1], 6)])
def test_padded_equals_loop_dropless(counts, extra):
    a, b = _pair()
    n = sum(counts) + extra  # rows past the total: dropped assignments, must give zeros
    x = torch.randn(n, 8)
    tpe = torch.tensor(counts)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, tpe), b(xb, tpe)
    torch.testing.assert_close(yb, ya)
    assert torch.all(yb[sum(counts):] == 0)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    for n_, p in a.named_parameters():
        torch.testing.assert_close(dict(b.named_parameters())[n_].grad, p.grad, msg=n_)


def test_slots_follow_the_layer_capacity():
    _, b = _pair(cf=1.25)
    assert b.slots_per_expert(32) == 10  # ceil(1.25 * 32 / 4), the layer's capacity(T*K rows)
    _, d = _pair(cf=0.0)
    assert d.slots_per_expert(32) == 32


@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_layer_with_padded_experts_equals_loop(cf):
    """Through the whole MoE layer (router, capacity drops, dispatch, combine): padded == loop."""
    cfg = MoEConfig(n_experts=8, top_k=2, expert_dim=16, n_shared_experts=1, capacity_factor=cf)
    torch.manual_seed(0)
    loop = MoELayer(32, cfg)
    loop.experts.impl = "loop"
    padded = MoELayer(32, cfg)
    padded.load_state_dict(loop.state_dict())
    padded.experts.impl = "padded"
    x = torch.randn(2, 24, 32)
    (ya, aux_a), (yb, aux_b) = loop(x), padded(x)
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(aux_b, aux_a)
