"""Typed configuration of the transformer (Hydra group ``configs/model/``).

The tree mirrors the module tree: ``ModelConfig`` holds an ``AttentionConfig``, a ``RopeConfig``
and a ``MoEConfig`` (from ``moe.config``). ``validate_model_config`` holds every cross-field rule;
messages name the key and the fix so a Hydra user can act on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from moe.config import ConfigError, MoEConfig, validate_moe_config

ATTENTION_KINDS = ("gqa", "mla")
NORM_PLACEMENTS = ("pre", "pre+post", "post")
FFN_ACTIVATIONS = ("silu", "gelu_tanh")
QK_NORM_SCOPES = ("head", "projection")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "varlen", "cudnn", "eager")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # YaRN context extension as in DeepSeek-V3 (``rope_scaling.type: yarn``); factor 1 disables it.
    yarn_factor: float = 1.0
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    # RoPE base of the sliding-window layers (Gemma 3: 10k local, 1M global); 0 = ``theta`` everywhere.
    local_theta: float = 0.0


@dataclass
class AttentionConfig:
    # Kind of every layer unless ``layer_kinds`` lists one per layer ("gqa" or "mla").
    kind: str = "gqa"
    layer_kinds: Optional[List[str]] = None
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: Optional[int] = None  # default d_model // n_heads (gqa only)
    qk_norm: bool = False
    # "head": one RMSNorm over each head's dim, shared by the heads (Qwen3, Gemma 3); "projection":
    # over the whole q (and k) projection, all heads at once (OLMo 2).
    qk_norm_scope: str = "head"
    bias: bool = False
    # MLA (DeepSeek-V2/V3); q_lora_rank 0 means a plain q projection.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Sliding windows: ``window`` > 0 makes layers local except every ``global_every``-th
    # (1-based: layer i is global when (i + 1) % global_every == 0; 0 = all layers local).
    # ``layer_windows`` (one int per layer, 0 = full causal) overrides the pattern.
    window: int = 0
    global_every: int = 0
    layer_windows: Optional[List[int]] = None
    # Kernel seam: auto picks SDPA for full causal, FlexAttention on GPU for windows and head dims
    # SDPA cannot take, SDPA with a materialised mask on CPU.
    backend: str = "auto"


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    ffn_dim: int = 512  # dense SwiGLU hidden size
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    # "pre"; "pre+post" (Gemma 3 sandwich: also a norm on each sub-layer's output); "post" (OLMo 2:
    # only the norm on each sub-layer's output, none on its input).
    norm_placement: str = "pre"
    # Multiply the token embeddings by sqrt(d_model) (Gemma); the output head is unscaled.
    embed_scale: bool = False
    # Gate activation of the dense FFN: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma). Experts: SiLU.
    ffn_activation: str = "silu"
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Initialise from a Hugging Face directory (local or s3://) instead of the seed; empty = off.
    # Read by train/ through checkpointing/hf/ (docs/checkpointing.md); the model never opens it.
    init_from: str = ""
    # Sparse upcycling: a dense HF model's MLP copied into every expert (and the shared expert) of
    # this MoE model, everything else as init_from; the routers keep their seeded init.
    init_from_dense: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def layer_kinds(cfg: ModelConfig) -> List[str]:
    """Attention kind of each layer."""
    a = cfg.attention
    if a.layer_kinds is not None:
        return list(a.layer_kinds)
    return [a.kind] * cfg.n_layers


def layer_windows(cfg: ModelConfig) -> List[int]:
    """Sliding window of each layer; 0 means full causal attention."""
    a = cfg.attention
    if a.layer_windows is not None:
        return [int(w) for w in a.layer_windows]
    if a.window <= 0:
        return [0] * cfg.n_layers
    if a.global_every <= 0:
        return [a.window] * cfg.n_layers
    return [0 if (i + 1) % a.global_every == 0 else a.window for i in range(cfg.n_layers)]


def layer_is_moe(cfg: ModelConfig) -> List[bool]:
    """Whether each layer's FFN is MoE: dense for the first ``first_k_dense``, then every n-th."""
    m = cfg.moe
    if m.n_experts <= 0:
        return [False] * cfg.n_layers
    every = max(1, m.moe_every)
    return [i >= m.first_k_dense and (i - m.first_k_dense) % every == 0 for i in range(cfg.n_layers)]


