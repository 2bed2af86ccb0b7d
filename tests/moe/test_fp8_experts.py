"""moe/fp8_experts.py: the 16-row-aligned layout the fp8 grouped GEMM needs, and the padded
SwiGLU against the plain grouped path (a plain grouped GEMM in place of torchao's fp8 one, which
has no CPU kernel): same values, same gradients, dropped rows zero."""

from __future__ import annotations

import torch

from compat.torch_compat import grouped_mm
from moe.experts import GroupedExperts
from moe.fp8_experts import col_major, fp8_swiglu, padded_layout


def test_padded_layout_puts_each_group_on_a_16_row_boundary():
    counts = torch.tensor([3, 0, 17, 5])
    dest, src, ends, M = padded_layout(counts, 28)  # 25 real rows, 3 dropped
    assert ends.tolist() == [16, 16, 48, 64] and ends.dtype == torch.int32
    assert dest[:3].tolist() == [0, 1, 2]
    assert dest[3:20].tolist() == list(range(16, 33))
    assert dest[20:25].tolist() == list(range(48, 53))
    assert M == 28 + 4 * 16 and dest[25:].tolist() == [M] * 3  # dropped rows have no place
    # The inverse: each placed row's source, 28 (none) for every padding row.
    assert src.shape == (M,)
    placed = dest[:25]
    assert src[placed].tolist() == list(range(25))
    mask = torch.ones(M, dtype=torch.bool)
    mask[placed] = False
    assert (src[mask] == 28).all()


def test_padded_swiglu_equals_the_grouped_path_values_and_grads():
    g = torch.Generator().manual_seed(0)
    E, D, F, N = 4, 32, 48, 40
    experts = GroupedExperts(E, D, F, impl="grouped_mm")
    counts = torch.tensor([7, 0, 20, 9])  # 36 real rows, 4 dropped
    x = torch.randn(N, D, generator=g, requires_grad=True)
    up = torch.randn(N, D, generator=g)  # the same upstream gradient for both paths
    ref = experts(x, counts)
    (ref * up).sum().backward()
    grads_ref = [t.grad.clone() for t in (x, experts.w1, experts.w3, experts.w2)]
    for t in (x, experts.w1, experts.w3, experts.w2):
        t.grad = None
    out = fp8_swiglu(x, experts.w1, experts.w3, experts.w2, counts, grouped_mm)
    torch.testing.assert_close(out, ref)
    assert out[36:].abs().sum() == 0
    (out * up).sum().backward()
    for got, want in zip((x.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad), grads_ref):
        torch.testing.assert_close(got, want)
    assert x.grad[36:].abs().sum() == 0
    # The weights' gradients arrive in the weights' own (row-major) layout: no clone on accumulation.
    for w in (experts.w1, experts.w3, experts.w2):
        assert w.grad.is_contiguous() and w.grad.stride() == w.stride()


def test_col_major_cast_layout_and_gradient():
    w = torch.randn(3, 32, 48, requires_grad=True)
    c = col_major(w, torch.bfloat16)
    assert c.dtype == torch.bfloat16 and c.shape == w.shape and c.stride() == (32 * 48, 1, 32)
    torch.testing.assert_close(c.float(), w.detach().bfloat16().float())
    up = torch.randn(3, 32, 48)
    (c.float() * up).sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.is_contiguous()
    torch.testing.assert_close(w.grad, up.bfloat16().float())


def test_padded_swiglu_backward_has_no_scatter_add():
    """Both row moves are gathers: autograd's graph holds no index_select (whose backward is an
    index_add with atomics on the GPU)."""
    x = torch.randn(40, 32, requires_grad=True)
    experts = GroupedExperts(4, 32, 48, impl="grouped_mm")
    out = fp8_swiglu(x, experts.w1, experts.w3, experts.w2, torch.tensor([7, 0, 20, 9]), grouped_mm)
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    names = {type(fn).__name__ for fn in seen}
    assert not any("IndexSelect" in n or "IndexCopy" in n or "IndexAdd" in n for n in names), names
    assert "_RowMapBackward" in names


def test_experts_module_takes_the_fp8_path_when_set():
    experts = GroupedExperts(4, 32, 48, impl="grouped_mm")
    calls = []

    def counting_mm(x, w, offs):
        calls.append(tuple(offs.tolist()))
        return grouped_mm(x, w, offs)

    experts.fp8_mm = counting_mm
    experts(torch.randn(10, 32), torch.tensor([1, 2, 3, 4]))
    assert calls == [(16, 32, 48, 64)] * 3
