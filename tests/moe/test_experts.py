"""GroupedExperts: grouped GEMM path == per-expert loop == per-token reference, fwd and bwd."""

import pytest
import torch
import torch.nn.functional as F

from compat.torch_compat import has_grouped_mm
from moe.dispatch import LocalDispatcher
from moe.experts import GroupedExperts

needs_gmm = pytest.mark.skipif(not has_grouped_mm("cpu"), reason="no CPU grouped_mm in this torch")


def _experts(E, D, Fd, impl, seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(E, D, Fd, impl=impl)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.3)
    return ex


def _run(ex, x, counts, gy):
    x = x.clone().requires_grad_()
    ex.zero_grad()
    y = ex(x, torch.tensor(counts))
    (y * gy).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in (ex.w1, ex.w3, ex.w2)]


COUNTS = [
    [3, 0, 5, 2],        # a zero-token expert
    [0, 0, 10, 0],       # all tokens on one expert
    [1, 0, 0, 0],        # a single row
    [0, 0, 0, 0],        # nothing routed
    [2, 3, 1, 0],        # rows past the sum (dropped assignments) must give zeros
]


@needs_gmm
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_loop(counts, dtype):
    E, D, Fd = 4, 16, 24
    N = max(sum(counts), 1) + (3 if counts == [2, 3, 1, 0] else 0)
    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(N, D, generator=g).to(dtype)
    gy = torch.randn(N, D, generator=g).to(dtype)
    ref = _experts(E, D, Fd, "loop").to(dtype)
    gmm = _experts(E, D, Fd, "grouped_mm").to(dtype)
    y0, dx0, dw0 = _run(ref, x, counts, gy)
    y1, dx1, dw1 = _run(gmm, x, counts, gy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(dx1, dx0, **tol)
    for a, b in zip(dw1, dw0):
        torch.testing.assert_close(a, b, **tol)
    n = sum(counts)
    assert (y1[n:] == 0).all() and (dx1[n:] == 0).all()
    assert torch.isfinite(dx1).all()


def test_loop_equals_per_token_reference():
    E, D, Fd = 3, 8, 5
    ex = _experts(E, D, Fd, "loop")
    counts = [2, 0, 3]
    x = torch.randn(5, D)
    y = ex(x, torch.tensor(counts))
    expert_of_row = [0, 0, 2, 2, 2]
    for i, e in enumerate(expert_of_row):
        h = F.silu(x[i] @ ex.w1[e]) * (x[i] @ ex.w3[e])
        torch.testing.assert_close(y[i], h @ ex.w2[e], rtol=1e-5, atol=1e-6)


@needs_gmm
def test_y_sum_backward_works_on_grouped_path():
    # The raw kernel fails on an expanded zero-stride gradient; the shim materialises it.
    ex = _experts(4, 16, 8, "grouped_mm")
    x = torch.randn(6, 16, requires_grad=True)
    ex(x, torch.tensor([1, 2, 0, 3])).sum().backward()
    assert torch.isfinite(x.grad).all() and ex.w2.grad.abs().sum() > 0


def test_auto_falls_back_to_loop_on_unaligned_dims():
    ex = _experts(4, 16, 6, "auto")  # 6 fp32 = 24 bytes: not 16-byte aligned
    x = torch.randn(5, 16)
    assert ex.resolve_impl(x) == "loop"
    assert ex(x, torch.tensor([2, 0, 3, 0])).shape == (5, 16)
    assert ex.resolve_impl(x.double()) == "loop"
    if has_grouped_mm("cpu"):
        assert _experts(4, 16, 8, "auto").resolve_impl(x) == "grouped_mm"


def test_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        GroupedExperts(2, 4, 4, impl="cuda")


@needs_gmm
def test_grouped_with_local_dispatcher_batch_of_one():
    E, D, Fd, K = 4, 16, 8, 2
    d = LocalDispatcher()
    x = torch.randn(1, D)
    ids = torch.tensor([[3, 1]])
    x_ND, tpe, ctx = d.dispatch(x, ids, E)
    assert tpe.tolist() == [0, 1, 0, 1]
    outs = []
    for impl in ("loop", "grouped_mm"):
        ex = _experts(E, D, Fd, impl)
        xr = x.clone().requires_grad_()
        x_ND, tpe, ctx = d.dispatch(xr, ids, E)
        y = d.combine(ex(x_ND, tpe), torch.tensor([[0.7, 0.3]]), ctx)
        y.sum().backward()
        outs.append((y.detach(), xr.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_local_dispatcher_sorts_stably_and_marks_dropped():
    d = LocalDispatcher()
    x = torch.arange(4.0).unsqueeze(-1).repeat(1, 2)  # token t has value t
    ids = torch.tensor([[1, 0], [1, 3], [0, 1], [3, 4]])  # 4 == n_experts: dropped
    x_ND, tpe, ctx = d.dispatch(x, ids, 4)
    assert tpe.tolist() == [2, 3, 0, 2]
    # expert 0: tokens 0,2; expert 1: tokens 0,1,2; expert 3: tokens 1,3; then the dropped one.
    assert x_ND[:, 0].tolist() == [0, 2, 0, 1, 2, 1, 3, 3]
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    y = d.combine(x_ND * 0 + 1, w, ctx)  # every expert returns ones
    assert y[:, 0].tolist() == [3.0, 7.0, 11.0, 15.0]  # dropped weight 8 would be masked by layer


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """The residual stream is fp32 under autocast; the experts must still compute in bf16 (and
    take the grouped path), since autocast does not cover grouped_mm."""
    import torch

    from moe.experts import GroupedExperts

    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 8)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(12, 16, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ex.resolve_impl(x) == "grouped_mm"
        y = ex(x, counts)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ref = ex(x.detach(), counts)
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
