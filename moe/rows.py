"""Moving rows between token order and expert order without scatter-add atomics.

A dispatcher sorts the ``N = T*K`` (token, k) assignments by expert: ``order_S`` lists, for each
row it sends to the experts, which assignment (flat ``t*K + k``) the row is. ``S <= N``: an
expert-parallel dispatcher sends no row for a dropped assignment. ``inv_N`` is the inverse: the
row of each assignment, ``>= S`` for one that has none.

Every step here is a gather in both directions and every K-way sum a plain reduction in fp32:
autograd's default for ``index_select`` is an ``index_add`` backward, and the bf16 ``index_add``
(atomics, K collisions per token) plus the combine's scatter-add were 17 ms of a 227 ms
``dsv3_mini`` step on an H100 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch

from compat.torch_compat import index_select_rows

__all__ = ["inverse_assignments", "gather_token_rows", "assignment_rows", "permute_rows", "row_map", "weighted_k_sum"]


def accum_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 rows, fp64 for fp64 (tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def inverse_assignments(order_N: torch.Tensor) -> torch.Tensor:
    """``inv_N[order_N[i]] = i`` for a permutation ``order_N`` of the ``N`` assignments."""
    # scatter_, not index_copy_: torch-xla 2.9 aborts on index_copy_ with a pending sort's indices.
    return torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))


def _rows_of_assignments(x_SD: torch.Tensor, inv_N: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: row ``inv_N[a]`` of ``x_SD`` for each assignment ``a``; zero where ``inv_N[a] >= S``."""
    S, N = x_SD.shape[0], inv_N.numel()
    if S == N:  # every assignment has a row: a permutation
        return index_select_rows(x_SD, inv_N)
    if S == 0:
        return x_SD.new_zeros((N, x_SD.shape[-1]))
    rows = index_select_rows(x_SD, inv_N.clamp(max=S - 1))
    return torch.where((inv_N < S).unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


class _GatherTokenRows(torch.autograd.Function):
    """``x_TD[order_S // K]``; backward: each token's K gradient rows gathered and summed (fp32)."""

    @staticmethod
    def forward(ctx, x_TD, order_S, inv_N, top_k: int):
        ctx.save_for_backward(inv_N)
        ctx.top_k = top_k
        return index_select_rows(x_TD, torch.div(order_S, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g_SD):
        (inv_N,) = ctx.saved_tensors
        g_TKD = _rows_of_assignments(g_SD, inv_N).view(-1, ctx.top_k, g_SD.shape[-1])
        return g_TKD.sum(1, dtype=accum_dtype(g_SD)).to(g_SD.dtype), None, None, None


def gather_token_rows(x_TD: torch.Tensor, order_S: torch.Tensor, inv_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Row ``s`` = the token of assignment ``order_S[s]``: ``x_TD[order_S // top_k]``."""
    return _GatherTokenRows.apply(x_TD, order_S, inv_N, top_k)


def assignment_rows(y_SD: torch.Tensor, inv_N: torch.Tensor, order_S: torch.Tensor) -> torch.Tensor:
    """The inverse of ``gather_token_rows``' ordering: ``[N, D]`` with assignment ``a``'s row at ``a``
    (zero for an assignment that was not sent)."""
    return _RowMap.apply(y_SD, inv_N, order_S)


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse`` (the case S = N of
    ``assignment_rows``: every row is some assignment's)."""
    if x.shape[0] != index.numel():
        raise ValueError(f"permute_rows: {x.shape[0]} rows but an index of {index.numel()}")
    return _RowMap.apply(x, index, inverse)


class _RowMap(torch.autograd.Function):
    """Rows gathered by ``fwd_idx`` (an index past the source's rows gives a zero row); the
    backward gathers by ``bwd_idx`` the same way. Exact when the two indexes are inverse on the
    rows they pair and every other row is unpaired in both directions."""

    @staticmethod
    def forward(ctx, x, fwd_idx, bwd_idx):
        ctx.save_for_backward(bwd_idx)
        return _rows_of_assignments(x, fwd_idx)

    @staticmethod
    def backward(ctx, g):
        (bwd_idx,) = ctx.saved_tensors
        return _rows_of_assignments(g, bwd_idx), None, None


def row_map(x: torch.Tensor, fwd_idx: torch.Tensor, bwd_idx: torch.Tensor) -> torch.Tensor:
    """``out[i] = x[fwd_idx[i]]`` (zero where ``fwd_idx[i] >= len(x)``), with a gather backward:
    ``grad_x[j] = grad_out[bwd_idx[j]]`` (zero where ``bwd_idx[j] >= len(out)``). For a one-to-one
    pairing of some rows (a padded layout and its inverse) this is the exact gradient, without the
    scatter-add (atomics) of ``index_select``'s default backward."""
    return _RowMap.apply(x, fwd_idx, bwd_idx)


def weighted_k_sum(y_ND: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """``sum_k w[t, k] * y[t*K + k]`` in fp32, cast once to ``y_ND``'s dtype."""
    T, K = topk_weights_TK.shape
    acc = accum_dtype(y_ND)
    y_TKD = y_ND.view(T, K, y_ND.shape[-1])
    return (y_TKD.to(acc) * topk_weights_TK.to(acc).unsqueeze(-1)).sum(1).to(y_ND.dtype)
