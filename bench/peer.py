"""The Hugging Face transformers peer of a preset: the same geometry, built from our ModelConfig,
and trained the way its users train it.

- dense GQA (llama_1b)          -> ``LlamaForCausalLM``, config from ``checkpointing.export.llama_config``
- MLA + MoE (dsv3_mini)         -> ``DeepseekV3ForCausalLM``, from ``deepseek_v3_config``
- Gemma-3 style (gemma3_swa_1b) -> ``Gemma3ForCausalLM`` / ``Gemma3TextConfig``, from
  :func:`gemma3_text_config` below (export refuses sliding windows; a benchmark only needs shapes).

The recipe (issue 19; what a user of transformers writes): ``AutoModelForCausalLM.from_config(conf,
attn_implementation="sdpa", experts_implementation="grouped_mm")`` with fp32 weights,
``torch.compile(model)`` on the WHOLE model (embedding, layers, head and transformers' own loss in
one graph), bf16 autocast, ``torch.optim.AdamW(..., fused=True)``, ``model(input_ids=x, labels=x)``
(the model shifts the labels itself). :func:`peer_recipe` builds exactly that; ``compare`` times it.

Why the earlier MoE peer was 2.6x slower than the issue's figure (measured on an H200, 2026-12-02,
docs/PERFORMANCE.md): not the construction and not the compile granularity, but TF32. With fp32
weights transformers' ``grouped_mm`` experts cast the activations to fp32, and under
torch.compile (``is_torchdynamo_compiling()`` with non-bf16 weights) they take
``transformers::grouped_mm_fallback``: a per-expert ``torch.mm`` loop with a host sync, which
inductor cannot compile (graph break on ``aten._local_scalar_dense``). Those fp32 GEMMs run on
SIMT cores (cuBLAS ``cutlass_80_simt_sgemm``) with PyTorch's default fp32 precision: 36.1k tok/s
for dsv3_mini b16; with TF32 allowed the same loop runs on tensor cores: 93.4k, the issue's
93.3k. ``compare --peer-tf32 on|off`` picks one (default on, the issue's recipe as measured);
both are what users get (PyTorch's default, or ``set_float32_matmul_precision("high")``).
``compile_layers`` (per-layer compile, the old build) is kept as the ``peer_layer_compiled``
diagnostic variant.

``experts_implementation`` is a ``from_config`` keyword in transformers 5.x (read in the 5.17.0
and 5.23.0 sources). If that request raises, the model is built with the default and the reason
is recorded, never hidden. transformers is imported inside the functions, so ``python -m bench``
neither needs it nor pays for importing it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Tuple

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
    # fp32 GEMMs (fp32 experts) run on TF32 tensor cores only if the user opts in; record it.
    info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
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
    """``torch.compile`` on each decoder layer, in place: the old peer's build, kept only as the
    ``peer_layer_compiled`` diagnostic (no user of transformers compiles this way)."""
    for layer in model.model.layers:
        layer.compile()


def peer_logits(model: torch.nn.Module, inputs_BT: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs_BT, use_cache=False).logits


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores while inside (``torch.backends.cuda.matmul.allow_tf32``,
    what ``torch.set_float32_matmul_precision("high")`` and transformers' ``TrainingArguments(
    tf32=True)`` set); the previous setting is restored after. It matters to the MoE peer only:
    its fp32 experts run fp32 GEMMs (see the module docstring)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@dataclass
class PeerRecipe:
    model: torch.nn.Module  # the CausalLM itself (parameters, state dict)
    forward: torch.nn.Module  # what the step calls: torch.compile(model) or the model
    optimizer: torch.optim.Optimizer
    info: Dict[str, Any]


def peer_recipe(cfg: ModelConfig, device: torch.device, compile: bool, lr: float = 3e-4,
                layer_compile: bool = False) -> PeerRecipe:
    """The peer as its users build it: fp32 weights from ``from_config``, ``torch.compile(model)``
    on the whole model when ``compile``, and a plain fused AdamW over all parameters (fused on
    CUDA; CPU has no fused kernel for every dtype we test with, so foreach there).
    ``layer_compile=True`` is the old per-layer build (diagnostic only)."""
    model, info = build_peer(cfg, device)
    forward: torch.nn.Module = model
    if layer_compile:
        compile_layers(model)
        info["compile"] = "per decoder layer (diagnostic)"
    elif compile:
        forward = torch.compile(model)
        info["compile"] = "torch.compile(model), whole model"
    else:
        info["compile"] = "none"
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused, foreach=None if fused else True)
    info["optimizer"] = f"torch.optim.AdamW(fused={fused})"
    return PeerRecipe(model, forward, opt, info)


def peer_loss(forward: torch.nn.Module, inputs_BT: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss: ``labels=input_ids``, shifted inside the model, logits
    upcast to fp32 (``ForCausalLMLoss``)."""
    return forward(input_ids=inputs_BT, labels=inputs_BT, use_cache=False).loss


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once), buffers excluded."""
    return sum(p.numel() for p in model.parameters())
