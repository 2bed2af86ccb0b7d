"""The MoE layer, staged as route -> (capacity) -> dispatch -> experts -> combine (+ shared)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from moe.config import MoEConfig, validate_moe_config
from moe.dispatch import LocalDispatcher, TokenDispatcher
from moe.experts import GroupedExperts, compute_dtype
from moe.router import Router
from moe.shared import SwiGLU

__all__ = ["MoELayer", "capacity", "capacity_keep_mask"]

AUX_PARTS = ("aux_loss", "seq_aux_loss", "z_loss")


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def capacity_keep_mask(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, n_experts: int,
                       cap: int, drop_policy: str) -> torch.Tensor:
    """Bool [T, K]: which assignments fit in their expert's ``cap`` slots.

    "position" keeps each expert's earliest tokens (token order, then k); "probs" keeps each
    expert's highest-weight assignments (ties: earlier first). Static shapes, no host sync.
    """
    ids_N = topk_ids_TK.reshape(-1)
    N = ids_N.numel()
    if drop_policy == "probs":
        pre_N = torch.argsort(topk_weights_TK.reshape(-1).detach(), descending=True, stable=True)
    elif drop_policy == "position":
        pre_N = torch.arange(N, device=ids_N.device)
    else:
        raise ValueError(f"drop_policy={drop_policy!r} must be probs or position")
    # Stable sort by expert after ordering by priority: rank within expert = slot.
    order_N = pre_N[torch.argsort(ids_N[pre_N], stable=True)]
    sorted_ids_N = ids_N[order_N]
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_N = torch.arange(N, device=ids_N.device) - starts_E[sorted_ids_N]
    keep_N = torch.empty(N, dtype=torch.bool, device=ids_N.device)
    keep_N[order_N] = rank_sorted_N < cap
    return keep_N.view_as(topk_ids_TK)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        validate_moe_config(cfg)
        if cfg.n_experts < 1:
            raise ValueError("MoELayer needs moe.n_experts >= 1 (0 means a dense FFN)")
        self.cfg = cfg
        self.d_model = d_model
        self.n_experts = cfg.n_experts
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(cfg.n_experts, d_model, cfg.expert_dim, impl=cfg.experts_impl,
                                      capacity_factor=cfg.capacity_factor)
        self.shared: Optional[SwiGLU] = (
            SwiGLU(d_model, cfg.n_shared_experts * cfg.expert_dim) if cfg.n_shared_experts > 0 else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        E = cfg.n_experts
        # Statistics, not state: non-persistent, never in a checkpoint. Counts are int64: exact
        # at any batch size (fp32 stops counting exactly at 2**24) and untouched by a wholesale
        # module.to(bfloat16), which would make float counts inexact past 256.
        # Routed (pre-drop) assignments per expert since the last bias update.
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)
        # Snapshot taken by update_expert_bias before it zeroes the counts.
        self.register_buffer("last_tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)
        # Assignments dropped by capacity, and all assignments, since the last routing_stats read.
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        # Unscaled aux loss parts of the last forward (0 where off): aux_loss, seq_aux_loss, z_loss.
        self.register_buffer("last_aux_parts", torch.zeros(len(AUX_PARTS)), persistent=False)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)

    def forward(self, x_BTD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        E, cfg = self.n_experts, self.cfg

        r = self.router(x_TD, seq_len=T)
        topk_ids_TK, topk_weights_TK = r.topk_ids_TK, r.topk_weights_TK
        routed_ids_TK = topk_ids_TK
        if cfg.capacity_factor > 0:
            cap = capacity(B * T, cfg.top_k, E, cfg.capacity_factor)
            keep_TK = capacity_keep_mask(topk_ids_TK, topk_weights_TK, E, cap, cfg.drop_policy)
            # Id E marks a dropped assignment for the dispatcher; its weight is zero as well.
            topk_ids_TK = torch.where(keep_TK, topk_ids_TK, E)
            topk_weights_TK = torch.where(keep_TK, topk_weights_TK, 0.0)

        # The experts compute in autocast's dtype: cast before the gather (and, under EP, the
        # all-to-all) so they move half the bytes; casting first or after gives the same rows.
        x_ND, tokens_per_expert_E, ctx = self.dispatcher.dispatch(x_TD.to(compute_dtype(x_TD)), topk_ids_TK, E)
        y_ND = self.experts(x_ND, tokens_per_expert_E)
        y_TD = self.dispatcher.combine(y_ND, topk_weights_TK, ctx)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        if self.training:  # evaluation must not feed the bias update or the routing stats
            self._record(routed_ids_TK, topk_ids_TK, r.aux_parts)
        return y_TD.view(B, T, D), r.aux_loss

    @torch.no_grad()
    def _record(self, routed_ids_TK, topk_ids_TK, parts) -> None:
        ids_N = routed_ids_TK.reshape(-1)
        self.tokens_per_expert.scatter_add_(0, ids_N, torch.ones_like(ids_N))
        self.routed_tokens.add_(ids_N.numel())
        if self.cfg.capacity_factor > 0:
            self.dropped_tokens.add_((topk_ids_TK == self.n_experts).sum())
        parts = parts or {}
        self.last_aux_parts.copy_(torch.stack([
            parts[k].to(self.last_aux_parts.dtype) if k in parts else self.last_aux_parts.new_zeros(())
            for k in AUX_PARTS]))
