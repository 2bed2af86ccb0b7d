"""Token dispatch: send each (token, k) assignment to its expert's rows, and bring outputs back.

A dispatcher turns ``x_TD`` and the router's ``topk_ids_TK`` into ``x_ND``: rows grouped by LOCAL
expert (rows of local expert 0 first, then 1, ...), with ``tokens_per_expert_E`` their counts per
local expert. The experts see only that. ``combine`` is the inverse: it returns each token's
weighted sum of its experts' outputs. An expert-parallel dispatcher (all-to-all) implements the
same two calls, owning only a subset of experts; the layer never changes.

Contract shared by every dispatcher:

- an id outside ``[0, n_experts)`` marks a dropped assignment (the layer uses ``n_experts``);
  it gets no row inside any expert's group and contributes nothing to the output;
- ``x_ND`` may have rows past ``sum(tokens_per_expert_E)`` (static shapes, no host sync); the
  experts return zeros there and ``combine`` ignores them;
- ``tokens_per_expert_E`` is computed on device; no ``.item()`` or data-dependent shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Tuple, runtime_checkable

import torch

from model.torch_compat import index_select_rows

__all__ = ["TokenDispatcher", "LocalDispatcher", "LocalDispatchContext"]


@runtime_checkable
class TokenDispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 n_experts: int) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (x_ND, tokens_per_expert_E over local experts, ctx for combine)."""
        ...

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor, ctx: Any) -> torch.Tensor:
        """-> y_TD = sum_k weight[t, k] * y[row of (t, k)], in y_ND's dtype."""
        ...


@dataclass
class LocalDispatchContext:
    order_N: torch.Tensor  # flat (t*K + k) assignment index of each dispatched row
    inv_N: torch.Tensor    # its inverse: the dispatched row of each assignment (t*K + k)
    n_tokens: int
    top_k: int


def _accum_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 rows, fp64 for fp64 (tests)."""
    return torch.promote_types(x.dtype, torch.float32)


class _ExpandGather(torch.autograd.Function):
    """``x_TD[order_N // K]`` whose backward is a gather and a K-way sum, not an atomic index_add.

    ``order_N`` is a permutation of the ``T*K`` assignments, so each token's K gradient rows are
    found through the inverse permutation and summed (in fp32) without atomics: the bf16
    ``index_add`` this replaces was 11 ms of a 227 ms ``dsv3_mini`` step on an H100.
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, inv_N, top_k: int):
        ctx.save_for_backward(inv_N)
        ctx.top_k = top_k
        return index_select_rows(x_TD, torch.div(order_N, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g_ND):
        (inv_N,) = ctx.saved_tensors
        g_TKD = index_select_rows(g_ND, inv_N).view(-1, ctx.top_k, g_ND.shape[-1])
        return g_TKD.sum(1, dtype=_accum_dtype(g_ND)).to(g_ND.dtype), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward gathers with ``inverse`` (no atomics)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return index_select_rows(x, index)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return index_select_rows(g, inverse), None, None


class LocalDispatcher:
    """All experts on this rank: a stable argsort by expert id, a gather; combine gathers back.

    Both directions of both steps are gathers through the sort's permutation and its inverse, and
    the K-way sums are plain reductions in fp32: no scatter-add atomics (which were the slowest
    part of the MoE layer's data movement, `docs/PERFORMANCE.md`).
    """

    def dispatch(self, x_TD, topk_ids_TK, n_experts):
        T, K = topk_ids_TK.shape
        ids_N = topk_ids_TK.reshape(-1)
        valid_N = (ids_N >= 0) & (ids_N < n_experts)
        # Dropped ids sort after every expert; stable keeps token order inside each expert.
        key_N = torch.where(valid_N, ids_N, torch.full_like(ids_N, n_experts))
        order_N = torch.argsort(key_N, stable=True)
        # scatter_, not index_copy_: torch-xla 2.9 aborts on index_copy_ with a pending sort's indices.
        inv_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))
        tokens_per_expert_E = torch.zeros(n_experts, dtype=torch.int64, device=ids_N.device)
        tokens_per_expert_E.scatter_add_(0, key_N.clamp(max=n_experts - 1), valid_N.long())
        x_ND = _ExpandGather.apply(x_TD, order_N, inv_N, K)
        return x_ND, tokens_per_expert_E, LocalDispatchContext(order_N, inv_N, T, K)

    def combine(self, y_ND, topk_weights_TK, ctx: LocalDispatchContext):
        # Each assignment's row (dropped ones: a zero row with weight zero), weighted and summed
        # over K in fp32, cast once at the end.
        y_TKD = _PermuteRows.apply(y_ND, ctx.inv_N, ctx.order_N).view(ctx.n_tokens, ctx.top_k, y_ND.shape[-1])
        acc = _accum_dtype(y_ND)
        out_TD = (y_TKD.to(acc) * topk_weights_TK.to(acc).unsqueeze(-1)).sum(1)
        return out_TD.to(y_ND.dtype)
