"""Checkpoints: DCP shards + an atomic commit marker, on local disk, FSx or s3:// (optionally a
local tier with a background upload to s3://); ``python -m checkpointing ls|verify|export``.

Never imports ``train``: the manager takes the ``checkpoint`` config section as a plain object.
"""

from checkpointing.errors import CheckpointError, ConfigError
from checkpointing.manager import ON_SAVE_ERROR, CheckpointManager, SaveResult, validate_checkpoint_config
from checkpointing.resume import resolve_resume
from checkpointing.state import AppState, RNGState

__all__ = [
    "AppState",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "ON_SAVE_ERROR",
    "RNGState",
    "SaveResult",
    "resolve_resume",
    "validate_checkpoint_config",
]
