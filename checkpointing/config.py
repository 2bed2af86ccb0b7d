"""The ``checkpoint`` config section (docs/checkpointing.md); rules in ``checkpointing/validate.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class CheckpointConfig:
    root: str = ""  # "" = output_dir; a path, an FSx mount or s3://bucket/prefix
    every_steps: int = 50
    keep_last: int = 3
    keep_every: int = 0  # also keep every m-th step forever; 0 = off
    resume: str = "auto"  # auto | none | a checkpoint path
    async_mode: str = "off"  # off | thread | process
    staging: str = "host"  # host | device (async modes: snapshot in spare GPU memory, the step pays only that)
    save_final: bool = True
    storage_options: Dict[str, Any] = field(default_factory=dict)
    on_save_error: str = "stop"  # stop: a failed save raises; continue: log it, keep training (no marker)
    upload_root: str = ""  # two tiers: commit to root, then upload to this s3://bucket/prefix in the background
    if_busy: str = "skip"  # a periodic save due while the previous one is still writing: skip | defer
    write_threads: int = 4  # parallel writers (one file each) per rank
    write_bandwidth_gbps: float = 1.0  # per rank, for the start-up emergency-save estimate until a save measures it
    fault_inject_write_delay_s: float = 0.0  # drills/tests: every shard write starts this much later
