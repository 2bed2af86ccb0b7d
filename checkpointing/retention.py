"""Which committed steps retention deletes. Pure."""

from __future__ import annotations

from typing import Iterable, List


def steps_to_delete(committed_steps: Iterable[int], keep_last: int, keep_every: int = 0) -> List[int]:
    """Steps to delete, ascending: everything but the newest ``keep_last`` and every step that is a
    multiple of ``keep_every``. ``keep_last <= 0`` keeps all. The newest step is never deleted,
    whatever the arguments: it is what a resume would load."""
    steps = sorted(set(int(s) for s in committed_steps))
    if not steps or keep_last <= 0:
        return []
    keep = set(steps[-keep_last:])
    keep.add(steps[-1])
    if keep_every > 0:
        keep.update(s for s in steps if s % keep_every == 0)
    return [s for s in steps if s not in keep]
