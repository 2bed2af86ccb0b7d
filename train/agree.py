"""Decisions every rank takes together, each in one small collective at a defined point
(docs/resilience.md, "Decided together"). Without a process group each is the local value.

- :func:`from_rank0`: rank 0 decides (it read the file, built the logger, priced the run); every
  rank gets its answer (one broadcast).
- :func:`agree_error`: each rank says whether its part failed; every rank gets the first failure,
  named by rank (one all-gather), so all leave the same way instead of some entering collectives.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def from_rank0(value: Any, group=None) -> Any:
    """Rank 0's ``value`` on every rank (picklable values)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def agree_error(error: Optional[str], group=None) -> Optional[str]:
    """``"rank r: error"`` for the lowest rank that failed, on every rank; None when none did."""
    if not _distributed():
        return f"rank 0: {error}" if error else None
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, error, group=group)
    for r, e in enumerate(gathered):
        if e:
            return f"rank {r}: {e}"
    return None


class AgreedFailure(RuntimeError):
    """Raised on every rank when any rank's part of a decision failed (message names the rank)."""


def build_together(factory: Callable[[], T], what: str, group=None) -> Optional[T]:
    """``factory()`` on this rank, then agree: if any rank's raised, every rank raises
    AgreedFailure naming it (this rank's object, if built, is closed first when it can be)."""
    obj, error = None, None
    try:
        obj = factory()
    except Exception as e:  # noqa: BLE001 - agreed on below, re-raised on every rank
        error = f"{type(e).__name__}: {e}"
    failed = agree_error(error, group)
    if failed:
        close = getattr(obj, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - the agreed failure is the one to report
                pass
        raise AgreedFailure(f"{what} failed on {failed}; every rank stops")
    return obj
