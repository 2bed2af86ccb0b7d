"""LocalDispatcher: dispatch -> per-expert function -> combine equals the per-assignment sum,
forward and gradients, with dropped assignments; and it compiles to the same values."""

from __future__ import annotations

import torch

from moe.dispatch import LocalDispatcher


def _case(T=37, K=3, E=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    ids = torch.randint(0, E, (T, K), generator=g)
    ids[::4, 1] = E  # dropped assignments (the layer's marker): no row, weight zero
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    w = torch.where(ids == E, torch.zeros_like(w), w)
    scale_E = torch.arange(1, E + 1, dtype=torch.float64)
    return x, ids, w, scale_E, E


def _through_dispatcher(x, ids, w, scale_E, E):
    d = LocalDispatcher()
    x_ND, counts_E, ctx = d.dispatch(x, ids, E)
    # "Experts": row r of expert e is multiplied by (e + 1) and squared (rows past the counts: 0).
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts_E, output_size=int(counts_E.sum()))
    n = expert_of_row.numel()
    y_ND = torch.zeros_like(x_ND)
    y_ND[:n] = (x_ND[:n] * scale_E[expert_of_row, None]) ** 2
    return d.combine(y_ND, w, ctx), counts_E


def _reference(x, ids, w, scale_E, E):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < E:
                out[t] = out[t] + w[t, k] * (x[t] * scale_E[e]) ** 2
    return out


def test_dispatch_combine_matches_the_per_assignment_sum_with_grads():
    x, ids, w, scale_E, E = _case()
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, counts = _through_dispatcher(x1, ids, w1, scale_E, E)
    ref = _reference(x2, ids, w2, scale_E, E)
    assert int(counts.sum()) == int((ids < E).sum())
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    out.backward(go)
    ref.backward(go)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_dispatcher_gradients_pass_gradcheck():
    x, ids, w, scale_E, E = _case(T=6, K=2, E=3, D=3, seed=1)
    fn = lambda a, b: _through_dispatcher(a, ids, b, scale_E, E)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


def test_dispatch_combine_compiled_matches_eager():
    x, ids, w, _, E = _case(seed=2)
    x, w = x.float(), w.float()
    d = LocalDispatcher()

    def run(a, b):
        x_ND, _, ctx = d.dispatch(a, ids, E)
        return d.combine(torch.tanh(x_ND), b, ctx)

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = run(xa, wa)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(xb, wb)
    torch.testing.assert_close(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(wb.grad, wa.grad)


def test_rows_with_unsent_assignments_gather_both_ways():
    """The expert-parallel case: only S < N assignments have a row (dropped ones are not sent)."""
    from moe.rows import assignment_rows, gather_token_rows, inverse_assignments

    g = torch.Generator().manual_seed(3)
    T, K, D = 7, 3, 4
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    order_N = torch.randperm(T * K, generator=g)
    S = 15  # the last N - S assignments of order_N are "dropped"
    order_S, inv_N = order_N[:S], inverse_assignments(order_N)
    assert torch.equal(inv_N[order_N], torch.arange(T * K))

    def roundtrip(a):
        rows_SD = gather_token_rows(a, order_S, inv_N, K)
        return assignment_rows(torch.sin(rows_SD), inv_N, order_S)

    out_ND = roundtrip(x)
    sent = torch.zeros(T * K, dtype=torch.bool)
    sent[order_S] = True
    expected = torch.where(sent[:, None], torch.sin(x.repeat_interleave(K, 0)), torch.zeros(()))
    torch.testing.assert_close(out_ND, expected)
    assert torch.autograd.gradcheck(roundtrip, (x,))
    for S0 in (0, T * K):  # nothing sent; everything sent
        o_S, inv = order_N[:S0], inverse_assignments(order_N)
        assert torch.autograd.gradcheck(
            lambda a: assignment_rows(gather_token_rows(a, o_S, inv, K) * 2, inv, o_S), (x,))
