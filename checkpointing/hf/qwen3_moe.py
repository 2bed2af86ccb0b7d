"""``Qwen3MoeForCausalLM``: pre-norm GQA with per-head QK-norm, softmax routing over routed experts
only (no shared expert, no group limit, no scaling), ``norm_topk_prob``; dense layers are
``mlp_only_layers``; one sliding window on every layer or none."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from checkpointing.hf.family import Family, check_plain, gqa_config_json, gqa_model_config, windows_of
from checkpointing.hf.mapping import (BASE_RULES, EXPERT_RULES, GQA_RULES, PRE_NORM_RULES, Zero, check_act, refuse,
                                      refuse_import)

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig


class Qwen3Moe(Family):
    hf_class, model_type = "Qwen3MoeForCausalLM", "qwen3_moe"
    rules = BASE_RULES + PRE_NORM_RULES + GQA_RULES + EXPERT_RULES + [
        (r"layers\.(\d+)\.ffn\.router\.gate\.weight", r"model.layers.\1.mlp.gate.weight"),
        (r"layers\.(\d+)\.ffn\.router\.expert_bias",
         lambda m: Zero("Qwen3MoeForCausalLM selects experts on the unbiased softmax scores "
                        "(train with model.moe.bias_update_rate=0)")),
    ]

    def check(self, cfg: ModelConfig) -> None:
        from model.config import layer_is_moe

        who, m = self.hf_class, cfg.moe
        check_plain(cfg, who, qk_norm="head")
        if m.n_experts < 1:
            refuse(f"model.moe.n_experts=0: {who} is a MoE (a dense model exports as Qwen3ForCausalLM)")
        if m.score_func != "softmax":
            refuse(f"model.moe.score_func={m.score_func!r}: {who} routes with softmax scores")
        if m.n_shared_experts:
            refuse(f"model.moe.n_shared_experts={m.n_shared_experts}: {who} has no shared experts")
        if m.n_groups != 1:
            refuse(f"model.moe.n_groups={m.n_groups}: {who} has no group-limited routing")
        if m.route_scale != 1.0:
            refuse(f"model.moe.route_scale={m.route_scale}: {who} does not scale the gate values")
        if m.capacity_factor > 0:
            refuse(f"model.moe.capacity_factor={m.capacity_factor}: {who} is dropless")
        w = windows_of(cfg)
        if len(set(w)) != 1:
            refuse(f"layer windows {w}: {who} has one sliding window on every layer or none")
        if not any(layer_is_moe(cfg)):
            refuse(f"no MoE layer: {who} needs at least one")

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        from model.config import layer_is_moe

        m = cfg.moe
        out = gqa_config_json(cfg, dtype, self.hf_class, self.model_type)
        w = windows_of(cfg)[0]
        out.update({
            "num_experts": m.n_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.expert_dim,
            "norm_topk_prob": bool(m.norm_topk_prob), "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(layer_is_moe(cfg)) if not moe],
            "use_sliding_window": bool(w), "sliding_window": w or None, "max_window_layers": cfg.n_layers,
            "router_aux_loss_coef": float(m.aux_loss_coef), "output_router_logits": False,
        })
        return out

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        from model.config import layer_is_moe
        from moe.config import MoEConfig

        check_act(hf)
        # transformers 5 stores num_experts as num_local_experts (an attribute alias).
        hf = {**hf, "num_experts": hf.get("num_experts", hf.get("num_local_experts"))}
        if hf["num_experts"] is None:
            refuse_import("config.json has neither num_experts nor num_local_experts")
        n = int(hf["num_hidden_layers"])
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers") or [])
        want = [i not in dense and int(hf["num_experts"]) > 0 and (i + 1) % step == 0 for i in range(n)]
        window = int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window", False) else 0
        moe = MoEConfig(n_experts=int(hf["num_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        expert_dim=int(hf["moe_intermediate_size"]), score_func="softmax",
                        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))
        cfg = gqa_model_config(hf, attention={"qk_norm": True, "window": window}, moe=moe)
        # Our pattern is "dense for the first k, then every n-th": find the (k, n) that gives HF's.
        for k in range(n + 1):
            for every in range(1, n + 1):
                moe.first_k_dense, moe.moe_every = k, every
                if layer_is_moe(cfg) == want:
                    return cfg
        refuse_import(f"MoE layers {[i for i, x in enumerate(want) if x]}: our model makes the layers after "
                      "model.moe.first_k_dense MoE every model.moe.moe_every-th; this pattern is not one of those")
