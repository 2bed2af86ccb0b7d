"""Top-k router: pure scoring functions plus the ``Router`` module that owns the gate.

All routing math runs in fp32 whatever the activation dtype: the gate linear, the scores, the
selection and the gate weights. ``RouterOutput.topk_weights_TK`` is therefore fp32; the combine
step multiplies expert outputs by it in fp32 and casts back (as torchtitan does), so bf16 training
does not round the gate values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig
from moe.shared import trunc_normal_fp32_

__all__ = [
    "RouterOutput", "Router", "compute_scores", "select_topk", "topk_gate_weights",
    "switch_aux_loss", "seq_aux_loss", "z_loss",
]


@dataclass
class RouterOutput:
    topk_ids_TK: torch.Tensor  # int64 expert ids, chosen with the bias
    topk_weights_TK: torch.Tensor  # fp32 gate values, from the unbiased scores
    scores_TE: torch.Tensor  # fp32 unbiased scores (softmax probs or sigmoid)
    aux_loss: torch.Tensor  # fp32 scalar, sum of the enabled losses, already times their coefs
    # Unscaled parts (detached; zero where the loss is off), for routing_stats.
    aux_parts: Optional[dict] = None


def compute_scores(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return torch.softmax(logits_TE.float(), dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    raise ValueError(f"score_func={score_func!r} must be softmax or sigmoid")


def select_topk(scores_TE: torch.Tensor, top_k: int, bias_E: Optional[torch.Tensor] = None,
                n_groups: int = 1, topk_groups: int = 1) -> torch.Tensor:
    """Expert ids [T, K] chosen on ``scores + bias``, limited to the best ``topk_groups`` groups.

    A group's score is the sum of its top-2 (biased) scores, as in DeepSeek-V3.
    """
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if n_groups > 1:
        T, E = choice_TE.shape
        choice_TGe = choice_TE.view(T, n_groups, E // n_groups)
        group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
        group_ids = group_scores_TG.topk(topk_groups, dim=-1, sorted=False).indices
        group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        group_mask_TG.scatter_(1, group_ids, True)
        choice_TE = choice_TGe.masked_fill(~group_mask_TG.unsqueeze(-1), float("-inf")).view(T, E)
    return choice_TE.topk(top_k, dim=-1, sorted=False).indices


def topk_gate_weights(scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, norm_topk_prob: bool,
                      route_scale: float) -> torch.Tensor:
    # The expert bias is used only for selection; gate values come from the unbiased scores.
    w_TK = scores_TE.gather(1, topk_ids_TK)
    if norm_topk_prob:
        # +1e-20 as DeepSeek-V3 (sigmoid scores can all be tiny); below fp32 resolution otherwise.
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return w_TK * route_scale


def _normalised(scores_TE: torch.Tensor) -> torch.Tensor:
    # Sigmoid scores are not a distribution; both balance losses use per-token normalised scores.
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


def switch_aux_loss(scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """GShard/Switch balance loss ``E * sum_i f_i * P_i`` (1.0 when perfectly balanced).

    f_i: fraction of the T*K assignments routed to expert i (no gradient); P_i: mean normalised
    score of expert i over tokens.
    """
    T, E = scores_TE.shape
    counts_E = torch.zeros(E, device=scores_TE.device, dtype=torch.float32)
    counts_E.scatter_add_(0, topk_ids_TK.reshape(-1), torch.ones_like(topk_ids_TK, dtype=torch.float32).reshape(-1))
    f_E = counts_E / topk_ids_TK.numel()
    P_E = _normalised(scores_TE).mean(dim=0)
    return E * (f_E * P_E).sum()


def seq_aux_loss(scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the T // seq_len sequences.

    Per sequence: f_i = E / (K * T_s) * (assignments to i), P_i = mean_t s'_{t,i}; L = sum f_i P_i.
    """
    T, E = scores_TE.shape
    K = topk_ids_TK.shape[1]
    B = T // seq_len
    ids_BX = topk_ids_TK.reshape(B, seq_len * K)
    counts_BE = torch.zeros(B, E, device=scores_TE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, ids_BX, torch.ones_like(ids_BX, dtype=torch.float32))
    f_BE = counts_BE * (E / (K * seq_len))
    P_BE = _normalised(scores_TE).view(B, seq_len, E).mean(dim=1)
    return (f_BE * P_BE).sum(dim=1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.gate = nn.Linear(d_model, cfg.n_experts, bias=False)
        # Selection-only bias of aux-loss-free balancing; fp32 and persistent (checkpointed).
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02) -> None:
        trunc_normal_fp32_(self.gate.weight, std)
        self.expert_bias.zero_()

    def forward(self, x_TD: torch.Tensor, seq_len: Optional[int] = None) -> RouterOutput:
        """Route T tokens. ``seq_len``: tokens per sequence (for the sequence-wise loss);
        None treats all T tokens as one sequence."""
        cfg = self.cfg
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        scores_TE = compute_scores(logits_TE, cfg.score_func)
        with torch.no_grad():
            topk_ids_TK = select_topk(scores_TE.detach(), cfg.top_k, self.expert_bias,
                                      cfg.n_groups, cfg.topk_groups)
        topk_weights_TK = topk_gate_weights(scores_TE, topk_ids_TK, cfg.norm_topk_prob,
                                            cfg.route_scale)

        zero = logits_TE.new_zeros(())
        aux, parts = zero, {}
        if cfg.aux_loss_coef > 0:
            parts["aux_loss"] = switch_aux_loss(scores_TE, topk_ids_TK)
            aux = aux + cfg.aux_loss_coef * parts["aux_loss"]
        if cfg.seq_aux_loss_coef > 0:
            parts["seq_aux_loss"] = seq_aux_loss(scores_TE, topk_ids_TK, seq_len or x_TD.shape[0])
            aux = aux + cfg.seq_aux_loss_coef * parts["seq_aux_loss"]
        if cfg.z_loss_coef > 0:
            parts["z_loss"] = z_loss(logits_TE)
            aux = aux + cfg.z_loss_coef * parts["z_loss"]
        parts = {k: v.detach() for k, v in parts.items()}
        return RouterOutput(topk_ids_TK, topk_weights_TK, scores_TE, aux, parts)
