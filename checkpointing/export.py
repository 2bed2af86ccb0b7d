"""Export a committed checkpoint's weights as a Hugging Face model directory.

    python -m checkpointing export RUN_OR_STEP_DIR --out DIR_OR_S3 [--step N] [--dtype bfloat16]

Writes ``config.json`` plus ``model.safetensors`` (or shards and ``model.safetensors.index.json``)
for the one transformers class that expresses the model exactly (``checkpointing/hf/families.py``):
Llama, Mistral, Qwen3, Qwen3-MoE, Gemma 3 (text), OLMo 2 or DeepSeek-V3.

The model config comes from the run's ``config.yaml`` (``model:`` section, written by the trainer
in the run directory) or ``--config``. Only the model's weights are read from the checkpoint
(DCP loads the requested keys; the optimizer state is not touched), resharded to full tensors
whatever world size saved them. Anything our model has that the target class cannot express is
refused with a message naming the key, never exported approximately.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from checkpointing import _dcp, commit, layout
from checkpointing.errors import CheckpointError
from checkpointing.hf import mapping
from checkpointing.hf.families import FAMILIES, for_model
from checkpointing.hf.mapping import EXPERT_LAYOUTS
from checkpointing.hf.safetensors_io import write_hf_dir
from checkpointing.model_keys import model_prefix
from checkpointing.storage import Storage

if TYPE_CHECKING:  # model/ is imported lazily: ls and verify never need it
    from model.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    prefix = model_prefix(step_dir, md, {k: t.shape for k, t in shapes.items()})
    flat = {}
    for k in shapes:
        tmd = md.state_dict_metadata[prefix + k]
        flat[k] = torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)
    # DCP flattens nested dicts with "."; rebuild the nesting of the prefix.
    nested: Dict[str, Any] = flat
    for part in reversed([p for p in prefix.split(".") if p]):
        nested = {part: nested}
    reader = _dcp.make_reader(st.native(step_dir), st.is_local, st.storage_options)
    _dcp.load(nested, reader)
    return flat


# -- the families (checkpointing/hf/), and the names bench/peer.py and older callers use ------------
def architecture(cfg: ModelConfig) -> str:
    """The family key (an HF ``model_type``) of the class that expresses ``cfg`` exactly."""
    return for_model(cfg).model_type


def llama_config(cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
    fam = FAMILIES["llama"]
    fam.check(cfg)
    return fam.config_json(cfg, dtype)


def deepseek_v3_config(cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
    fam = FAMILIES["deepseek_v3"]
    fam.check(cfg)
    return fam.config_json(cfg, dtype)


def to_hf(ours: Dict[str, torch.Tensor], arch: str, experts_layout: str = "per_expert") -> Dict[str, torch.Tensor]:
    """Our FQN -> tensor map in family ``arch``'s HF names and layouts (see checkpointing.hf.mapping)."""
    fam = FAMILIES[arch]
    return mapping.to_hf(ours, fam.sources(ours), experts_layout)


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
    fam = for_model(cfg)
    config = fam.config_json(cfg, dtype)
    ours = load_model_weights(step_dir, st, cfg)
    if cfg.tie_embeddings:
        ours.pop("output.weight", None)
    # The rewrite (norm offsets, expert layouts) in fp32, then one cast to the target dtype.
    hf = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
          for k, v in mapping.to_hf({k: v.float() for k, v in ours.items()}, fam.sources(ours),
                                    experts_layout).items()}
    # HF keeps the routing bias in fp32 whatever the dtype.
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
