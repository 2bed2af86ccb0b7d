"""Cross-field rules of the whole run config, checked before any process group or allocation.

Each failure names the key and the fix, e.g.
``trainer.global_batch_size=10 must be divisible by data-parallel ranks (4) x trainer.micro_batch_size (2)``.
"""

from __future__ import annotations

import os

from model.config import validate_model_config
from train.distill.config import validate_distill_config
from moe.config import ConfigError
from train.config import TrainConfig
from train.data.config import validate_data_config

SCHEDULES = ("cosine", "linear", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32", "fp8")
DEVICES = ("auto", "cpu", "cuda", "neuron", "xla")


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def dp_size(cfg: TrainConfig, world_size: int) -> int:
    """Data-parallel ranks: every rank holds a different slice of the global batch."""
    return world_size


def resolved_micro_batch(cfg: TrainConfig, world_size: int) -> int:
    t = cfg.trainer
    return t.micro_batch_size or max(1, t.global_batch_size // dp_size(cfg, world_size))


def validate_train_config(cfg: TrainConfig, world_size: int | None = None) -> None:
    world_size = world_size_from_env() if world_size is None else world_size
    t, o, c, p = cfg.trainer, cfg.optim, cfg.checkpoint, cfg.parallel
    from train.strict import range_errors, scheme_errors

    for error in range_errors(cfg) + scheme_errors(cfg):  # every numeric key's range; path schemes
        _fail(error)
    validate_model_config(cfg.model)
    validate_data_config(cfg.data)
    validate_distill_config(cfg.distill)
    for key in ("max_steps", "global_batch_size", "seq_len", "log_every"):
        if getattr(t, key) < 1:
            _fail(f"trainer.{key}={getattr(t, key)} must be >= 1")
    for key in ("eval_every", "eval_batches", "micro_batch_size", "early_stop_patience"):
        if getattr(t, key) < 0:
            _fail(f"trainer.{key}={getattr(t, key)} must be >= 0")
    if t.seq_len > cfg.model.max_seq_len:
        _fail(f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}: "
              "lower trainer.seq_len or raise model.max_seq_len")
    from parallelism.config import AC_POLICIES  # not parallelize: that imports torch

    if t.ac_policy not in AC_POLICIES:
        _fail(f"trainer.ac_policy={t.ac_policy!r} must be one of {AC_POLICIES}")
    if t.ac_every < 1:
        _fail(f"trainer.ac_every={t.ac_every} must be >= 1 (1 checkpoints every block)")
    if t.precision not in PRECISIONS:
        _fail(f"trainer.precision={t.precision!r} must be one of {PRECISIONS}")
    if t.device not in DEVICES:
        _fail(f"trainer.device={t.device!r} must be one of {DEVICES}")
    if t.precision == "fp8":
        _validate_fp8(cfg)
    from devices.neuron_env import xla_config_errors

    for error in xla_config_errors(cfg, world_size):  # trainer.device=neuron|xla only
        _fail(error)
    if t.grad_clip < 0:
        _fail(f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    dp = dp_size(cfg, world_size)
    mb = resolved_micro_batch(cfg, world_size)
    if t.global_batch_size % (dp * mb) != 0:
        _fail(f"trainer.global_batch_size={t.global_batch_size} must be divisible by data-parallel "
              f"ranks ({dp}) x trainer.micro_batch_size ({mb}): change one of them")
    if not o.lr > 0:
        _fail(f"optim.lr={o.lr} must be > 0")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail(f"optim.min_lr_ratio={o.min_lr_ratio} must be within [0, 1]")
    if o.schedule not in SCHEDULES:
        _fail(f"optim.schedule={o.schedule!r} must be one of {SCHEDULES}")
    if o.warmup_steps < 0:
        _fail(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if o.weight_decay < 0:
        _fail(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        _fail(f"optim.beta1={o.beta1} and optim.beta2={o.beta2} must be within [0, 1)")
    if not 0 < o.decay_fraction <= 1:
        _fail(f"optim.decay_fraction={o.decay_fraction} must be within (0, 1]")
    from train.config import SWITCH, switch

    if switch(o.fused) not in SWITCH:
        _fail(f"optim.fused={o.fused!r} must be auto, true or false")
    from train.master_weights import master_weights_errors

    for error in master_weights_errors(cfg, world_size, t.global_batch_size // (dp * mb)):
        _fail(error)
    from checkpointing.validate import checkpoint_run_errors, validate_checkpoint_config
    from health.validate import health_errors

    validate_checkpoint_config(c)
    for error in health_errors(cfg.health) + checkpoint_run_errors(c):
        _fail(error)
    from cost.validate import validate_cluster_config, validate_cost_config

    for error in validate_cost_config(cfg.cost) + validate_cluster_config(cfg.cluster):
        _fail(error)
    from parallelism.validate import parallel_errors

    if p.engine == "deepspeed":  # first: its refusals (e.g. of EP) say more than the layout rules
        _validate_deepspeed(cfg, world_size)
    for error in parallel_errors(p, world_size, cfg.model.moe.n_experts):
        _fail(error)


def _validate_deepspeed(cfg: TrainConfig, world_size: int) -> None:
    import importlib.util

    from parallelism.deepspeed_engine import INSTALL_HINT, deepspeed_errors

    p, c = cfg.parallel, cfg.checkpoint
    for error in deepspeed_errors(p.deepspeed, engine=p.engine, world_size=world_size,
                                  dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, ep=p.ep,
                                  compile=cfg.trainer.compile, async_mode=c.async_mode,
                                  checkpoint_root=c.root, upload_root=c.upload_root,
                                  device=cfg.trainer.device):
        _fail(error)
    if importlib.util.find_spec("deepspeed") is None:
        _fail(f"parallel.engine=deepspeed needs DeepSpeed, which is not installed: {INSTALL_HINT}")


def _validate_fp8(cfg: TrainConfig) -> None:
    """``trainer.precision=fp8``: a CUDA GPU of compute capability >= 8.9 (probed here, on the device
    this rank will use), compile on, torchao installed, the FSDP2 engine."""
    import importlib.util

    import torch

    from model.fp8 import fp8_errors

    t = cfg.trainer
    capability = None
    if t.device in ("auto", "cuda") and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0"))))
    for error in fp8_errors(t.precision, t.fp8, capability, t.compile, importlib.util.find_spec("torchao") is not None):
        _fail(error)
    if cfg.parallel.engine != "fsdp2":
        _fail(f"trainer.precision=fp8 runs on parallel.engine=fsdp2 only (got {cfg.parallel.engine!r})")
