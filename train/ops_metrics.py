"""Row keys for operations (Prometheus gauges, dashboards, alerts): checkpoint freshness and the
health flags, added to the same metrics row the console line, JSONL, W&B and TB get.

- ``checkpoint/last_commit_age_s``: seconds since the newest commit of this run (the marker's
  mtime on a POSIX path, e.g. FSx; on s3:// the moment this process saw the commit);
  (what a save cost the loop is ``ckpt/stall_s``, train/saving.py); ``checkpoint/last_ok``:
  0 after a failed save.
- ``health/flag/<kind>``: 1 while a stop is pending for that reason on this rank (``preempted``,
  ``unhealthy``, ``budget``) and ``nonfinite`` while the NaN guard is skipping steps.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

from health.exit_codes import ExitCode

FLAG_KINDS = {ExitCode.PREEMPTED: "preempted", ExitCode.UNHEALTHY: "unhealthy", ExitCode.BUDGET_EXHAUSTED: "budget"}


def _marker_mtime(step_dir: str) -> Optional[float]:
    from checkpointing.layout import COMMIT_MARKER

    if "://" in step_dir:
        return None
    try:
        return os.stat(os.path.join(step_dir, COMMIT_MARKER)).st_mtime
    except OSError:
        return None


class OpsMetrics:
    """Remembers when the newest commit landed; ``row`` gives the keys above."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._commit: Optional[tuple] = None  # (step, wall time)
        self._looked_up = False

    def _note_commit(self, ckpt, step: int) -> None:
        if self._commit is None or step > self._commit[0]:
            t = _marker_mtime(ckpt.step_path(step))
            self._commit = (step, t if t is not None else self.clock())

    def row(self, ckpt, health) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        stats = ckpt.last_save_stats() if ckpt is not None else {}
        if not self._looked_up and not stats and ckpt is not None:
            self._looked_up = True  # a resumed attempt: the commit it resumed from (one listing)
            steps = ckpt.committed_steps()
            if steps:
                self._note_commit(ckpt, max(steps))
        if stats:
            out["checkpoint/last_ok"] = int(stats.get("ckpt_ok", 1))
            if stats.get("ckpt_ok", 1) and stats.get("ckpt_step") is not None:
                self._note_commit(ckpt, int(stats["ckpt_step"]))
        if self._commit is not None:
            out["checkpoint/last_commit_age_s"] = max(0.0, self.clock() - self._commit[1])
        pending = {r.code for r in health.flags.all()} if health is not None else set()
        for code, kind in FLAG_KINDS.items():
            out[f"health/flag/{kind}"] = int(code in pending)
        guard = getattr(health, "nan_guard", None)
        out["health/flag/nonfinite"] = int(bool(guard is not None and guard.consecutive))
        return out
