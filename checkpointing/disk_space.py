"""A full disk, said plainly: how big a checkpoint will be, how much room its target has, and
whether a failed write was a full disk.

A disk that filled during a save used to surface as torch's zip writer error ``unexpected pos 704
vs 598``, with the ENOSPC only deeper in the chain. Here every such failure reads
``no space left on <path>: need ~X GB, Y GB free``; before a save that cannot fit, the save is
refused with the same words before a byte is written. Local disks and POSIX mounts (FSx) only:
an object store has no free space to ask about.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional

import torch

from checkpointing import commit, layout
from checkpointing.storage import Storage

log = logging.getLogger(__name__)
# What a full disk looks like once an error has been turned into text (another rank's error
# arrives as text): the OS's words, and torch's zip writer when a short write moved its position.
_NO_SPACE_TEXT = ("No space left on device", f"[Errno {errno.ENOSPC}]", "unexpected pos")


def gb(nbytes: float) -> str:
    """Gigabytes, three significant digits, never in exponent form: 236, 23.6, 0.0178."""
    value = nbytes / 1e9
    if value <= 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(value)))
    return f"{value:.{decimals}f}"


def no_space_message(path: str, need: Optional[int], free: Optional[int]) -> str:
    need_s = f"~{gb(need)} GB" if need is not None else "an unknown amount"
    free_s = f"{gb(free)} GB free" if free is not None else "free space unknown"
    return f"no space left on {path}: need {need_s}, {free_s}"


def tensor_bytes(obj: Any) -> int:
    """Bytes DCP writes for the tensors in a (nested) state: a DTensor counts at its full shape
    (DCP writes each shard once, however many ranks hold a replica), a plain tensor as it is."""
    if isinstance(obj, torch.Tensor):  # a DTensor's numel() is the global one
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _adam_like(optimizer: Any) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def estimate_state_bytes(state: Mapping[str, Any]) -> int:
    """What the state will take on disk, without calling ``state_dict()`` (that runs before the
    save's first collective, and at start-up an optimizer has no state yet: building it would
    change the run). Stateful wrappers holding ``model``/``optimizer`` (AppState) count each model's
    parameters and buffers once, and each optimizer's tensors once, or two fp32 moments per
    parameter for an Adam-family optimizer not yet stepped; tensors elsewhere count as they are."""
    total, seen = 0, set()
    for value in state.values():
        model, optimizer = getattr(value, "model", None), getattr(value, "optimizer", None)
        if isinstance(model, torch.nn.Module) and id(model) not in seen:
            seen.add(id(model))
            total += tensor_bytes(dict(model.state_dict()))
        if isinstance(optimizer, torch.optim.Optimizer) and id(optimizer) not in seen:
            seen.add(id(optimizer))
            moments = tensor_bytes([dict(s) for s in optimizer.state.values()])
            if not moments and _adam_like(optimizer):
                moments = 2 * sum(p.numel() * 4 for g in optimizer.param_groups for p in g["params"])
            total += moments
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            total += tensor_bytes(value)
    return total


def free_bytes(path: str) -> Optional[int]:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (the nearest
    existing parent when ``path`` does not exist yet); None when it cannot be asked."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """``exc``, its causes and contexts, and (DCP) each rank's wrapped failure."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [w[0] if isinstance(w, tuple) else w for w in failures.values()]


def is_out_of_space(error: Any) -> bool:
    """Whether an exception (any link of its chain) or an error text is a full disk."""
    if isinstance(error, BaseException):
        for e in _chain(error):
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
            if any(t in str(e) for t in _NO_SPACE_TEXT):
                return True
        return False
    return any(t in str(error) for t in _NO_SPACE_TEXT)


def capacity_warning(root: str, each: int, keep_last: int, free: int, held: int) -> Optional[str]:
    """The start-up warning when ``keep_last`` committed checkpoints plus the one being written
    (each ~``each`` bytes) do not fit in ``free`` plus what this run's checkpoints already hold;
    None when they fit. Pure."""
    count = keep_last + 1
    need = count * each
    if need <= free + held:
        return None
    held_s = f" (plus {gb(held)} GB in this run's checkpoints)" if held else ""
    fit = (free + held) // each if each else 0
    return (f"checkpoints may not fit on {root}: checkpoint.keep_last={keep_last} keeps {keep_last} plus the one "
            f"being written, need ~{gb(need)} GB ({count} x ~{gb(each)} GB), {gb(free)} GB free{held_s}; "
            f"room for {fit}. Lower checkpoint.keep_last, free space, or move checkpoint.root")


def newest_size(storage: Storage, run_dir: str) -> Optional[int]:
    """Bytes of the run's newest committed checkpoint on a local target, else None (an engine's
    own format has no state to size beforehand: its last checkpoint is the estimate)."""
    if not storage.is_local:
        return None
    steps = commit.list_committed(storage, run_dir)
    return storage.tree_size(layout.step_dir(run_dir, steps[-1])) if steps else None


def explain_failure(storage: Storage, path: str, need: Optional[int], failure: str, cleanup: bool) -> str:
    """A write that failed for want of space, said plainly. With ``cleanup`` (rank 0) the partial
    step directory goes (never committed: the marker is written last), so the space it took is
    free again, and the message says what is free after that."""
    if cleanup:
        try:
            storage.rm_tree(path)
        except Exception as e:  # noqa: BLE001 - the report matters more than the cleanup
            log.warning("could not remove the partial checkpoint %s: %s: %s", path, type(e).__name__, e)
    free = free_bytes(storage.native(path)) if storage.is_local else None
    return f"{no_space_message(path, need, free)} (the write failed: {failure[:300]})"


def warn_capacity(storage: Storage, run_dir: str, state: Any, keep_last: int, engine: bool) -> None:
    """At start-up (rank 0): warn when ``keep_last`` checkpoints plus the one being written cannot
    fit on a local target. Each is sized as the newest committed checkpoint, else estimated from
    ``state`` (not for an engine's own format)."""
    if not storage.is_local:
        return
    try:
        sizes = [storage.tree_size(layout.step_dir(run_dir, s)) for s in commit.list_committed(storage, run_dir)]
        each = sizes[-1] if sizes else (None if engine else estimate_state_bytes(state))
        free = free_bytes(storage.native(run_dir))
        msg = capacity_warning(run_dir, each, keep_last, free, sum(sizes)) if each and free is not None else None
    except Exception as e:  # noqa: BLE001 - a start-up hint must never stop the run
        log.warning("could not compare checkpoint size with free space under %s: %s: %s",
                    run_dir, type(e).__name__, e)
        return
    if msg:
        log.warning(msg)
