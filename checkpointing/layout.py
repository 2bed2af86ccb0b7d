"""Names and shapes of things on checkpoint storage. Pure: no I/O.

    <checkpoint.root or output_dir>/<run_name>/step_<N:09d>/
        .metadata, __<rank>_0.distcp ...   DCP shards (tensors: model, optimizer, RNG)
        trainer_state.json                 non-tensor trainer state (JSON, never pickle)
        meta.json                          summary: step, tokens, world size, versions, cost ...
        COMMITTED                          written last; the step counts only when it exists
"""

from __future__ import annotations

import platform
import re
import time
from datetime import datetime, timezone
from typing import Any, Dict, Mapping, Optional

STEP_PREFIX = "step_"
COMMIT_MARKER = "COMMITTED"
META_FILE = "meta.json"
TRAINER_STATE_FILE = "trainer_state.json"
DCP_METADATA_FILE = ".metadata"
META_SCHEMA_VERSION = 1

_STEP_RE = re.compile(r"^step_(\d{9,})$")


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{STEP_PREFIX}{step:09d}"


def parse_step(name: str) -> Optional[int]:
    """The step of a step directory name (a trailing slash or a parent path is tolerated), else None."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    m = _STEP_RE.match(base)
    return int(m.group(1)) if m else None


def join(base: str, *parts: str) -> str:
    """Join with '/', which every fsspec filesystem (local paths included) accepts."""
    out = base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = (out + part if out.endswith("/") else f"{out}/{part}") if out else part
    return out


def run_checkpoint_dir(root: str, output_dir: str, run_name: str) -> str:
    """``<root or output_dir>/<run_name>``: the directory that holds this run's step directories."""
    if not run_name:
        raise ValueError("run_name must be resolved before checkpoint paths are built")
    base = root or output_dir
    if not base:
        raise ValueError("checkpoint.root and output_dir are both empty")
    return join(base, run_name)


def step_dir(run_ckpt_dir: str, step: int) -> str:
    return join(run_ckpt_dir, step_dir_name(step))


def versions() -> Dict[str, str]:
    import torch  # local: keep this module importable for pure tests without paying for torch

    try:
        from importlib.metadata import version

        moeforge = version("moeforge")
    except Exception:  # not installed as a distribution (running from a checkout)
        moeforge = "unknown"
    return {"torch": torch.__version__, "python": platform.python_version(), "moeforge": moeforge}


def build_meta(step: int, world_size: int, trainer_meta: Mapping[str, Any],
               now: Optional[float] = None) -> Dict[str, Any]:
    """meta.json content: what the trainer passes (tokens, samples_consumed, config_hash, cost ...)
    plus the fields this package owns (step, world size, versions, wall time, schema)."""
    now = time.time() if now is None else now
    meta: Dict[str, Any] = dict(trainer_meta)
    meta.update(
        schema_version=META_SCHEMA_VERSION,
        step=int(step),
        world_size=int(world_size),
        versions={**versions(), **dict(trainer_meta.get("versions") or {})},  # the caller's win
        saved_at_unix=now,
        saved_at=datetime.fromtimestamp(now, tz=timezone.utc).isoformat(timespec="seconds"),
    )
    return meta
