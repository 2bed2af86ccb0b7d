"""Two decisions around async saves, as small testable pieces.

* A periodic save that comes due while the previous one is still writing (``checkpoint.if_busy``):
  ``skip`` it (the next interval's save is the next chance) or ``defer`` it to the first step
  boundary after the previous one commits. Never queue it behind the write, which is what used to
  stall the loop for the rest of that write. Said once, with the interval and the write time.
* Whether an emergency save can meet ``health.preemption_deadline_s``: estimated from the state's
  byte size and the write bandwidth (``checkpoint.write_bandwidth_gbps``, then measured by each
  committed save), and said at the start of the run rather than at the notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

COMMIT_SLACK_S = 2.0  # marker + meta + trainer_state writes, the final barrier, logging


@dataclass
class BusySaves:
    """What ``checkpoint.if_busy`` did so far in this attempt."""

    policy: str = "skip"
    deferred: bool = False  # a save is owed at the next boundary where none is writing
    skipped: int = 0
    warned: bool = False

    def on_busy(self, step: int, every_steps: int, writing_step: Optional[int], writing_s: Optional[float],
                step_time_s: Optional[float]) -> Optional[str]:
        """A save came due at ``step`` while the save of ``writing_step`` has been writing for
        ``writing_s``. Returns the warning to log (the first time only), else None."""
        if self.policy == "defer":
            self.deferred = True
        else:
            self.skipped += 1
        if self.warned:
            return None
        self.warned = True
        interval = (f"checkpoint.every_steps={every_steps}"
                    + (f" = {every_steps * step_time_s:.1f} s" if step_time_s else ""))
        writing = (f"the save of step {writing_step} has been writing for {writing_s:.1f} s"
                   if writing_step is not None and writing_s is not None else "the previous save is still writing")
        action = ("deferred to the first step after it commits" if self.policy == "defer" else
                  "skipped (the next interval's save is the next chance)")
        return (f"checkpoint due at step {step}: {writing}, longer than the interval ({interval}); this save is "
                f"{action} by checkpoint.if_busy={self.policy}, and so is any later one that comes due while a "
                "save is writing (said once). Raise checkpoint.every_steps, or give the writer more bandwidth "
                "(checkpoint.write_threads).")


def emergency_estimate_s(state_bytes: int, write_gbps: float, poll_s: float = 0.0, step_s: float = 0.0,
                         copy_gbps: float = 1000.0) -> float:
    """Seconds from a notice to a committed checkpoint: the notice is seen within ``poll_s``, the
    stop is decided at the end of the current step, then a snapshot (``copy_gbps``: device copy
    bandwidth), the write at ``write_gbps`` per rank, and the commit. A periodic save still writing
    at the notice is reused rather than written twice, so it never takes longer than a fresh one."""
    gb = state_bytes / 1e9
    return poll_s + step_s + gb / copy_gbps + gb / max(write_gbps, 1e-9) + COMMIT_SLACK_S


def deadline_message(state_bytes: int, write_gbps: float, source: str, estimate_s: float, deadline_s: float) -> str:
    verdict = "fits" if estimate_s <= deadline_s else "does NOT fit"
    out = (f"emergency checkpoint estimate: {state_bytes / 1e9:.2f} GB per rank at {write_gbps:.2f} GB/s ({source}) "
           f"-> ~{estimate_s:.0f} s from notice to commit, which {verdict} health.preemption_deadline_s="
           f"{deadline_s:.0f}")
    if estimate_s > deadline_s:
        out += (": a spot notice or SIGTERM would likely kill the run before its checkpoint commits. Use faster "
                "storage for checkpoint.root (local NVMe), more checkpoint.write_threads, more ranks (smaller "
                "shards), or save more often so less work is lost")
    return out
