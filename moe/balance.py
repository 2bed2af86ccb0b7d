"""Aux-loss-free load balancing (DeepSeek-V3 expert bias) and routing statistics.

The trainer calls, once per optimizer step and outside autograd::

    update_expert_bias(model, cfg.moe.bias_update_rate, reduce_fn=all_reduce_sum_over_dp)
    if log_step: metrics.update(routing_stats(model))   # before or after: see routing_stats

``reduce_fn`` sums a tensor in place over data-parallel ranks (e.g.
``lambda t: dist.all_reduce(t, group=dp_group)``); all layers' counts are reduced in one call.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from moe.layer import AUX_PARTS, MoELayer

__all__ = ["moe_layers", "update_expert_bias", "routing_stats"]


def moe_layers(model: nn.Module) -> List[Tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def _short_name(name: str, index: int) -> str:
    # "layers.3.ffn" -> "L3"; fall back to the MoE layer's position when no index is in the name.
    for part in name.split("."):
        if part.isdigit():
            return f"L{part}"
    return f"L{index}"


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float,
                       reduce_fn: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """``b_i += rate * sign(mean_load - load_i)`` per MoE layer, then zero the counts.

    Loads are the routed assignments counted over all micro-batches since the last call (and over
    ranks via ``reduce_fn``). ``rate`` 0 only snapshots and resets the counts.
    """
    layers = [m for _, m in moe_layers(model)]
    if not layers:
        return
    # One flat buffer, one collective, whatever each layer's expert count.
    counts = torch.cat([m.tokens_per_expert for m in layers])  # int64: exact sums
    if reduce_fn is not None:
        reduce_fn(counts)
    for m, load_E in zip(layers, counts.split([m.tokens_per_expert.numel() for m in layers])):
        if rate > 0:
            load_E = load_E.double()
            delta = torch.sign(load_E.mean() - load_E) * rate
            m.router.expert_bias.add_(delta.to(m.router.expert_bias.dtype))
        m.last_tokens_per_expert.copy_(load_E.to(m.last_tokens_per_expert.dtype))
        m.tokens_per_expert.zero_()


@torch.no_grad()
def routing_stats(model: nn.Module) -> Dict[str, float]:
    """Flat ``moe/L<i>/<stat>`` floats; one host sync. Loads are the counts accumulated since the
    last ``update_expert_bias``, or, if none yet, the snapshot that call took (rank-local unless
    it was reduced there). ``dropped`` counts assignments dropped by capacity since the previous
    ``routing_stats`` call, which resets it."""
    layers = moe_layers(model)
    if not layers:
        return {}
    rows = []
    for _, m in layers:
        live = m.tokens_per_expert
        load = torch.where(live.sum() > 0, live, m.last_tokens_per_expert).double()
        mean = load.mean()
        routed = m.routed_tokens.double()
        rows.append(torch.cat([
            torch.stack([load.min(), load.max(), mean,
                         load.max() / mean.clamp(min=1e-9),
                         m.dropped_tokens.double(), m.dropped_tokens / routed.clamp(min=1.0),
                         m.router.expert_bias.double().norm()]),
            m.last_aux_parts.double(),
        ]))
    values = torch.stack(rows).cpu().tolist()  # the one host sync
    for _, m in layers:  # dropped/routed count the interval between two stats reads
        m.dropped_tokens.zero_()
        m.routed_tokens.zero_()
    keys = ("tokens_min", "tokens_max", "tokens_mean", "imbalance", "dropped", "dropped_frac",
            "bias_norm") + AUX_PARTS
    out: Dict[str, float] = {}
    for i, ((name, _), vals) in enumerate(zip(layers, values)):
        tag = _short_name(name, i)
        for k, v in zip(keys, vals):
            out[f"moe/{tag}/{k}"] = float(v)
    return out
