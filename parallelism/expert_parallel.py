"""Expert parallelism: experts split over the ``ep`` ranks, tokens moved by all-to-all.

``apply_expert_parallel(model, ep_mesh)`` keeps, in each ``MoELayer``, only this rank's slice of the
expert weights, as a DTensor ``Shard(0)`` on the ep mesh (so the checkpoint holds full
``[n_experts, ...]`` tensors under unchanged FQNs and DCP reshards across ep sizes), and installs
an :class:`AllToAllDispatcher`. The MoE layer itself does not change: it still calls
``dispatcher.dispatch -> experts(x_ND, tokens_per_local_expert) -> dispatcher.combine``.

Dispatch, per layer and micro-batch:

1. sort this rank's (token, k) assignments by global expert id (dropped ones last, not sent);
   experts are numbered rank-major, so the rows for ep rank p are contiguous;
2. one ``all_to_all_single`` of the per-expert counts ``[ep, local_experts]``;
3. ONE host sync (``.tolist()``): the all-to-all split sizes must be Python ints;
4. ``all_to_all_single`` (autograd) of the rows with uneven splits;
5. received rows come grouped by (source rank, local expert): a stable sort regroups them by local
   expert for the grouped GEMM.

Combine runs the inverse permutation, the reverse all-to-all, and the weighted K-way sum in fp32.
Every row movement is a gather in both directions (``moe/rows.py``): no scatter-add atomics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from compat.torch_compat import all_to_all_single_autograd
from moe.experts import GroupedExperts, compute_dtype
from moe.layer import MoELayer
from moe.rows import assignment_rows, gather_token_rows, inverse_assignments, permute_rows, weighted_k_sum

__all__ = ["AllToAllDispatcher", "EPDispatchContext", "ExpertParallelExperts", "apply_expert_parallel",
           "make_count_reducer"]


def _all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all (backward is the reverse all-to-all)."""
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


@dataclass
class EPDispatchContext:
    order_S: torch.Tensor  # flat (t*K + k) index of each sent row, in send order
    inv_N: torch.Tensor  # sent row of each assignment; >= len(order_S) for a dropped one
    perm_R: torch.Tensor  # received row of each expert-grouped row
    inv_perm_R: torch.Tensor  # its inverse
    send_splits: List[int]
    recv_splits: List[int]


