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

from moe.rows import assignment_rows, gather_token_rows, inverse_assignments, weighted_k_sum

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


class LocalDispatcher:
    """All experts on this rank: a stable argsort by expert id, a gather; combine gathers back.

    Both directions of both steps are gathers through the sort's permutation and its inverse
    (``moe/rows.py``): no scatter-add atomics.
    """

    def dispatch(self, x_TD, topk_ids_TK, n_experts):
        T, K = topk_ids_TK.shape
        ids_N = topk_ids_TK.reshape(-1)
        valid_N = (ids_N >= 0) & (ids_N < n_experts)
        # Dropped ids sort after every expert; stable keeps token order inside each expert.
        key_N = torch.where(valid_N, ids_N, torch.full_like(ids_N, n_experts))
        order_N = torch.argsort(key_N, stable=True)
        inv_N = inverse_assignments(order_N)
        tokens_per_expert_E = torch.zeros(n_experts, dtype=torch.int64, device=ids_N.device)
        tokens_per_expert_E.scatter_add_(0, key_N.clamp(max=n_experts - 1), valid_N.long())
        x_ND = gather_token_rows(x_TD, order_N, inv_N, K)
        return x_ND, tokens_per_expert_E, LocalDispatchContext(order_N, inv_N)

    def combine(self, y_ND, topk_weights_TK, ctx: LocalDispatchContext):
        # Each assignment's row (dropped ones: a zero row with weight zero), weighted and summed
        # over K in fp32, cast once at the end.
        return weighted_k_sum(assignment_rows(y_ND, ctx.inv_N, ctx.order_N), topk_weights_TK)
