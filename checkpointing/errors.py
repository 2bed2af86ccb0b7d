"""Errors raised by ``checkpointing``.

``ConfigError`` is the project-wide config error (defined next to the first config section, in
``moe.config``) so that ``train`` catches one type for every section.
"""

from __future__ import annotations

from moe.config import ConfigError

__all__ = ["CheckpointError", "ConfigError", "UnsafeCheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, committed or loaded; the message names the path."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file references code a checkpoint never holds (a crafted or altered pickle).
    Refused before anything in it ran; ``resume=auto`` stops on it rather than falling back to an
    older checkpoint, because a tampered run directory needs a person to look at it."""
