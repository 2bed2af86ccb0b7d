"""Stop flags: the one thing watchers and signal handlers touch.

Signal handlers run in the main thread between two bytecodes, possibly while that same thread is
inside ``request`` or ``pending``; a lock taken there would deadlock. So there is no lock: every
request is appended to a list (``list.append`` is atomic under the GIL) and ``pending`` picks the
highest-priority one. No request can be lost to a race between a watcher thread and a handler.

Priority when several stop reasons arrive before the loop acts on them:

    UNHEALTHY  >  BUDGET_EXHAUSTED  >  PREEMPTED     (health.exit_codes.ExitCode)

* Unhealthy wins: the launcher must learn to exclude this node, whatever else happened; a budget
  stop is still noticed by the next attempt (the cost meter is in the checkpoint).
* Budget beats preemption: BUDGET_EXHAUSTED is terminal; resubmitting after a spot notice would
  only start a node to exit with it again.
* Any other code ranks below these, in request order.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from health.exit_codes import ExitCode

PRIORITY = {ExitCode.UNHEALTHY: 3, ExitCode.BUDGET_EXHAUSTED: 2, ExitCode.PREEMPTED: 1}
_MAX_REQUESTS = 256  # watchers request once per event; this bounds a misbehaving caller


def from_priority(p: int) -> int:
    """The exit code of a priority (inverse of ``priority``; 0 for 'no stop'). For a loop that packs
    the priority into its own boundary all-reduce instead of calling ``agree_stop``."""
    return int({v: k for k, v in PRIORITY.items()}.get(int(p), ExitCode.OK))


class StopRequest(NamedTuple):
    code: int
    reason: str
    t_notice: float  # wall time (time.time()) the notice reached this process


def priority(code: int) -> int:
    """Rank of an exit code for agreement across ranks (higher wins); 0 means 'no stop'."""
    return PRIORITY.get(code, 0) if code else 0


class StopFlags:
    """Thread- and signal-handler-safe stop requests. ``request`` never blocks and never raises."""

    def __init__(self) -> None:
        self._requests: list[StopRequest] = []

    def request(self, code: int, reason: str, t_notice: float | None = None) -> None:
        req = StopRequest(int(code), str(reason), time.time() if t_notice is None else float(t_notice))
        if len(self._requests) >= _MAX_REQUESTS:
            best = self.pending()
            if best is not None and priority(req.code) <= priority(best.code):
                return
        self._requests.append(req)

    def pending(self) -> StopRequest | None:
        """The highest-priority request (earliest among equals), or None."""
        reqs = list(self._requests)  # a snapshot: a handler may append while we scan
        if not reqs:
            return None
        best = reqs[0]
        for r in reqs[1:]:
            if priority(r.code) > priority(best.code):
                best = r
        return best

    def all(self) -> list[StopRequest]:
        return list(self._requests)

    def clear(self) -> None:
        self._requests = []


def agree_stop(flags: StopFlags, group=None) -> StopRequest | None:
    """Step-boundary agreement: every rank returns the same decision (or None).

    One all-reduce(MAX) of the local priority over ``group`` (use the gloo control group). A rank
    that has no request of its own gets the winning code with the reason "peer rank requested".
    Call it on every rank at the same step, or it blocks.
    """
    local = flags.pending()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    import torch

    mine = priority(local.code) if local else 0
    t = torch.tensor([mine], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    top = int(t.item())
    if top == 0:
        return None
    if local is not None and mine == top:
        return local
    return StopRequest(from_priority(top), "stop requested by a peer rank", time.time())
