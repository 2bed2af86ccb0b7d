"""Typed configuration of the data layer (``data`` group in the Hydra tree)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from moe.config import ConfigError

SOURCES = ("builtin", "shards", "megatron")

# Default cap on the builtin corpus: the whole CPython 3.11 stdlib (tests and codec tables
# excluded) is ~10 MB, so this takes all of it there and bounds newer, larger versions.
DEFAULT_BUILTIN_MAX_BYTES = 12 * 2**20


@dataclass
class DataConfig:
    # "builtin": the Python stdlib's own source, on every machine with no download.
    # "shards": a directory written by `python -m train.prepare` (local, FSx or s3://).
    # "megatron": a Megatron-LM indexed dataset; `path` is the prefix of <prefix>.bin/.idx.
    source: str = "builtin"
    path: str = ""
    # Builtin: fraction of files held out for validation (by a hash of the file's path).
    # Megatron without val_path: fraction of documents held out (the last ones, contiguous).
    val_fraction: float = 0.01
    # Megatron only: a second prefix used whole as the validation split.
    val_path: str = ""
    # Megatron only: the data's vocabulary (its files do not record one); 0 = max token id + 1,
    # found by scanning every token (a full read of remote data: set this for large datasets).
    megatron_vocab_size: int = 0
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
    if cfg.source == "megatron":
        if not cfg.path:
            _fail(f"{prefix}.path must be set when {prefix}.source=megatron (the prefix of a "
                  f"Megatron indexed dataset: <prefix>.bin and <prefix>.idx, local or s3://)")
        for key in ("path", "val_path"):
            val = str(getattr(cfg, key) or "")
            if val.endswith((".bin", ".idx")):
                _fail(f"{prefix}.{key}={val!r} must be the prefix, without .bin/.idx "
                      f"(use {val[:-4]!r})")
    if int(cfg.megatron_vocab_size) < 0:
        _fail(f"{prefix}.megatron_vocab_size={cfg.megatron_vocab_size} must be >= 0 "
              f"(0 = the data's max token id + 1)")
    if cfg.source != "megatron" and cfg.val_path:
        _fail(f"{prefix}.val_path={cfg.val_path!r} is only read when {prefix}.source=megatron")
    if cfg.source != "megatron" and int(cfg.megatron_vocab_size):
        _fail(f"{prefix}.megatron_vocab_size={cfg.megatron_vocab_size} is only read when "
              f"{prefix}.source=megatron")
    if cfg.source == "builtin" and cfg.path:
        _fail(f"{prefix}.path={cfg.path!r} is only read when {prefix}.source=shards or "
              f"megatron; set {prefix}.source or clear {prefix}.path")
    if not 0.0 < float(cfg.val_fraction) < 0.5:
        _fail(f"{prefix}.val_fraction={cfg.val_fraction} must be in (0, 0.5)")
    if int(cfg.builtin_max_bytes) < 64 * 1024:
        _fail(f"{prefix}.builtin_max_bytes={cfg.builtin_max_bytes} must be >= 65536")
    if cfg.storage_options is None or not hasattr(cfg.storage_options, "keys"):
        _fail(f"{prefix}.storage_options must be a mapping (use {{}} for none), "
              f"got {type(cfg.storage_options).__name__}")
