"""Typed configuration of the MoE layer (``model.moe`` in the Hydra tree)."""

from __future__ import annotations

from dataclasses import dataclass

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")


class ConfigError(ValueError):
    """A configuration value or cross-field rule is wrong; the message names the key and the fix."""


@dataclass
class MoEConfig:
    # n_experts 0 means a dense model (every FFN is SwiGLU of model.ffn_dim).
    n_experts: int = 0
    top_k: int = 2
    expert_dim: int = 256  # hidden size of one routed expert
    n_shared_experts: int = 0  # always-on SwiGLU of n_shared_experts * expert_dim
    first_k_dense: int = 0  # the first k layers use a dense FFN
    moe_every: int = 1  # after those, every n-th layer is MoE
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    # Group-limited routing (DeepSeek-V3): pick topk_groups of n_groups groups first.
    n_groups: int = 1
    topk_groups: int = 1
    # Aux-loss-free balancing: selection bias updated by b += rate * sign(mean_load - load_i).
    bias_update_rate: float = 0.0
    # Auxiliary losses, each off at 0.
    aux_loss_coef: float = 0.0  # GShard/Switch load-balancing loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE)
    # Dropless when capacity_factor <= 0; otherwise each expert takes at most
    # ceil(capacity_factor * tokens * top_k / n_experts) tokens, dropping by drop_policy.
    capacity_factor: float = 0.0
    drop_policy: str = "probs"
    # Expert kernel: "auto" (grouped GEMM where available), "grouped_mm", or "loop" (reference).
    experts_impl: str = "auto"


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def validate_moe_config(m: MoEConfig, prefix: str = "moe") -> None:
    if m.n_experts < 0:
        _fail(f"{prefix}.n_experts={m.n_experts} must be >= 0 (0 = dense model)")
    if m.n_experts == 0:
        return
    if m.top_k < 1 or m.top_k > m.n_experts:
        _fail(f"{prefix}.top_k={m.top_k} must be between 1 and {prefix}.n_experts={m.n_experts}")
    if m.expert_dim < 1:
        _fail(f"{prefix}.expert_dim={m.expert_dim} must be >= 1")
    if m.n_shared_experts < 0:
        _fail(f"{prefix}.n_shared_experts={m.n_shared_experts} must be >= 0")
    if m.first_k_dense < 0 or m.moe_every < 1:
        _fail(f"{prefix}.first_k_dense must be >= 0 and {prefix}.moe_every >= 1 "
              f"(got {m.first_k_dense}, {m.moe_every})")
    if m.score_func not in SCORE_FUNCS:
        _fail(f"{prefix}.score_func={m.score_func!r} must be one of {SCORE_FUNCS}")
    if m.n_groups < 1 or m.n_experts % m.n_groups != 0:
        _fail(f"{prefix}.n_groups={m.n_groups} must divide {prefix}.n_experts={m.n_experts}")
    if m.topk_groups < 1 or m.topk_groups > m.n_groups:
        _fail(f"{prefix}.topk_groups={m.topk_groups} must be between 1 and {prefix}.n_groups={m.n_groups}")
    if m.n_groups > 1:
        per_group = m.n_experts // m.n_groups
        if per_group < 2:
            _fail(f"{prefix}.n_groups={m.n_groups} leaves {per_group} expert per group; group scores "
                  "sum each group's top-2, so each group needs >= 2 experts")
        if m.top_k > m.topk_groups * per_group:
            _fail(f"{prefix}.top_k={m.top_k} exceeds the experts in {prefix}.topk_groups="
                  f"{m.topk_groups} groups ({m.topk_groups * per_group})")
    if m.route_scale <= 0:
        _fail(f"{prefix}.route_scale={m.route_scale} must be > 0")
    for key in ("bias_update_rate", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
        if getattr(m, key) < 0:
            _fail(f"{prefix}.{key}={getattr(m, key)} must be >= 0")
    if m.drop_policy not in DROP_POLICIES:
        _fail(f"{prefix}.drop_policy={m.drop_policy!r} must be one of {DROP_POLICIES}")
    if m.experts_impl not in ("auto", "grouped_mm", "loop", "padded"):
        _fail(f"{prefix}.experts_impl={m.experts_impl!r} must be one of auto, grouped_mm, loop, padded")
