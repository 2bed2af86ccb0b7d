"""Which keys of two model configs change the architecture (pure): what ``model.init_from`` checks
between ``model=`` and the HF directory's config.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig


def architecture_view(cfg: ModelConfig) -> Dict[str, Any]:
    """The resolved values that decide the weights' shapes and the forward's math, by key name.
    Run-time knobs (kernel backend, expert kernel, balancing rates, loss coefficients, capacity,
    init) are not in it."""
    from model.config import gqa_head_dim, layer_is_moe, layer_kinds, layer_windows

    a, r, m = cfg.attention, cfg.rope, cfg.moe
    kinds, windows, moes = layer_kinds(cfg), layer_windows(cfg), layer_is_moe(cfg)
    v: Dict[str, Any] = {
        "model.vocab_size": cfg.vocab_size, "model.d_model": cfg.d_model, "model.n_layers": cfg.n_layers,
        "model.norm_eps": float(cfg.norm_eps), "model.norm_placement": cfg.norm_placement,
        "model.tie_embeddings": bool(cfg.tie_embeddings), "model.embed_scale": bool(cfg.embed_scale),
        "model.attention.layer_kinds": kinds, "model.attention.n_heads": a.n_heads,
        "model.attention.qk_norm": bool(a.qk_norm), "model.attention.bias": bool(a.bias),
        "model.attention.layer_windows": windows, "model.rope.theta": float(r.theta),
        "model.rope.yarn_factor": float(r.yarn_factor), "model.moe.n_experts": m.n_experts,
    }
    if not all(moes):
        v["model.ffn_dim"] = cfg.ffn_dim
        v["model.ffn_activation"] = cfg.ffn_activation
    if a.qk_norm and "gqa" in kinds:
        v["model.attention.qk_norm_scope"] = a.qk_norm_scope
    if "gqa" in kinds:
        v["model.attention.n_kv_heads"] = a.n_kv_heads
        v["model.attention.head_dim"] = gqa_head_dim(cfg)
    if "mla" in kinds:
        for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v[f"model.attention.{k}"] = getattr(a, k)
    if any(windows):
        v["model.rope.local_theta"] = float(r.local_theta or r.theta)
    if r.yarn_factor > 1:
        for k in ("yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim"):
            v[f"model.rope.{k}"] = getattr(r, k)
    if m.n_experts > 0:
        v["model.moe (MoE layers)"] = [i for i, x in enumerate(moes) if x]
        for k in ("top_k", "expert_dim", "n_shared_experts", "score_func", "norm_topk_prob", "route_scale",
                  "n_groups", "topk_groups"):
            v[f"model.moe.{k}"] = getattr(m, k)
    return v


def architecture_mismatches(given: ModelConfig, expected: ModelConfig) -> List[str]:
    """``"key=<given> (config.json: <expected>)"`` for each architecture key that differs."""
    g, e = architecture_view(given), architecture_view(expected)
    out = []
    for key in sorted(set(g) | set(e)):
        gv, ev = g.get(key, "-"), e.get(key, "-")
        if isinstance(gv, float) and isinstance(ev, float) and abs(gv - ev) <= 1e-9 * max(1.0, abs(ev)):
            continue
        if gv != ev:
            out.append(f"{key}={gv} (config.json: {ev})")
    return out