class AllToAllDispatcher:
    """Implements ``moe.dispatch.TokenDispatcher`` over an ep process group."""

    def __init__(self, ep_group, n_experts_total: int):
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if n_experts_total % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide model.moe.n_experts={n_experts_total}")
        self.n_experts = n_experts_total
        self.n_local = n_experts_total // self.ep

    def dispatch(self, x_TD, topk_ids_TK, n_experts):
        if n_experts != self.n_experts:
            raise ValueError(f"dispatcher built for {self.n_experts} experts, layer has {n_experts}")
        T, K = topk_ids_TK.shape
        P, L, dev = self.ep, self.n_local, x_TD.device
        ids_N = topk_ids_TK.reshape(-1)
        valid_N = (ids_N >= 0) & (ids_N < n_experts)
        key_N = torch.where(valid_N, ids_N, torch.full_like(ids_N, n_experts))
        order_N = torch.argsort(key_N, stable=True)
        counts_E = torch.zeros(n_experts, dtype=torch.int64, device=dev)
        counts_E.scatter_add_(0, key_N.clamp(max=n_experts - 1), valid_N.long())
        # counts_PL[p, l]: rows this rank sends to local expert l of ep rank p; after the exchange
        # recv_PL[p, l]: rows ep rank p sends to this rank's local expert l.
        recv_PL = torch.empty(P, L, dtype=torch.int64, device=dev)
        dist.all_to_all_single(recv_PL, counts_E.view(P, L).contiguous(), group=self.group)
        # The one host sync of the layer: all_to_all_single needs its split sizes as Python ints.
        splits = torch.cat([counts_E.view(P, L).sum(1), recv_PL.sum(1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        order_S = order_N[:n_send]
        inv_N = inverse_assignments(order_N)  # >= n_send: a dropped assignment, not sent
        x_recv_RD = _all_to_all(gather_token_rows(x_TD, order_S, inv_N, K), recv_splits, send_splits, self.group)

        # Received rows are grouped (source rank, local expert); regroup by local expert, keeping
        # source-rank order inside each expert (stable sort).
        local_id_R = torch.repeat_interleave(torch.arange(L, device=dev).repeat(P), recv_PL.reshape(-1),
                                             output_size=n_recv)
        perm_R = torch.argsort(local_id_R, stable=True)
        inv_perm_R = inverse_assignments(perm_R)
        x_ND = permute_rows(x_recv_RD, perm_R, inv_perm_R)
        tokens_per_expert_L = recv_PL.sum(0)
        return x_ND, tokens_per_expert_L, EPDispatchContext(order_S, inv_N, perm_R, inv_perm_R, send_splits,
                                                            recv_splits)

    def combine(self, y_ND, topk_weights_TK, ctx: EPDispatchContext):
        y_recv_RD = permute_rows(y_ND, ctx.inv_perm_R, ctx.perm_R)
        y_SD = _all_to_all(y_recv_RD, ctx.send_splits, ctx.recv_splits, self.group)
        # Every step a gather both ways (moe/rows.py); the K-way sum in fp32, cast once.
        return weighted_k_sum(assignment_rows(y_SD, ctx.inv_N, ctx.order_S), topk_weights_TK)


class _LocalView:
    """What GroupedExperts' math reads from ``self``, with the local shards of the weights."""

    def __init__(self, experts: GroupedExperts):
        from torch.distributed.tensor import DTensor

        def local(p):
            # isinstance, not hasattr: under torch.compile dynamo answers hasattr(param, "to_local")
            # False for a DTensor parameter, and the DTensor then reached grouped_mm / mm.
            return p.to_local() if isinstance(p, DTensor) else p

        self.w1, self.w3, self.w2 = local(experts.w1), local(experts.w3), local(experts.w2)
        self.n_experts = self.w1.shape[0]
        self.d_model, self.expert_dim, self.impl = experts.d_model, experts.expert_dim, experts.impl


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose weights are DTensors ``Shard(0)`` on the ep mesh; forward runs the same
    math (``GroupedExperts._forward_*``) on the local shards. Installed by class swap, so the
    parameter names stay ``...experts.w1`` etc."""

    def forward(self, x_ND, tokens_per_expert_E):
        view = _LocalView(self)
        x_ND = x_ND.to(compute_dtype(x_ND))  # as GroupedExperts.forward: autocast's dtype
        if GroupedExperts.resolve_impl(view, x_ND) == "grouped_mm" and x_ND.shape[0] > 0:
            return GroupedExperts._forward_grouped(view, x_ND, tokens_per_expert_E)
        # The loop also serves a rank that received no rows (the weights stay in the graph, so
        # every rank produces a (zero) gradient and FSDP's reduce-scatter lines up).
        return GroupedExperts._forward_loop(view, x_ND, tokens_per_expert_E)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> int:
    """Split every MoELayer's experts over ``ep_mesh`` (1-D) and install the all-to-all dispatcher.

    Works on meta or materialised parameters; no communication (each rank slices its own part;
    ``init_weights`` later fills DTensor shards from the same full tensor on every rank). Returns
    the number of MoE layers changed.
    """
    from torch.distributed.tensor import DTensor, Shard

    group = ep_mesh.get_group()
    P, r = ep_mesh.size(), ep_mesh.get_local_rank()
    n = 0
    for _, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        experts = layer.experts
        E = experts.w1.shape[0]
        if E % P:
            raise ValueError(f"parallel.ep={P} must divide model.moe.n_experts={E}")
        L = E // P
        for name in ("w1", "w3", "w2"):
            p = getattr(experts, name)
            if isinstance(p, DTensor):
                raise RuntimeError("apply_expert_parallel called twice on the same model")
            local = p.detach()[r * L:(r + 1) * L].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                    shape=p.shape, stride=p.stride())
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        experts.__class__ = ExpertParallelExperts
        layer.dispatcher = AllToAllDispatcher(group, E)
        n += 1
    return n


def make_count_reducer(dp_group) -> Optional[Callable[[torch.Tensor], None]]:
    """``reduce_fn`` for ``moe.balance.update_expert_bias``: sums the expert-load counts over every
    data-parallel rank, so each rank applies the same bias update and the router stays replicated.
    ``dp_group`` is ``Meshes.dp_group`` (None, or no process group: returns None, nothing to sum)."""
    if dp_group is None and not (dist.is_available() and dist.is_initialized()):
        return None

    def reduce_counts(counts: torch.Tensor) -> None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=dp_group)

    return reduce_counts
