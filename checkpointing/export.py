"""Export a committed checkpoint's weights as a Hugging Face model directory.

    python -m checkpointing export RUN_OR_STEP_DIR --out DIR_OR_S3 [--step N] [--dtype bfloat16]

Writes ``config.json`` plus ``model.safetensors`` (or shards and ``model.safetensors.index.json``):

* dense GQA models  -> ``LlamaForCausalLM``
* MLA + MoE models  -> ``DeepseekV3ForCausalLM`` (every layer MLA, sigmoid routing with the
  selection bias as ``e_score_correction_bias``, first ``first_k_dense`` layers dense, every layer
  after them MoE, ``rope_interleave=False`` because our RoPE is rotate_half).

The model config comes from the run's ``config.yaml`` (``model:`` section, written by the trainer
in the run directory) or ``--config``. Only the model's weights are read from the checkpoint
(DCP loads the requested keys; the optimizer state is not touched), resharded to full tensors
whatever world size saved them. Anything our model has that the target architecture cannot
express (QK-norm, sliding windows, sandwich norms, softmax routing, ...) is refused with a message
naming the key, never exported approximately.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from checkpointing import _dcp, commit, layout
from checkpointing.errors import CheckpointError
from checkpointing.storage import Storage

if TYPE_CHECKING:  # model/ is imported lazily: ls and verify never need it
    from model.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_LAYOUTS = ("per_expert", "fused")
# State-dict prefixes the trainer / tests put the model under (AppState: {"app": {"model": ...}}).
_MODEL_PREFIXES = ("app.model.", "model.", "")


# -- locating the checkpoint and the config ---------------------------------------------------
def resolve_step_dir(path: str, st: Storage, step: Optional[int]) -> str:
    path = path.rstrip("/")
    if layout.parse_step(path) is not None:
        if step is not None and layout.parse_step(path) != step:
            raise CheckpointError(f"{path} is step {layout.parse_step(path)}, not --step {step}")
        d = path
    else:
        steps = commit.list_committed(st, path)
        if not steps:
            raise CheckpointError(f"no committed checkpoint under {path}")
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not committed under {path} (committed: {steps})")
        d = layout.step_dir(path, steps[-1] if step is None else step)
    if not commit.is_committed(st, d):
        raise CheckpointError(f"{d} is not a committed checkpoint (no {layout.COMMIT_MARKER})")
    return d


def load_model_config(step_dir: str, st: Storage, config_path: Optional[str] = None):
    """``model.config.ModelConfig`` from ``config.yaml`` (the run directory's, i.e. next to the step
    directories, unless ``config_path`` names one)."""
    from omegaconf import OmegaConf

    from model.config import ModelConfig

    if config_path is None:
        run_dir = step_dir.rsplit("/", 1)[0]
        candidate = layout.join(run_dir, "config.yaml")
        if not st.exists(candidate):
            raise CheckpointError(f"no config.yaml in {run_dir} (the trainer writes it in the run "
                                  "directory); pass --config PATH")
        text = st.read_text(candidate)
    else:
        cst = Storage(config_path)
        text = cst.read_text(config_path)
    raw = OmegaConf.create(text)
    section = raw.get("model", None)
    if section is None:
        raise CheckpointError(f"{config_path or 'config.yaml'} has no model: section")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
    return OmegaConf.to_object(merged)


def load_model_weights(step_dir: str, st: Storage, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Full (unsharded) fp32/bf16 model tensors keyed by our FQNs, read through DCP."""
    from model.transformer import Transformer

    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    md = _dcp.read_metadata(st.native(step_dir), st.is_local, st.storage_options)
    keys = set(md.state_dict_metadata)
    probe = next(iter(shapes))
    prefix = next((p for p in _MODEL_PREFIXES if p + probe in keys), None)
    if prefix is None:
        raise CheckpointError(f"{step_dir}: no model weights found (looked for "
                              f"{', '.join(repr(p + probe) for p in _MODEL_PREFIXES)})")
    missing = [k for k in shapes if prefix + k not in keys]
    if missing:
        raise CheckpointError(f"{step_dir}: the checkpoint lacks {len(missing)} tensor(s) this model "
                              f"config has, e.g. {missing[:3]}: does config.yaml match the run?")
    flat = {}
    for k, meta_t in shapes.items():
        tmd = md.state_dict_metadata[prefix + k]
        if tuple(tmd.size) != tuple(meta_t.shape):
            raise CheckpointError(f"{step_dir}: {prefix + k} is {tuple(tmd.size)} in the checkpoint but "
                                  f"{tuple(meta_t.shape)} in the model config")
        flat[k] = torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)
    # DCP flattens nested dicts with "."; rebuild the nesting of the prefix.
    nested: Dict[str, Any] = flat
    for part in reversed([p for p in prefix.split(".") if p]):
        nested = {part: nested}
    reader = _dcp.make_reader(st.native(step_dir), st.is_local, st.storage_options)
    _dcp.load(nested, reader)
    return flat