def gqa_head_dim(cfg: ModelConfig) -> int:
    a = cfg.attention
    return a.head_dim if a.head_dim else cfg.d_model // a.n_heads


def validate_model_config(cfg: ModelConfig) -> None:
    """Every rule a model config must satisfy; raises ConfigError naming the key and the fix."""
    a = cfg.attention
    for key in ("vocab_size", "d_model", "n_layers", "ffn_dim", "max_seq_len"):
        if getattr(cfg, key) < 1:
            _fail(f"model.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.norm_placement not in NORM_PLACEMENTS:
        _fail(f"model.norm_placement={cfg.norm_placement!r} must be one of {NORM_PLACEMENTS}")
    if cfg.ffn_activation not in FFN_ACTIVATIONS:
        _fail(f"model.ffn_activation={cfg.ffn_activation!r} must be one of {FFN_ACTIVATIONS}")
    if a.qk_norm_scope not in QK_NORM_SCOPES:
        _fail(f"model.attention.qk_norm_scope={a.qk_norm_scope!r} must be one of {QK_NORM_SCOPES}")
    if a.backend not in ATTENTION_BACKENDS:
        _fail(f"model.attention.backend={a.backend!r} must be one of {ATTENTION_BACKENDS}")
    if a.n_heads < 1:
        _fail(f"model.attention.n_heads={a.n_heads} must be >= 1")
    kinds = layer_kinds(cfg)
    if len(kinds) != cfg.n_layers:
        _fail(f"model.attention.layer_kinds has {len(kinds)} entries; it needs one per layer "
              f"(model.n_layers={cfg.n_layers})")
    for k in kinds:
        if k not in ATTENTION_KINDS:
            _fail(f"model.attention.layer_kinds entry {k!r} must be one of {ATTENTION_KINDS}")
    if a.kind not in ATTENTION_KINDS:
        _fail(f"model.attention.kind={a.kind!r} must be one of {ATTENTION_KINDS}")
    if "gqa" in kinds:
        if a.n_kv_heads < 1 or a.n_heads % a.n_kv_heads != 0:
            _fail(f"model.attention.n_kv_heads={a.n_kv_heads} must divide "
                  f"model.attention.n_heads={a.n_heads}")
        if a.head_dim is None and cfg.d_model % a.n_heads != 0:
            _fail(f"model.d_model={cfg.d_model} must be divisible by model.attention.n_heads="
                  f"{a.n_heads}, or set model.attention.head_dim")
        if gqa_head_dim(cfg) % 2 != 0:
            _fail(f"attention head dim {gqa_head_dim(cfg)} must be even for RoPE: "
                  "set model.attention.head_dim to an even number")
    if "mla" in kinds:
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(a, key) < 1:
                _fail(f"model.attention.{key}={getattr(a, key)}: MLA layers need it >= 1 "
                      "(set it in the model preset)")
        if a.qk_rope_head_dim % 2 != 0:
            _fail(f"model.attention.qk_rope_head_dim={a.qk_rope_head_dim} must be even for RoPE")
        if a.q_lora_rank < 0:
            _fail(f"model.attention.q_lora_rank={a.q_lora_rank} must be >= 0 (0 = plain q projection)")
    windows = layer_windows(cfg)
    if len(windows) != cfg.n_layers:
        _fail(f"model.attention.layer_windows has {len(windows)} entries; it needs one per layer "
              f"(model.n_layers={cfg.n_layers})")
    if a.window < 0:
        _fail(f"model.attention.window={a.window} must be >= 1 for sliding-window layers "
              "(or 0 for full causal)")
    if any(w < 0 for w in windows):
        _fail(f"model.attention.layer_windows={windows}: each window must be >= 1 (or 0 for full causal)")
    if a.global_every < 0:
        _fail(f"model.attention.global_every={a.global_every} must be >= 0")
    if cfg.rope.theta <= 0:
        _fail(f"model.rope.theta={cfg.rope.theta} must be > 0")
    if cfg.rope.local_theta < 0:
        _fail(f"model.rope.local_theta={cfg.rope.local_theta} must be > 0 (or 0 = model.rope.theta)")
    if cfg.rope.yarn_factor < 1:
        _fail(f"model.rope.yarn_factor={cfg.rope.yarn_factor} must be >= 1 (1 disables YaRN)")
    validate_moe_config(cfg.moe, prefix="model.moe")
