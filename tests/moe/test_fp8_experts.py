"""moe/fp8_experts.py: the 16-row-aligned layout the fp8 grouped GEMM needs, and the padded
SwiGLU against the plain grouped path (a plain grouped GEMM in place of torchao's fp8 one, which
has no CPU kernel): same values, same gradients, dropped rows zero."""

from __future__ import annotations

import torch

from compat.torch_compat import grouped_mm
from moe.experts import GroupedExperts
from moe.fp8_experts import fp8_swiglu, padded_layout


def test_padded_layout_puts_each_group_on_a_16_row_boundary():
    counts = torch.tensor([3, 0, 17, 5])
    dest, ends, valid, M = padded_layout(counts, 28)  # 25 real rows, 3 dropped
    assert ends.tolist() == [16, 16, 48, 64] and ends.dtype == torch.int32
    assert dest[:3].tolist() == [0, 1, 2]
    assert dest[3:20].tolist() == list(range(16, 33))
    assert dest[20:25].tolist() == list(range(48, 53))
    assert M == 28 + 4 * 16 and dest[25:].tolist() == [M - 1] * 3
    assert valid.tolist() == [True] * 25 + [False] * 3


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


def test_experts_module_takes_the_fp8_path_when_set():
    experts = GroupedExperts(4, 32, 48, impl="grouped_mm")
    calls = []

    def counting_mm(x, w, offs):
        calls.append(tuple(offs.tolist()))
        return grouped_mm(x, w, offs)

    experts.fp8_mm = counting_mm
    experts(torch.randn(10, 32), torch.tensor([1, 2, 3, 4]))
    assert calls == [(16, 32, 48, 64)] * 3
