"""Routed experts in fp8: torchao's rowwise-scaled fp8 grouped GEMM (``trainer.fp8.experts=true``).

torchao's ``_to_fp8_rowwise_then_scaled_grouped_mm`` (torchao.prototype.moe_training, 0.18.0)
quantizes both operands on the fly (per row of the tokens, per column of each expert's weight,
power-of-two scales) and runs torch's scaled grouped GEMM, forward and backward (dgrad and
wgrad in fp8 too). Its contract, read in the 0.18.0 source:

- every token group's size must be a multiple of 16 (the fp8 kernels' alignment; its own padding
  switch asserts "not yet supported"), so the rows are laid out in a buffer whose groups start at
  multiples of 16 (:func:`padded_layout`) and gathered back after, by gathers in both directions;
- the weight operand must be column-major ``(E, K, N)`` with strides ``(K*N, 1, K)``: our weights are
  stored ``(E, D, F)`` row-major, so the bf16 cast writes the transposed layout (one pass, fused by
  inductor), and the gradient is transposed back in the compiled backward (:class:`_ColMajorCast`);
- K and N divisible by 16 (``d_model`` and ``expert_dim``); SM90+ (its Triton kernels and the
  scaled grouped GEMM); no CPU kernel. CPU tests run :func:`fp8_swiglu` with a plain grouped GEMM
  in its place to check the padding, which is ours.

Rows of the buffer past the last group are never written by the kernel (garbage, even NaN): they
are masked, as in the bf16 path.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from moe.rows import row_map

ALIGN = 16  # rows per token group must be a multiple of this for the fp8 grouped GEMM


def padded_layout(tokens_per_expert_E: torch.Tensor, n_rows: int,
                  align: int = ALIGN) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where each of ``n_rows`` expert-sorted rows goes in a buffer of ``M`` rows whose groups are
    padded to ``align`` rows, and back: ``(dest_N, src_M, padded_ends_E int32, M)``.

    Row i of expert e lands at ``padded_start[e] + (i - start[e])``. Rows past the counts' sum
    (dropped assignments) have no place: ``dest = M``. ``src_M`` is the inverse (``n_rows`` for a
    padding row). ``M = n_rows + E * align`` is static (no host sync) and always past the last
    padded group (at most ``n_rows + E * (align - 1)``)."""
    E = tokens_per_expert_E.shape[0]
    counts_E = tokens_per_expert_E.to(torch.int64)
    padded_E = (counts_E + align - 1) // align * align
    ends_E = torch.cumsum(counts_E, 0)
    padded_ends_E = torch.cumsum(padded_E, 0)
    row_N = torch.arange(n_rows, device=counts_E.device)
    expert_N = torch.searchsorted(ends_E, row_N, right=True)  # E for rows past the sum
    e_N = expert_N.clamp(max=E - 1)
    shift_E = (padded_ends_E - padded_E) - (ends_E - counts_E)  # padded start - start
    M = n_rows + E * align
    dest_N = torch.where(expert_N < E, row_N + shift_E[e_N], torch.full_like(row_N, M))
    # One spare slot takes every unplaced row's write; it is cut off.
    src_M = torch.full((M + 1,), n_rows, dtype=torch.int64, device=counts_E.device).scatter_(0, dest_N, row_N)[:M]
    return dest_N, src_M, padded_ends_E.to(torch.int32), M


class _ColMajorCast(torch.autograd.Function):
    """Forward: ``w`` cast to ``dtype`` in the column-major layout. Backward: the gradient cast back
    and made row-major (``w``'s own layout) inside the compiled graph. Autograd's own backward of
    the cast-and-transpose hands back a column-major fp32 gradient, which AccumulateGrad then
    clones into the parameter's layout with an eager strided copy: 12.2 ms for the nine expert
    weights of an fp8 dsv3_mini step on an H200 (against 2.4 ms for the bf16 path's grad casts)."""

    @staticmethod
    def forward(ctx, w_EKN, dtype):
        ctx.w_dtype = w_EKN.dtype
        return w_EKN.mT.to(dtype).contiguous().mT

    @staticmethod
    def backward(ctx, g_EKN):
        return g_EKN.to(ctx.w_dtype).contiguous(), None


def col_major(w_EKN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` cast to ``dtype`` in the column-major layout the scaled grouped GEMM wants; its
    gradient comes back row-major, like ``w``."""
    return _ColMajorCast.apply(w_EKN, dtype)


def torchao_fp8_grouped_mm() -> Callable:
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm as mm

    def fp8_mm(x_MK, w_EKN, ends_E):
        return mm(x_MK, w_EKN, ends_E, out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False)

    return fp8_mm


def fp8_swiglu(x_ND: torch.Tensor, w1_EDF: torch.Tensor, w3_EDF: torch.Tensor, w2_EFD: torch.Tensor,
               tokens_per_expert_E: torch.Tensor, mm: Callable) -> torch.Tensor:
    """SwiGLU over expert-sorted rows, each GEMM through ``mm`` (``torchao_fp8_grouped_mm()``; a
    test passes a plain grouped GEMM) on 16-row-aligned groups. Rows past the counts' sum give
    zeros and get zero gradient."""
    N, D = x_ND.shape
    dest_N, src_M, ends_E, M = padded_layout(tokens_per_expert_E, N)
    # Into the padded layout and back by gathers both ways (moe/rows.py): index_select's default
    # backward is a bf16 index_add (atomics), 10.7 ms of a 215 ms fp8 dsv3_mini step on an H200.
    x_MD = row_map(x_ND, src_M, dest_N)  # padding rows are zero
    in_M1 = (torch.arange(M, device=x_ND.device) < ends_E[-1]).unsqueeze(-1)
    dt = x_ND.dtype
    g_MF = torch.where(in_M1, mm(x_MD, col_major(w1_EDF, dt), ends_E), 0.0)
    u_MF = torch.where(in_M1, mm(x_MD, col_major(w3_EDF, dt), ends_E), 0.0)
    h_MF = F.silu(g_MF) * u_MF
    y_MD = torch.where(in_M1, mm(h_MF, col_major(w2_EFD, dt), ends_E), 0.0)
    return row_map(y_MD, dest_N, src_M)  # dropped rows (dest = M) are zero
