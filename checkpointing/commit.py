"""The commit protocol: a step directory counts only when its marker exists.

1. every rank writes its DCP shards (DCP fsyncs them; rank 0 writes ``.metadata`` after it has
   gathered every rank's write results);
2. a barrier, when a process group exists, so no rank is still writing;
3. rank 0 writes ``trainer_state.json``, then ``meta.json``, then the marker LAST, each atomically.

On an object store the marker object is the commit: a PUT is atomic, and a listing that shows the
marker was taken after every earlier PUT completed.
"""

from __future__ import annotations

import json
from typing import Any, List, Mapping, Optional

from checkpointing import layout
from checkpointing.storage import Storage


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    # allow_nan=False: a NaN in the meta would make the file unreadable by strict JSON readers
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_commit(storage: Storage, step_dir: str, meta: Mapping[str, Any],
                 trainer_state: Optional[Mapping[str, Any]] = None) -> None:
    """Rank 0 only, after every rank's shards are durable. The marker goes last."""
    storage.write_atomic(layout.join(step_dir, layout.TRAINER_STATE_FILE), _json_bytes(trainer_state or {}))
    storage.write_atomic(layout.join(step_dir, layout.META_FILE), _json_bytes(meta))
    write_marker(storage, step_dir, meta)


def write_marker(storage: Storage, step_dir: str, meta: Mapping[str, Any]) -> None:
    body = {"step": meta.get("step"), "saved_at": meta.get("saved_at")}
    storage.write_atomic(layout.join(step_dir, layout.COMMIT_MARKER), _json_bytes(body))


def is_committed(storage: Storage, step_dir: str) -> bool:
    return storage.exists(layout.join(step_dir, layout.COMMIT_MARKER))


def _step_dirs(storage: Storage, run_ckpt_dir: str) -> List[int]:
    steps = []
    for name in storage.list_subdirs(run_ckpt_dir):
        step = layout.parse_step(name)
        if step is not None:
            steps.append(step)
    return sorted(steps)


def list_committed(storage: Storage, run_ckpt_dir: str) -> List[int]:
    """Committed steps, ascending."""
    return [s for s in _step_dirs(storage, run_ckpt_dir)
            if is_committed(storage, layout.step_dir(run_ckpt_dir, s))]


def list_uncommitted(storage: Storage, run_ckpt_dir: str) -> List[int]:
    """Step directories without a marker (a save that died, or one in flight), ascending."""
    return [s for s in _step_dirs(storage, run_ckpt_dir)
            if not is_committed(storage, layout.step_dir(run_ckpt_dir, s))]


def read_json(storage: Storage, url: str) -> Any:
    return json.loads(storage.read_text(url))


def read_meta(storage: Storage, step_dir: str) -> dict:
    return read_json(storage, layout.join(step_dir, layout.META_FILE))


def read_trainer_state(storage: Storage, step_dir: str) -> dict:
    return read_json(storage, layout.join(step_dir, layout.TRAINER_STATE_FILE))
