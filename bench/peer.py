"""The Hugging Face transformers peer of a preset: the same geometry, built from our ModelConfig.

- dense GQA (llama_1b)          -> ``LlamaForCausalLM``, config from ``checkpointing.export.llama_config``
- MLA + MoE (dsv3_mini)         -> ``DeepseekV3ForCausalLM``, from ``deepseek_v3_config``
- Gemma-3 style (gemma3_swa_1b) -> ``Gemma3ForCausalLM`` / ``Gemma3TextConfig``, from
  :func:`gemma3_text_config` below (export refuses sliding windows; a benchmark only needs shapes).

``attn_implementation="sdpa"``; routed experts ask for transformers' grouped-GEMM experts
(``experts_implementation="grouped_mm"``, a ``from_config`` keyword in transformers 5.x: read in
the 5.17.0 and 5.23.0 sources). If that request raises, the model is built with the default and
the reason is recorded, never hidden. transformers is imported inside the functions, so
``python -m bench`` neither needs it nor pays for importing it.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from model.config import ModelConfig, gqa_head_dim, layer_kinds, layer_windows


class PeerConfigError(ValueError):
    """Our config has something the peer architecture cannot express."""


def gemma3_text_config(cfg: ModelConfig) -> Dict[str, Any]:
    """``Gemma3TextConfig`` kwargs for a Gemma-3 style preset: sandwich norms, QK-norm, one local
    window with full-attention layers between (``layer_types``), tied embeddings.

    Deliberate departures from a stock Gemma 3, to match our compute: ``hidden_activation="silu"``
    (our FFN is SwiGLU; Gemma's gelu-tanh GLU has the same shapes) and one RoPE theta for local and
    global layers (we have one). Gemma keeps its sqrt(d_model) embedding scale and (1 + w) norms:
    elementwise, no parameters."""
    a = cfg.attention
    if set(layer_kinds(cfg)) != {"gqa"} or cfg.moe.n_experts > 0:
        raise PeerConfigError("Gemma3 is dense GQA only (model.attention.kind=gqa, model.moe.n_experts=0)")
    if cfg.norm_placement != "pre+post":
        raise PeerConfigError(f"model.norm_placement={cfg.norm_placement!r}: Gemma3 is pre+post (sandwich)")
    if not a.qk_norm:
        raise PeerConfigError("model.attention.qk_norm=false: Gemma3 always has QK-norm")
    windows = layer_windows(cfg)
    local = sorted({w for w in windows if w > 0})
    if len(local) > 1:
        raise PeerConfigError(f"layer windows {local}: Gemma3 has one sliding_window for all local layers")
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope.theta)}
    if cfg.rope.yarn_factor > 1.0:
        raise PeerConfigError("model.rope.yarn_factor > 1: not mapped for Gemma3")
    hd = gqa_head_dim(cfg)
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": hd, "hidden_activation": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"sliding_attention": dict(rope), "full_attention": dict(rope)},
        "attention_bias": bool(a.bias), "attention_dropout": 0.0,
        # Our scale is 1/sqrt(head_dim); Gemma's is query_pre_attn_scalar**-0.5.
        "query_pre_attn_scalar": hd,
        "sliding_window": local[0] if local else None,
        "layer_types": ["sliding_attention" if w > 0 else "full_attention" for w in windows],
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "initializer_range": cfg.init_std,
        "use_cache": False,
    }


def peer_architecture(cfg: ModelConfig) -> str:
    kinds = set(layer_kinds(cfg))
    if cfg.norm_placement == "pre+post":
        return "gemma3"
    if kinds == {"gqa"} and cfg.moe.n_experts == 0:
        return "llama"
    if kinds == {"mla"} and cfg.moe.n_experts > 0:
        return "deepseek_v3"
    raise PeerConfigError(f"no Hugging Face peer for attention kinds {sorted(kinds)} with "
                          f"model.moe.n_experts={cfg.moe.n_experts} and norm_placement={cfg.norm_placement}")


def hf_config(cfg: ModelConfig) -> Tuple[str, Any]:
    """(model class name, transformers config object) for ``cfg``."""
    import transformers

    from checkpointing.export import deepseek_v3_config, llama_config

    arch = peer_architecture(cfg)
    if arch == "llama":
        d = llama_config(cfg, "float32")
        cls_name, conf_cls = "LlamaForCausalLM", transformers.LlamaConfig
    elif arch == "deepseek_v3":
        d = deepseek_v3_config(cfg, "float32")
        cls_name, conf_cls = "DeepseekV3ForCausalLM", transformers.DeepseekV3Config
    else:
        d = gemma3_text_config(cfg)
        cls_name, conf_cls = "Gemma3ForCausalLM", transformers.Gemma3TextConfig
    # Export metadata the config class does not take as a field; training needs no KV cache.
    d = {k: v for k, v in d.items() if k not in ("architectures", "torch_dtype", "dtype")}
    d["use_cache"] = False
    return cls_name, conf_cls(**d)


def build_peer(cfg: ModelConfig, device: torch.device,
               experts_implementation: str = "grouped_mm") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The peer model in fp32 (master weights; the step runs it under autocast) on ``device``,
    in train mode, and what was asked for and what was built."""
    import transformers

    cls_name, conf = hf_config(cfg)
    build = transformers.AutoModelForCausalLM.from_config
    info: Dict[str, Any] = {"class": cls_name, "transformers": transformers.__version__,
                            "attn_implementation_requested": "sdpa"}
    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32}
    moe = cfg.moe.n_experts > 0
    if moe:
        info["experts_implementation_requested"] = experts_implementation
        kwargs["experts_implementation"] = experts_implementation
    with torch.device(device):
        try:
            model = build(conf, **kwargs)
        except (TypeError, ValueError) as e:
            if not moe:
                raise
            # An older transformers without the experts switch, or grouped_mm refused: build the
            # default and say so in the result (the table shows the implementation used).
            info["experts_implementation_error"] = f"{type(e).__name__}: {e}"
            kwargs.pop("experts_implementation")
            model = build(conf, **kwargs)
    if type(model).__name__ != cls_name:
        raise PeerConfigError(f"AutoModelForCausalLM built {type(model).__name__}, expected {cls_name}")
    model.train()
    info["attn_implementation"] = model.config._attn_implementation
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        info["layer_types"] = {t: types.count(t) for t in sorted(set(types))}
        info["sliding_window"] = model.config.sliding_window
    if moe:
        info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        experts = next((m for m in model.modules() if hasattr(m, "gate_up_proj")), None)
        if experts is not None:
            # transformers' grouped_mm casts the activations to the weight dtype: with fp32 master
            # weights the routed experts run their grouped GEMMs in fp32 (autocast does not cover
            # grouped_mm), and compiled with non-bf16 weights it takes its per-expert loop instead.
            info["experts_weight_dtype"] = str(experts.gate_up_proj.dtype)
    return model, info


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` on each decoder layer, in place (as our ``compile_blocks``)."""
    for layer in model.model.layers:
        layer.compile()


def peer_logits(model: torch.nn.Module, inputs_BT: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs_BT, use_cache=False).logits


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once), buffers excluded."""
    return sum(p.numel() for p in model.parameters())
