"""What every architecture mapping provides, and the checks and config keys the GQA families share.

A family is exact or refuses: ``check`` names every key of ours the target class cannot express;
``model_config`` (import) names every HF key our model cannot express.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from checkpointing.hf.mapping import Rule, Source, refuse, refuse_import, rope_parameters, rule_source

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig


class Family(ABC):
    hf_class: str = ""
    model_type: str = ""
    rules: List[Rule] = []

    @abstractmethod
    def check(self, cfg: ModelConfig) -> None:
        """Refuse (``ExportRefused``) anything of ``cfg`` this class cannot express exactly."""

    @abstractmethod
    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        """HF's config.json for ``cfg`` (``check`` has passed)."""

    @abstractmethod
    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        """Our ``ModelConfig`` from HF's config.json dict (refuses what we cannot express)."""

    def source(self, name: str) -> Source:
        return rule_source(name, self.rules)

    def import_source(self, name: str, hf: Dict[str, Any]) -> Source:
        """The source of our ``name`` when reading a directory with config ``hf`` (a family whose
        HF layout has variants, e.g. DeepSeek-V3's interleaved RoPE, rewrites it here)."""
        return self.source(name)

    def sources(self, names) -> Dict[str, Source]:
        return {n: self.source(n) for n in names}


# -- shared checks (export) -----------------------------------------------------------------------
def windows_of(cfg: ModelConfig) -> List[int]:
    from model.config import layer_windows

    return layer_windows(cfg)


def check_plain(cfg: ModelConfig, who: str, *, embed_scale: bool = False, activation: str = "silu",
                norm_placement: str = "pre", qk_norm: Optional[str] = None, local_theta: bool = False) -> None:
    """The details each family fixes: embedding scale, FFN activation, norm placement, QK-norm
    (None = none; "head" / "projection" = required with that scope)."""
    if cfg.embed_scale != embed_scale:
        refuse(f"model.embed_scale={cfg.embed_scale}: {who} " + ("always scales" if embed_scale else "never scales")
               + " the embeddings by sqrt(d_model)")
    if cfg.ffn_activation != activation:
        refuse(f"model.ffn_activation={cfg.ffn_activation!r}: {who} uses {activation!r}")
    if cfg.norm_placement != norm_placement:
        refuse(f"model.norm_placement={cfg.norm_placement!r}: {who} is {norm_placement!r}")
    a = cfg.attention
    if qk_norm is None and a.qk_norm:
        refuse(f"model.attention.qk_norm=true: {who} has no QK-norm")
    if qk_norm is not None:
        if not a.qk_norm:
            refuse(f"model.attention.qk_norm=false: {who} always has QK-norm")
        if a.qk_norm_scope != qk_norm:
            refuse(f"model.attention.qk_norm_scope={a.qk_norm_scope!r}: {who} normalises over the {qk_norm}")
    if not local_theta and cfg.rope.local_theta > 0 and any(windows_of(cfg)) and cfg.rope.local_theta != cfg.rope.theta:
        refuse(f"model.rope.local_theta={cfg.rope.local_theta}: {who} has one RoPE base for every layer")


def one_window(cfg: ModelConfig, who: str) -> int:
    """The single sliding window of the windowed layers (0 if none); refuses several sizes."""
    sizes = sorted(set(w for w in windows_of(cfg) if w > 0))
    if len(sizes) > 1:
        refuse(f"layer windows {sizes}: {who} has one sliding_window for all windowed layers")
    return sizes[0] if sizes else 0


def gqa_config_json(cfg: ModelConfig, dtype: str, architecture: str, model_type: str) -> Dict[str, Any]:
    from model.config import gqa_head_dim

    a = cfg.attention
    return {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": gqa_head_dim(cfg),
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters(cfg.rope), "rope_theta": float(cfg.rope.theta),
        "attention_bias": bool(a.bias), "attention_dropout": 0.0,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "initializer_range": cfg.init_std,
        "dtype": dtype, "torch_dtype": dtype, "use_cache": True,
    }


# -- shared import ------------------------------------------------------------------------------
def gqa_model_config(hf: Dict[str, Any], **overrides) -> ModelConfig:
    """``ModelConfig`` of a dense GQA model from the keys every GQA family shares."""
    from checkpointing.hf.mapping import rope_from_hf
    from model.config import AttentionConfig, ModelConfig

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            refuse_import(f"config.json has no {key!r}")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or d // heads
    attn = AttentionConfig(kind="gqa", n_heads=heads, n_kv_heads=int(hf.get("num_key_value_heads") or heads),
                           head_dim=None if head_dim * heads == d else int(head_dim),
                           bias=bool(hf.get("attention_bias", False)))
    rope = overrides.pop("rope", None) or rope_from_hf(hf)
    attn_over = overrides.pop("attention", {})
    for k, v in attn_over.items():
        setattr(attn, k, v)
    cfg = ModelConfig(name=f"hf-{hf.get('model_type', 'model')}", vocab_size=int(hf["vocab_size"]), d_model=d,
                      n_layers=int(hf["num_hidden_layers"]), ffn_dim=int(hf["intermediate_size"]),
                      max_seq_len=int(hf.get("max_position_embeddings", 4096)),
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      init_std=float(hf.get("initializer_range", 0.02)), attention=attn, rope=rope)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def hf_window_layers(hf: Dict[str, Any], n_layers: int) -> List[int]:
    """Per-layer windows from ``layer_types`` + ``sliding_window`` (0 = full attention)."""
    types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if not types:
        return [int(window or 0)] * n_layers
    if len(types) != n_layers:
        refuse_import(f"layer_types has {len(types)} entries for {n_layers} layers")
    out = []
    for t in types:
        if t == "full_attention":
            out.append(0)
        elif t == "sliding_attention":
            if not window:
                refuse_import("layer_types has sliding_attention but sliding_window is null")
            out.append(int(window))
        else:
            refuse_import(f"layer type {t!r}: supported are full_attention and sliding_attention")
    return out