# -- architecture checks and name maps --------------------------------------------------------
def _refuse(msg: str) -> None:
    raise CheckpointError(f"cannot export to Hugging Face: {msg}")


def _rope_parameters(cfg: ModelConfig) -> Dict[str, Any]:
    r = cfg.rope
    if r.yarn_factor > 1.0:
        return {"rope_type": "yarn", "rope_theta": float(r.theta), "factor": float(r.yarn_factor),
                "original_max_position_embeddings": int(r.yarn_original_max_position),
                "beta_fast": float(r.yarn_beta_fast), "beta_slow": float(r.yarn_beta_slow),
                "mscale": float(r.yarn_mscale), "mscale_all_dim": float(r.yarn_mscale_all_dim)}
    return {"rope_type": "default", "rope_theta": float(r.theta)}


def _common_checks(cfg: ModelConfig) -> None:
    from model.config import layer_windows

    if any(layer_windows(cfg)):
        _refuse("sliding-window layers (model.attention.window / layer_windows) have no equivalent here")
    if cfg.norm_placement != "pre":
        _refuse(f"model.norm_placement={cfg.norm_placement!r}: Llama/DeepSeek-V3 are pre-norm only")


def architecture(cfg: ModelConfig) -> str:
    from model.config import layer_kinds

    kinds = set(layer_kinds(cfg))
    if kinds == {"gqa"} and cfg.moe.n_experts == 0:
        return "llama"
    if kinds == {"mla"} and cfg.moe.n_experts > 0:
        return "deepseek_v3"
    _refuse(f"attention kinds {sorted(kinds)} with model.moe.n_experts={cfg.moe.n_experts}: supported "
            "are dense GQA (-> LlamaForCausalLM) and all-MLA MoE (-> DeepseekV3ForCausalLM)")
    raise AssertionError


def llama_config(cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
    from model.config import gqa_head_dim

    _common_checks(cfg)
    a = cfg.attention
    if a.qk_norm:
        _refuse("model.attention.qk_norm=true: LlamaForCausalLM has no QK-norm (Qwen3 does)")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": gqa_head_dim(cfg),
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _rope_parameters(cfg), "rope_theta": float(cfg.rope.theta),
        "attention_bias": bool(a.bias), "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "initializer_range": cfg.init_std,
        "dtype": dtype, "torch_dtype": dtype, "use_cache": True,
    }


def deepseek_v3_config(cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
    from model.config import layer_is_moe

    _common_checks(cfg)
    a, m = cfg.attention, cfg.moe
    if m.score_func != "sigmoid":
        _refuse(f"model.moe.score_func={m.score_func!r}: DeepseekV3 routes with sigmoid scores")
    moe_layers = layer_is_moe(cfg)
    if moe_layers != [i >= m.first_k_dense for i in range(cfg.n_layers)]:
        _refuse(f"model.moe.moe_every={m.moe_every}: DeepseekV3 makes every layer after "
                "first_k_dense_replace MoE")
    if m.n_shared_experts < 1:
        _refuse("model.moe.n_shared_experts=0: DeepseekV3 always has shared experts")
    if m.n_experts % m.n_groups or m.n_experts // m.n_groups < 2:
        _refuse(f"model.moe.n_groups={m.n_groups}: DeepseekV3 needs >= 2 experts per group")
    if m.capacity_factor > 0:
        _refuse(f"model.moe.capacity_factor={m.capacity_factor}: DeepseekV3 is dropless")
    if abs(cfg.norm_eps - 1e-6) > 1e-12:
        # HF builds q_a_layernorm / kv_a_layernorm with the default eps (1e-6), not rms_norm_eps.
        log.warning("model.norm_eps=%g: HF DeepseekV3's MLA-internal norms use eps 1e-6", cfg.norm_eps)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
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
        "rope_parameters": _rope_parameters(cfg), "rope_theta": float(cfg.rope.theta),
        "tie_word_embeddings": bool(cfg.tie_embeddings), "initializer_range": cfg.init_std,
        "num_nextn_predict_layers": 0, "dtype": dtype, "torch_dtype": dtype, "use_cache": True,
    }


