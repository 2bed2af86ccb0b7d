"""The distillation teacher: frozen, in the autocast dtype (bf16 on GPU), sharded like the student
(FSDP2, reshard after forward, EP where it is a MoE), read from an HF directory (each rank reading
its rows, ``checkpointing/hf/load.py``) or from one of our checkpoints (DCP, each rank its shards)."""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from moe.config import ConfigError


def _is_hf_dir(path: str, storage_options: Optional[Dict[str, Any]]) -> bool:
    from checkpointing.storage import Storage

    st = Storage(path, storage_options)
    return st.exists(path.rstrip("/") + "/config.json")


def teacher_model_config(path: str, storage_options: Optional[Dict[str, Any]] = None):
    """The teacher's ``ModelConfig``: from config.json (HF), or the run's config.yaml (ours)."""
    from checkpointing.errors import CheckpointError
    from checkpointing.export import load_model_config, resolve_step_dir
    from checkpointing.hf.load import model_config_from_hf
    from checkpointing.storage import Storage

    try:
        if _is_hf_dir(path, storage_options):
            return model_config_from_hf(path, storage_options)
        st = Storage(path, storage_options)
        return load_model_config(resolve_step_dir(path, st, None), st)
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher={path}: {e}") from e


def build_teacher(tcfg, path: str, parallel_cfg, ctx, runtime, storage_options: Optional[Dict[str, Any]] = None,
                  compile: bool = False) -> torch.nn.Module:
    """Meta build -> (bf16) -> parallelize -> materialise -> load weights -> frozen, eval mode."""
    from checkpointing.hf.load import load_hf_weights
    from checkpointing.weights import load_weights_into
    from model.transformer import Transformer
    from parallelism.parallelize import parallelize

    with torch.device("meta"):
        teacher = Transformer(tcfg)
    teacher.requires_grad_(False)
    if runtime.amp_dtype is not None:
        teacher.to(dtype=runtime.amp_dtype)
        for m in teacher.modules():  # the routing bias stays fp32, as in the student
            if hasattr(m, "expert_bias"):
                m.expert_bias = m.expert_bias.float()
    if int(parallel_cfg.ep) > 1 and (tcfg.moe.n_experts == 0 or tcfg.moe.n_experts % int(parallel_cfg.ep)):
        # A dense teacher (or one whose experts do not split ep ways) of an EP student: FSDP2 over the
        # same ranks, experts (if any) unsplit.
        parallel_cfg = copy.copy(parallel_cfg)
        parallel_cfg.ep = 1
    parallelize(teacher, parallel_cfg, ctx, runtime.device_type, compile=compile, reshard_after_forward=True)
    teacher.init_weights(0, device=runtime.init_device)
    if _is_hf_dir(path, storage_options):
        load_hf_weights(teacher, path, storage_options)
    else:
        load_weights_into(teacher, path, storage_options)
    if runtime.init_device != runtime.device:
        teacher.to(runtime.device)
    return teacher.eval()


def check_teacher(cfg) -> None:
    """``distill.teacher`` at validation: its config is readable and its vocabulary is the student's."""
    from train.distill.config import check_teacher_vocab

    if cfg.distill.teacher:
        tcfg = teacher_model_config(cfg.distill.teacher, dict(cfg.checkpoint.storage_options or {}))
        check_teacher_vocab(tcfg.vocab_size, cfg.model.vocab_size, cfg.distill.teacher)
