"""Errors raised by ``checkpointing``.

``ConfigError`` is the project-wide config error (defined next to the first config section, in
``moe.config``) so that ``train`` catches one type for every section.
"""

from __future__ import annotations

from moe.config import ConfigError

__all__ = ["CheckpointError", "ConfigError"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, committed or loaded; the message names the path."""
