"""Dense pre-norm GQA families: ``LlamaForCausalLM`` (no windows, no QK-norm),
``MistralForCausalLM`` (one sliding window on every layer), ``Qwen3ForCausalLM`` (per-head QK-norm,
optional sliding windows on any layers through ``layer_types``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from checkpointing.hf.family import Family, check_plain, gqa_config_json, gqa_model_config, one_window, windows_of
from checkpointing.hf.mapping import BASE_RULES, GQA_RULES, PRE_NORM_RULES, check_act, refuse, refuse_import

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig

DENSE_RULES = BASE_RULES + PRE_NORM_RULES + GQA_RULES


def _check_dense(cfg, who: str) -> None:
    if cfg.moe.n_experts > 0:
        refuse(f"model.moe.n_experts={cfg.moe.n_experts}: {who} is dense")


class Llama(Family):
    hf_class, model_type, rules = "LlamaForCausalLM", "llama", DENSE_RULES

    def check(self, cfg: ModelConfig) -> None:
        _check_dense(cfg, self.hf_class)
        check_plain(cfg, self.hf_class)
        if any(windows_of(cfg)):
            refuse(f"sliding-window layers {windows_of(cfg)}: {self.hf_class} attends to full context")

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        out = gqa_config_json(cfg, dtype, self.hf_class, self.model_type)
        out["mlp_bias"] = False
        return out

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        check_act(hf)
        if hf.get("mlp_bias"):
            refuse_import("mlp_bias=true: our MLP has no biases")
        return gqa_model_config(hf)


class Mistral(Family):
    hf_class, model_type, rules = "MistralForCausalLM", "mistral", DENSE_RULES

    def check(self, cfg: ModelConfig) -> None:
        _check_dense(cfg, self.hf_class)
        check_plain(cfg, self.hf_class)
        w = windows_of(cfg)
        if len(set(w)) != 1 or w[0] == 0:
            refuse(f"layer windows {w}: {self.hf_class} has one sliding window on every layer")
        if cfg.attention.bias:
            refuse(f"model.attention.bias=true: {self.hf_class} has no attention biases")

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        out = gqa_config_json(cfg, dtype, self.hf_class, self.model_type)
        del out["attention_bias"]
        out["sliding_window"] = windows_of(cfg)[0]
        return out

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        check_act(hf)
        cfg = gqa_model_config({**hf, "attention_bias": False})
        cfg.attention.window = int(hf.get("sliding_window") or 0)
        return cfg


class Qwen3(Family):
    hf_class, model_type, rules = "Qwen3ForCausalLM", "qwen3", DENSE_RULES

    def check(self, cfg: ModelConfig) -> None:
        _check_dense(cfg, self.hf_class)
        check_plain(cfg, self.hf_class, qk_norm="head")
        one_window(cfg, self.hf_class)

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        out = gqa_config_json(cfg, dtype, self.hf_class, self.model_type)
        w = one_window(cfg, self.hf_class)
        out.update({"use_sliding_window": bool(w), "sliding_window": w or None,
                    "max_window_layers": cfg.n_layers,
                    "layer_types": ["sliding_attention" if x else "full_attention" for x in windows_of(cfg)]})
        return out

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        check_act(hf)
        cfg = gqa_model_config(hf, attention={"qk_norm": True})
        # transformers: sliding_window counts only with use_sliding_window; without layer_types the
        # layers from max_window_layers on are the windowed ones.
        window = int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window", False) else 0
        n = cfg.n_layers
        types = hf.get("layer_types") or [
            "sliding_attention" if window and i >= int(hf.get("max_window_layers", n)) else "full_attention"
            for i in range(n)]
        if len(types) != n:
            refuse_import(f"layer_types has {len(types)} entries for {n} layers")
        cfg.attention.layer_windows = [window if t == "sliding_attention" else 0 for t in types]
        return cfg
