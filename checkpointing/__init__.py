"""Checkpoints: DCP shards + an atomic commit marker, on local disk, FSx or s3:// (optionally a
local tier with a background upload to s3://); ``python -m checkpointing ls|verify|export``.

Never imports ``train``: the manager takes the ``checkpoint`` section (``checkpointing.config``).
The names below load on first use, so ``checkpointing.config`` stays importable without torch
(``train/config.py`` composes it for Hydra before any heavy import).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "CheckpointError": "checkpointing.errors",
    "ConfigError": "checkpointing.errors",
    "CheckpointConfig": "checkpointing.config",
    "CheckpointManager": "checkpointing.manager",
    "SaveResult": "checkpointing.save_result",
    "ON_SAVE_ERROR": "checkpointing.validate",
    "validate_checkpoint_config": "checkpointing.validate",
    "resolve_resume": "checkpointing.resume",
    "AppState": "checkpointing.state",
    "RNGState": "checkpointing.state",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'checkpointing' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
