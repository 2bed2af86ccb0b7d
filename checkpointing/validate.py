"""Rules for the ``checkpoint`` section, with messages that name the key and the fix.

``validate_checkpoint_config`` is what ``CheckpointManager`` refuses to start with;
``checkpoint_run_errors`` adds the rules a training run needs on top (``train/validate.py`` calls both).
"""

from __future__ import annotations

from typing import List

from checkpointing.config import CheckpointConfig
from checkpointing.errors import ConfigError
from checkpointing.urls import check_url

ASYNC_MODES = ("off", "thread", "process")
ON_SAVE_ERROR = ("continue", "stop")
STAGING = ("host", "device")  # where an async save copies the state first (device: spare GPU memory)
IF_BUSY = ("skip", "defer")  # a periodic save due while the previous one is still writing


def validate_checkpoint_config(cfg: CheckpointConfig) -> None:
    """Rules for the ``checkpoint`` section; each message names the key and the fix."""
    if cfg.async_mode not in ASYNC_MODES:
        raise ConfigError(f"checkpoint.async_mode={cfg.async_mode!r} must be one of {', '.join(ASYNC_MODES)}")
    staging = cfg.staging
    if staging not in STAGING:
        raise ConfigError(f"checkpoint.staging={staging!r} must be one of {', '.join(STAGING)}")
    if staging == "device" and cfg.async_mode == "off":
        raise ConfigError("checkpoint.staging=device snapshots for an async save: set checkpoint.async_mode="
                          "process (or thread), or checkpoint.staging=host")
    if cfg.if_busy not in IF_BUSY:
        raise ConfigError(f"checkpoint.if_busy={cfg.if_busy!r} must be one of {', '.join(IF_BUSY)}")
    if cfg.write_threads < 1:
        raise ConfigError(f"checkpoint.write_threads={cfg.write_threads} must be >= 1 (parallel writers per rank)")
    if cfg.write_bandwidth_gbps <= 0:
        raise ConfigError(f"checkpoint.write_bandwidth_gbps={cfg.write_bandwidth_gbps} must be > 0 (GB/s per "
                          "rank, e.g. 1.3 for an H200 node's local NVMe)")
    if cfg.fault_inject_write_delay_s < 0:
        raise ConfigError(f"checkpoint.fault_inject_write_delay_s={cfg.fault_inject_write_delay_s} must be >= 0")
    on_error = cfg.on_save_error
    if on_error not in ON_SAVE_ERROR:
        raise ConfigError(f"checkpoint.on_save_error={on_error!r} must be one of {', '.join(ON_SAVE_ERROR)}")
    check_url("checkpoint.root", cfg.root or "")
    if "://" in (cfg.resume or ""):
        check_url("checkpoint.resume", cfg.resume)
    upload_root = cfg.upload_root or ""
    if upload_root:
        check_url("checkpoint.upload_root", upload_root, remote_only=True)
    if upload_root and "://" in (cfg.root or ""):
        raise ConfigError(f"checkpoint.upload_root is set but checkpoint.root={cfg.root!r} is already "
                          "remote: two tiers means a local (or FSx) root plus an s3:// upload_root")
    for key in ("every_steps", "keep_last", "keep_every"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"checkpoint.{key}={getattr(cfg, key)} must be >= 0 (0 = off)")
    if not cfg.resume:
        raise ConfigError("checkpoint.resume is empty: use auto, none or a checkpoint path")


def checkpoint_run_errors(c: CheckpointConfig) -> List[str]:
    """The training run's rules for the section (the manager alone accepts e.g. keep_last=0)."""
    errs: List[str] = []
    if c.every_steps < 0:
        errs.append(f"checkpoint.every_steps={c.every_steps} must be >= 0 (0 = only the final save)")
    if c.keep_last < 1:
        errs.append(f"checkpoint.keep_last={c.keep_last} must be >= 1 (the newest commit is always kept)")
    if c.keep_every < 0:
        errs.append(f"checkpoint.keep_every={c.keep_every} must be >= 0")
    if c.async_mode not in ASYNC_MODES:
        errs.append(f"checkpoint.async_mode={c.async_mode!r} must be one of {ASYNC_MODES}")
    if not c.resume:
        errs.append("checkpoint.resume is empty: use auto, none or a checkpoint path")
    return errs