_COMMON = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.ffn\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.ffn\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.ffn\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]
_LLAMA = _COMMON + [
    (r"layers\.(\d+)\.attention\.wq\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"layers\.(\d+)\.attention\.wk\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"layers\.(\d+)\.attention\.wv\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"layers\.(\d+)\.attention\.wo\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
]
_DEEPSEEK = _COMMON + [
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
_EXPERTS = re.compile(r"layers\.(\d+)\.ffn\.experts\.(w1|w2|w3)$")


def _rename(name: str, rules: List[Tuple[str, str]]) -> str:
    for pattern, repl in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    _refuse(f"no Hugging Face name for our tensor {name!r}")
    raise AssertionError


def to_hf(ours: Dict[str, torch.Tensor], arch: str, experts_layout: str = "per_expert") -> Dict[str, torch.Tensor]:
    """Our FQN -> tensor map to HF names and layouts. Routed experts: ours are ``w1/w3 [E, D, F]``,
    ``w2 [E, F, D]`` used as ``x @ w``; HF's are ``nn.Linear``-style ``[out, in]``: per expert
    ``gate_proj/up_proj [F, D]`` and ``down_proj [D, F]`` (the Hub layout, which transformers 5
    fuses on load), or fused ``gate_up_proj [E, 2F, D]`` (gate rows first) and ``down_proj [E, D, F]``."""
    rules = _LLAMA if arch == "llama" else _DEEPSEEK
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, t in ours.items():
        m = _EXPERTS.fullmatch(name)
        if m:
            experts.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        out[_rename(name, rules)] = t
    for layer, w in experts.items():
        w1_EDF, w3_EDF, w2_EFD = w["w1"], w["w3"], w["w2"]
        base = f"model.layers.{layer}.mlp.experts"
        if experts_layout == "fused":
            out[f"{base}.gate_up_proj"] = torch.cat((w1_EDF.transpose(1, 2), w3_EDF.transpose(1, 2)), dim=1)
            out[f"{base}.down_proj"] = w2_EFD.transpose(1, 2)
        else:
            for e in range(w1_EDF.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = w1_EDF[e].t()
                out[f"{base}.{e}.up_proj.weight"] = w3_EDF[e].t()
                out[f"{base}.{e}.down_proj.weight"] = w2_EFD[e].t()
    return out


# -- writing ------------------------------------------------------------------------------------
def write_hf_dir(tensors: Dict[str, torch.Tensor], config: Dict[str, Any], out_dir: str,
                 max_shard_bytes: int) -> List[str]:
    """safetensors (sharded with an index when over ``max_shard_bytes``) + config.json, locally."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    written = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        written.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append("model.safetensors.index.json")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    written.append("config.json")
    return written


def export(path: str, out: str, step: Optional[int] = None, dtype: str = "bfloat16",
           config_path: Optional[str] = None, storage_options: Optional[Dict[str, Any]] = None,
           experts_layout: str = "per_expert", max_shard_bytes: int = 5 * 10**9) -> str:
    """Export and return the output location. ``out`` may be a local dir or an s3:// prefix."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    if experts_layout not in EXPERT_LAYOUTS:
        raise CheckpointError(f"--experts-layout {experts_layout!r} must be one of {', '.join(EXPERT_LAYOUTS)}")
    st = Storage(path, storage_options)
    step_dir = resolve_step_dir(path, st, step)
    engine = commit.read_meta(st, step_dir).get("engine")
    if engine:
        raise CheckpointError(f"{step_dir} was written by {engine.get('format')} (parallel.engine="
                              f"{engine.get('format')}); export reads DCP checkpoints only. For DeepSpeed, "
                              "consolidate the weights with its zero_to_fp32.py in that directory")
    cfg = load_model_config(step_dir, st, config_path)
    arch = architecture(cfg)
    config = llama_config(cfg, dtype) if arch == "llama" else deepseek_v3_config(cfg, dtype)
    ours = load_model_weights(step_dir, st, cfg)
    if cfg.tie_embeddings:
        ours.pop("output.weight", None)
    hf = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
          for k, v in to_hf(ours, arch, experts_layout).items()}
    if arch == "deepseek_v3":  # HF keeps the routing bias in fp32 whatever the dtype
        hf.update({k: v.float() for k, v in hf.items() if k.endswith("e_score_correction_bias")})
    meta = commit.read_meta(st, step_dir)
    config["moeforge"] = {"source": step_dir, "step": meta.get("step"), "tokens": meta.get("tokens")}
    if "://" not in out or out.startswith("file://"):
        files = write_hf_dir(hf, config, Storage(out)._p(out), max_shard_bytes)
    else:
        remote = Storage(out, storage_options)
        with tempfile.TemporaryDirectory(prefix="moeforge-export-") as tmp:
            files = write_hf_dir(hf, config, tmp, max_shard_bytes)
            for name in files:
                remote.put_file(os.path.join(tmp, name), layout.join(out, name))
    log.info("exported %s (%s, %d tensors, %s) to %s: %s", step_dir, config["architectures"][0], len(hf),
             dtype, out, ", ".join(files))
    return out
