"""Which transformers class expresses a config of ours (export), and which mapping reads a
config.json (import)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from checkpointing.hf.deepseek_v3 import DeepseekV3
from checkpointing.hf.dense import Llama, Mistral, Qwen3
from checkpointing.hf.family import Family, windows_of
from checkpointing.hf.gemma3 import Gemma3
from checkpointing.hf.mapping import refuse, refuse_import
from checkpointing.hf.olmo2 import Olmo2
from checkpointing.hf.qwen3_moe import Qwen3Moe

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig

FAMILIES: Dict[str, Family] = {f.model_type: f for f in (Llama(), Mistral(), Qwen3(), Qwen3Moe(), Gemma3(),
                                                           Olmo2(), DeepseekV3())}


def for_model(cfg: ModelConfig) -> Family:
    """The one class that can express ``cfg``, chosen by its structure; its ``check`` then refuses the
    details it cannot express."""
    from model.config import layer_kinds

    kinds = set(layer_kinds(cfg))
    moe = cfg.moe.n_experts > 0
    if kinds == {"mla"} and moe:
        fam = FAMILIES["deepseek_v3"]
    elif kinds == {"gqa"} and moe:
        fam = FAMILIES["qwen3_moe"]
    elif kinds == {"gqa"}:
        if cfg.norm_placement == "pre+post":
            fam = FAMILIES["gemma3_text"]
        elif cfg.norm_placement == "post":
            fam = FAMILIES["olmo2"]
        elif cfg.attention.qk_norm:
            fam = FAMILIES["qwen3"]
        elif any(windows_of(cfg)):
            fam = FAMILIES["mistral"]
        else:
            fam = FAMILIES["llama"]
    else:
        refuse(f"attention kinds {sorted(kinds)} with model.moe.n_experts={cfg.moe.n_experts}: no transformers class "
               "mixes MLA and GQA layers or has dense MLA; supported are "
               + ", ".join(f.hf_class for f in FAMILIES.values()))
    fam.check(cfg)
    return fam


def for_hf_config(hf: Dict[str, Any]) -> Family:
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        hint = " (a multimodal Gemma 3: use its text model, model_type gemma3_text)" if mt == "gemma3" else ""
        refuse_import(f"model_type={mt!r}{hint}; supported are {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]
