"""``DeepseekV3ForCausalLM``: every layer MLA, sigmoid routing with the selection bias as
``e_score_correction_bias``, group-limited top-k, shared experts, the first ``first_k_dense_replace``
layers dense and every later one MoE, ``rope_interleave=False`` (our RoPE is rotate_half)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from checkpointing.hf.family import Family, check_plain, windows_of
from checkpointing.hf.mapping import (BASE_RULES, EXPERT_RULES, PRE_NORM_RULES, Same, Source, check_act, refuse,
                                      refuse_import, rope_from_hf, rope_parameters)

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig

# HF builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps.
MLA_NORM_EPS = 1e-6


class DeepseekV3(Family):
    hf_class, model_type = "DeepseekV3ForCausalLM", "deepseek_v3"
    rules = BASE_RULES + PRE_NORM_RULES + EXPERT_RULES + [
        (r"layers\.(\d+)\.attention\.wq\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
        (r"layers\.(\d+)\.attention\.wq_a\.(weight|bias)", r"model.layers.\1.self_attn.q_a_proj.\2"),
        (r"layers\.(\d+)\.attention\.q_norm\.weight", r"model.layers.\1.self_attn.q_a_layernorm.weight"),
        (r"layers\.(\d+)\.attention\.wq_b\.weight", r"model.layers.\1.self_attn.q_b_proj.weight"),
        (r"layers\.(\d+)\.attention\.wkv_a\.(weight|bias)", r"model.layers.\1.self_attn.kv_a_proj_with_mqa.\2"),
        (r"layers\.(\d+)\.attention\.kv_norm\.weight", r"model.layers.\1.self_attn.kv_a_layernorm.weight"),
        (r"layers\.(\d+)\.attention\.wkv_b\.weight", r"model.layers.\1.self_attn.kv_b_proj.weight"),
        (r"layers\.(\d+)\.attention\.wo\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
        (r"layers\.(\d+)\.ffn\.router\.gate\.weight", r"model.layers.\1.mlp.gate.weight"),
        (r"layers\.(\d+)\.ffn\.router\.expert_bias", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
        (r"layers\.(\d+)\.ffn\.shared\.w1\.weight", r"model.layers.\1.mlp.shared_experts.gate_proj.weight"),
        (r"layers\.(\d+)\.ffn\.shared\.w3\.weight", r"model.layers.\1.mlp.shared_experts.up_proj.weight"),
        (r"layers\.(\d+)\.ffn\.shared\.w2\.weight", r"model.layers.\1.mlp.shared_experts.down_proj.weight"),
    ]

    def import_source(self, name: str, hf: Dict[str, Any]) -> Source:
        """``rope_interleave=true`` (DeepSeek's own checkpoints): the rotary dims of each head come in
        pairs ``(x0, x1), (x2, x3), ...``; HF de-interleaves them (evens, then odds) before a
        rotate_half RoPE. Permuting the rows that produce them (q's rotary part per head, the shared
        rotary key) the same way gives our rotate_half layout exactly: scores are unchanged."""
        src = self.source(name)
        if not hf.get("rope_interleave", True) or not isinstance(src, Same):
            return src
        r, n, heads = int(hf["qk_rope_head_dim"]), int(hf["qk_nope_head_dim"]), int(hf["num_attention_heads"])
        deinterleave = list(range(0, r, 2)) + list(range(1, r, 2))
        if src.name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            rows = [h * (n + r) + (j if j < n else n + deinterleave[j - n]) for h in range(heads)
                    for j in range(n + r)]
            return Same(src.name, rows=tuple(rows))
        if src.name.endswith("self_attn.kv_a_proj_with_mqa.weight") or src.name.endswith("kv_a_proj_with_mqa.bias"):
            kv = int(hf["kv_lora_rank"])
            return Same(src.name, rows=tuple(list(range(kv)) + [kv + j for j in deinterleave]))
        return src

    def check(self, cfg: ModelConfig) -> None:
        from model.config import layer_is_moe

        who, m = self.hf_class, cfg.moe
        check_plain(cfg, who)
        if any(windows_of(cfg)):
            refuse(f"sliding-window layers {windows_of(cfg)}: {who} attends to full context")
        if m.score_func != "sigmoid":
            refuse(f"model.moe.score_func={m.score_func!r}: {who} routes with sigmoid scores")
        if layer_is_moe(cfg) != [i >= m.first_k_dense for i in range(cfg.n_layers)]:
            refuse(f"model.moe.moe_every={m.moe_every}: {who} makes every layer after first_k_dense_replace MoE")
        if m.n_shared_experts < 1:
            refuse(f"model.moe.n_shared_experts=0: {who} always has shared experts")
        if m.n_experts % m.n_groups or m.n_experts // m.n_groups < 2:
            refuse(f"model.moe.n_groups={m.n_groups}: {who} needs >= 2 experts per group")
        if m.capacity_factor > 0:
            refuse(f"model.moe.capacity_factor={m.capacity_factor}: {who} is dropless")
        if abs(cfg.norm_eps - MLA_NORM_EPS) > 1e-12:
            refuse(f"model.norm_eps={cfg.norm_eps:g}: {who}'s MLA-internal norms (q_a_layernorm, "
                   f"kv_a_layernorm) always use eps {MLA_NORM_EPS:g}")

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        a, m = cfg.attention, cfg.moe
        return {
            "architectures": [self.hf_class], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
            "moe_intermediate_size": m.expert_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_heads,
            "n_shared_experts": m.n_shared_experts, "n_routed_experts": m.n_experts,
            "num_experts_per_tok": m.top_k, "routed_scaling_factor": float(m.route_scale),
            "n_group": m.n_groups, "topk_group": m.topk_groups, "norm_topk_prob": bool(m.norm_topk_prob),
            "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "first_k_dense_replace": m.first_k_dense,
            "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank or None,
            "qk_rope_head_dim": a.qk_rope_head_dim, "qk_nope_head_dim": a.qk_nope_head_dim,
            "v_head_dim": a.v_head_dim, "rope_interleave": False, "attention_bias": bool(a.bias),
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": rope_parameters(cfg.rope), "rope_theta": float(cfg.rope.theta),
            "tie_word_embeddings": bool(cfg.tie_embeddings), "initializer_range": cfg.init_std,
            "num_nextn_predict_layers": 0, "dtype": dtype, "torch_dtype": dtype, "use_cache": True,
        }

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        from model.config import AttentionConfig, ModelConfig
        from moe.config import MoEConfig

        check_act(hf)
        if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
            refuse_import(f"scoring_func={hf.get('scoring_func')!r} topk_method={hf.get('topk_method')!r}: "
                          "supported is sigmoid with noaux_tc")
        eps = float(hf.get("rms_norm_eps", 1e-6))
        if abs(eps - MLA_NORM_EPS) > 1e-12:
            refuse_import(f"rms_norm_eps={eps:g}: our MLA-internal norms use the model's eps, HF's use {MLA_NORM_EPS:g}")
        attn = AttentionConfig(kind="mla", n_heads=int(hf["num_attention_heads"]),
                               n_kv_heads=int(hf["num_attention_heads"]), q_lora_rank=int(hf.get("q_lora_rank") or 0),
                               kv_lora_rank=int(hf["kv_lora_rank"]), qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
                               qk_rope_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]),
                               bias=bool(hf.get("attention_bias", False)))
        moe = MoEConfig(n_experts=int(hf["n_routed_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        expert_dim=int(hf["moe_intermediate_size"]), n_shared_experts=int(hf.get("n_shared_experts", 1)),
                        first_k_dense=int(hf.get("first_k_dense_replace", 0)), score_func="sigmoid",
                        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                        route_scale=float(hf.get("routed_scaling_factor", 1.0)), n_groups=int(hf.get("n_group", 1)),
                        topk_groups=int(hf.get("topk_group", 1)))
        return ModelConfig(name="hf-deepseek_v3", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
                           n_layers=int(hf["num_hidden_layers"]), ffn_dim=int(hf["intermediate_size"]),
                           max_seq_len=int(hf.get("max_position_embeddings", 4096)), norm_eps=eps,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           init_std=float(hf.get("initializer_range", 0.02)), attention=attn,
                           rope=rope_from_hf(hf), moe=moe)
