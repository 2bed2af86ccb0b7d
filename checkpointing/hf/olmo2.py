"""``Olmo2ForCausalLM``: post-norm (a norm on each sub-layer's output, none on its input) with
QK-norm over the whole q and k projections, full causal attention."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from checkpointing.hf.family import Family, check_plain, gqa_config_json, gqa_model_config, windows_of
from checkpointing.hf.mapping import BASE_RULES, GQA_RULES, check_act, refuse

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig


class Olmo2(Family):
    hf_class, model_type = "Olmo2ForCausalLM", "olmo2"
    rules = BASE_RULES + GQA_RULES + [
        (r"layers\.(\d+)\.post_attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"layers\.(\d+)\.post_ffn_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
    ]

    def check(self, cfg: ModelConfig) -> None:
        if cfg.moe.n_experts > 0:
            refuse(f"model.moe.n_experts={cfg.moe.n_experts}: {self.hf_class} is dense")
        check_plain(cfg, self.hf_class, norm_placement="post", qk_norm="projection")
        if any(windows_of(cfg)):
            refuse(f"sliding-window layers {windows_of(cfg)}: {self.hf_class} attends to full context")

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        return gqa_config_json(cfg, dtype, self.hf_class, self.model_type)

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        check_act(hf)
        return gqa_model_config(hf, attention={"qk_norm": True, "qk_norm_scope": "projection"},
                                norm_placement="post")
