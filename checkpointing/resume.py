"""What to resume from: ``checkpoint.resume`` = ``auto`` | ``none`` | a checkpoint path."""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Mapping, Optional

from checkpointing import commit, layout
from checkpointing.errors import CheckpointError
from checkpointing.storage import Storage

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"


def resume_candidates(mode: str, run_ckpt_dir: str, storage: Optional[Storage] = None,
                      storage_options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Step directories to try, newest first. ``none`` → []; an explicit path → [that path]
    (CheckpointError naming it if it is not committed); ``auto`` → every committed step of the run,
    newest first, warning about step directories without a marker (they are skipped)."""
    if mode == NONE:
        return []
    if mode != AUTO:
        path = mode.rstrip("/")
        st = Storage(path, storage_options)
        if not commit.is_committed(st, path):
            hint = ""
            if commit.list_committed(st, path):
                hint = " (it looks like a run directory; name a step_NNNNNNNNN directory inside it)"
            raise CheckpointError(
                f"checkpoint.resume={path}: no {layout.COMMIT_MARKER} marker there, so it is not a "
                f"committed checkpoint{hint}")
        return [path]
    st = storage or Storage(run_ckpt_dir, storage_options)
    uncommitted = commit.list_uncommitted(st, run_ckpt_dir)
    if uncommitted:
        log.warning("skipping step directories without a %s marker (a save that did not finish): %s",
                    layout.COMMIT_MARKER,
                    ", ".join(layout.step_dir(run_ckpt_dir, s) for s in uncommitted))
    return [layout.step_dir(run_ckpt_dir, s) for s in reversed(commit.list_committed(st, run_ckpt_dir))]


def resolve_resume(mode: str, run_ckpt_dir: str, storage: Optional[Storage] = None,
                   storage_options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The step directory to resume from, or None for a fresh start (the newest candidate; the
    manager's ``load_latest`` falls back to older ones when that one fails to load)."""
    cands = resume_candidates(mode, run_ckpt_dir, storage, storage_options)
    return cands[0] if cands else None


class RanksDisagree(CheckpointError):
    """Some ranks can read the chosen step and some cannot: every rank stops (never an older step)."""


def agree_readable(path: str, storage_options: Optional[Mapping[str, Any]],
                   all_errors: Callable[[Optional[str]], List[str]], world: int) -> Optional[str]:
    """Collective (``all_errors`` all-gathers one error per rank): can every rank read ``path``
    (commit marker, meta, trainer state)? None when all can; the shared error when none can;
    CheckpointError on every rank when only some can: loading an older step on those ranks would
    resume the ranks from different steps."""
    error = None
    try:
        st = Storage(path, storage_options)
        if not commit.is_committed(st, path):
            raise CheckpointError(f"{path} is not a committed checkpoint (no {layout.COMMIT_MARKER})")
        commit.read_meta(st, path)
        commit.read_trainer_state(st, path)
    except Exception as e:  # noqa: BLE001 - agreed on below, then raised on every rank
        error = f"{type(e).__name__}: {e}"
    errors = all_errors(error)
    if errors and len(errors) < world:
        raise RanksDisagree(
            f"rank 0 chose to resume from {path}, but not every rank can read it ({'; '.join(errors)}). "
            "Refusing to load an older step on some ranks: is checkpoint.root on storage every node shares? "
            "Retry after a transient storage error.")
    return errors[0] if errors else None
