"""Typed configuration of the data layer (``data`` group in the Hydra tree)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from moe.config import ConfigError

SOURCES = ("builtin", "shards")

# Default cap on the builtin corpus: the whole CPython 3.11 stdlib (tests and codec tables
# excluded) is ~10 MB, so this takes all of it there and bounds newer, larger versions.
DEFAULT_BUILTIN_MAX_BYTES = 12 * 2**20


@dataclass
class DataConfig:
    # "builtin": the Python stdlib's own source, on every machine with no download.
    # "shards": a directory written by `python -m train.prepare` (local, FSx or s3://).
    source: str = "builtin"
    path: str = ""
    # Builtin only: fraction of files held out for validation (by a hash of the file's path).
    val_fraction: float = 0.01
    builtin_max_bytes: int = DEFAULT_BUILTIN_MAX_BYTES
    # Passed to fsspec for `path` (e.g. {"endpoint_url": ..., "anon": false} for s3fs).
    storage_options: Dict[str, Any] = field(default_factory=dict)


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def validate_data_config(cfg: DataConfig, prefix: str = "data") -> None:
    if cfg.source not in SOURCES:
        _fail(f"{prefix}.source={cfg.source!r} must be one of {', '.join(SOURCES)}")
    if cfg.source == "shards" and not cfg.path:
        _fail(f"{prefix}.path must be set when {prefix}.source=shards "
              f"(a directory written by `python -m train.prepare`, local or s3://)")
    if cfg.source == "builtin" and cfg.path:
        _fail(f"{prefix}.path={cfg.path!r} is only read when {prefix}.source=shards; "
              f"set {prefix}.source=shards or clear {prefix}.path")
    if not 0.0 < float(cfg.val_fraction) < 0.5:
        _fail(f"{prefix}.val_fraction={cfg.val_fraction} must be in (0, 0.5)")
    if int(cfg.builtin_max_bytes) < 64 * 1024:
        _fail(f"{prefix}.builtin_max_bytes={cfg.builtin_max_bytes} must be >= 65536")
    if cfg.storage_options is None or not hasattr(cfg.storage_options, "keys"):
        _fail(f"{prefix}.storage_options must be a mapping (use {{}} for none), "
              f"got {type(cfg.storage_options).__name__}")
