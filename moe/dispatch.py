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

from model.torch_compat import index_select_1d

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
    token_N: torch.Tensor  # token index of each dispatched row
    n_tokens: int


class LocalDispatcher:
    """All experts on this rank: a stable argsort by expert id, a gather, an index_add back."""

    def dispatch(self, x_TD, topk_ids_TK, n_experts):
        T, K = topk_ids_TK.shape
        ids_N = topk_ids_TK.reshape(-1)
        valid_N = (ids_N >= 0) & (ids_N < n_experts)
        # Dropped ids sort after every expert; stable keeps token order inside each expert.
        key_N = torch.where(valid_N, ids_N, torch.full_like(ids_N, n_experts))
        order_N = torch.argsort(key_N, stable=True)
        token_N = order_N // K
        tokens_per_expert_E = torch.zeros(n_experts, dtype=torch.int64, device=ids_N.device)
        tokens_per_expert_E.scatter_add_(0, key_N.clamp(max=n_experts - 1), valid_N.long())
        x_ND = x_TD.index_select(0, token_N)
        return x_ND, tokens_per_expert_E, LocalDispatchContext(order_N, token_N, T)

    def combine(self, y_ND, topk_weights_TK, ctx: LocalDispatchContext):
        w_N = index_select_1d(topk_weights_TK.reshape(-1), ctx.order_N)
        # Weighting and the K-way sum in fp32, cast once at the end.
        out_TD = y_ND.new_zeros((ctx.n_tokens, y_ND.shape[-1]), dtype=torch.float32)
        out_TD.index_add_(0, ctx.token_N, y_ND.float() * w_N.float().unsqueeze(-1))
        return out_TD.to(y_ND.dtype)
