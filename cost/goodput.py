"""Where the paid time went: productive step time vs badput, across every attempt of a run.

Categories (seconds, summed over attempts):

    productive  optimizer-step time minus data waits
    startup     process start -> end of the attempt's first step (init, build, checkpoint load,
                compile: torch.compile compiles inside the first step)
    checkpoint  time the loop is blocked by a save (sync save, or async staging)
    eval        evaluation
    data_wait   steps waiting on the input pipeline
    lost_work   steps past the previous attempt's last commit, redone after a restart
                (moved out of ``productive``, where the killed attempt had counted them)
    downtime    billed gaps between attempts
    other       paid time not attributed above (logging, a killed attempt's tail that is not
                lost steps, ...): paid - the sum of the rest, never negative

ETTR (effective training time ratio) = productive / paid. ``paid`` comes from the cost meter, so
the ledger only has to count what it can name; ``other`` takes the rest.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Sequence

from cost.budget import Budget, spend_at_next_save
from cost.config import ClusterConfig, CostConfig
from cost.heartbeat import Heartbeat, read_heartbeat
from cost.meter import CostMeter, newest_state
from cost.projection import Projection, budget_warning, project

log = logging.getLogger("moeforge")

CATEGORIES = ("productive", "startup", "checkpoint", "eval", "data_wait", "lost_work", "downtime")
BADPUT = CATEGORIES[1:] + ("other",)
STATE_VERSION = 1


def hms(seconds: Optional[float]) -> str:
    """``H:MM:SS`` (hours not wrapped at 24, like the metric line's eta); ``n/a`` when unknown."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "n/a"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summarize(seconds: Dict[str, float], paid_s: float) -> Dict[str, Any]:
    """Seconds per category (``other`` = the unattributed rest), fractions of paid, and ETTR."""
    named = {c: float(seconds.get(c, 0.0)) for c in CATEGORIES}
    paid = max(float(paid_s), sum(named.values()))  # never a negative "other"
    named["other"] = paid - sum(named.values())
    return {
        "paid_s": paid,
        "seconds": named,
        "fraction": {c: (v / paid if paid > 0 else 0.0) for c, v in named.items()},
        "ettr": named["productive"] / paid if paid > 0 else None,
    }


def summary_line(summary: Dict[str, Any], attempt: Optional[int] = None) -> str:
    """``goodput: ETTR 87.1% of 1:02:03 paid | productive 0:54:00 | startup 0:03:10 (5.1%) ...``"""
    ettr = summary["ettr"]
    head = f"goodput{f' after attempt {attempt}' if attempt else ''}: ETTR " + (
        f"{ettr * 100:.1f}%" if ettr is not None else "n/a") + f" of {hms(summary['paid_s'])} paid"
    parts = [f"productive {hms(summary['seconds']['productive'])}"]
    for c in BADPUT:
        v = summary["seconds"][c]
        if v > 0:
            parts.append(f"{c} {hms(v)} ({summary['fraction'][c] * 100:.1f}%)")
    return " | ".join([head] + parts)


class GoodputLedger:
    """Running totals per category; JSON-able state for trainer_state and the heartbeat."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {c: 0.0 for c in CATEGORIES}

    def add(self, category: str, seconds: float) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"goodput category {category!r} must be one of {CATEGORIES}")
        if seconds > 0:
            self.seconds[category] += float(seconds)

    def add_step(self, step_s: float, data_wait_s: float = 0.0) -> None:
        """One optimizer step: its data wait is badput, the rest productive."""
        wait = min(max(0.0, data_wait_s), max(0.0, step_s))
        self.add("data_wait", wait)
        self.add("productive", step_s - wait)

    def move(self, src: str, dst: str, seconds: float) -> float:
        """Reclassify up to ``seconds`` from ``src`` to ``dst``; returns what was moved."""
        moved = min(max(0.0, seconds), self.seconds[src])
        self.seconds[src] -= moved
        self.seconds[dst] += moved
        return moved

    def summary(self, paid_s: float) -> Dict[str, Any]:
        return summarize(self.seconds, paid_s)

    def line(self, paid_s: float, attempt: Optional[int] = None) -> str:
        return summary_line(self.summary(paid_s), attempt)

    def metrics(self, paid_s: float) -> Dict[str, Optional[float]]:
        """Flat JSONL/W&B keys: ``goodput/ettr`` and ``goodput/<category>_s``."""
        s = self.summary(paid_s)
        out: Dict[str, Optional[float]] = {"goodput/ettr": s["ettr"]}
        out.update({f"goodput/{c}_s": v for c, v in s["seconds"].items()})
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "seconds": dict(self.seconds)}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        state = state or {}
        if int(state.get("version", 1)) > STATE_VERSION:
            raise ValueError(f"goodput state version {state.get('version')} is newer than this "
                             f"code understands ({STATE_VERSION}); upgrade moeforge")
        self.seconds = {c: float(state.get("seconds", {}).get(c, 0.0)) for c in CATEGORIES}


def lost_work_s(prev_last_step: Optional[int], resumed_step: int,
                prev_step_time_s: Optional[float]) -> float:
    """Seconds of work redone: steps the previous attempt ran past the step resumed from, at its
    step time. 0 when either is unknown."""
    if prev_last_step is None or not prev_step_time_s:
        return 0.0
    return max(0, int(prev_last_step) - int(resumed_step)) * float(prev_step_time_s)


@dataclass
class ResumeInfo:
    source: str  # "fresh" | "checkpoint" | "heartbeat"
    attempt: int
    gap_raw_s: float
    gap_billed_s: float
    lost_steps: int
    lost_s: float

    def message(self) -> str:
        if self.source == "fresh":
            return "cost: attempt 1 of this run"
        return (f"cost: attempt {self.attempt}; totals from the {self.source}; gap since the last "
                f"attempt {hms(self.gap_raw_s)} ({hms(self.gap_billed_s)} billed); "
                f"{self.lost_steps} steps past the last commit are redone ({hms(self.lost_s)})")


def resume_accounting(meter: CostMeter, ledger: GoodputLedger,
                      trainer_state: Optional[Dict[str, Any]], heartbeat: Optional[Dict[str, Any]],
                      resumed_step: int) -> ResumeInfo:
    """Continue cost and goodput totals after build/resume, from the newest of the checkpoint's
    trainer_state (keys ``cost``, ``goodput``) and the run directory's heartbeat.

    Bills the gap since the previous attempt's last persisted time (as downtime), and moves the
    previous attempt's steps past ``resumed_step`` from productive to lost work. A fresh start
    in a run directory whose heartbeat shows earlier attempts (killed before their first
    checkpoint) continues their totals too: that time was paid.
    """
    ts = trainer_state or {}
    hb = heartbeat or {}
    cost_state = newest_state(ts.get("cost"), hb.get("cost"))
    if cost_state is None:
        meter.set_resumed_step(resumed_step)
        return ResumeInfo("fresh", meter.attempt, 0.0, 0.0, 0, 0.0)
    from_hb = cost_state is hb.get("cost")
    meter.load_state_dict(cost_state)
    ledger.load_state_dict(hb.get("goodput") if from_hb else ts.get("goodput"))
    meter.set_resumed_step(resumed_step)
    prev = meter.previous or {}
    lost_steps = max(0, int(prev.get("last_step") or 0) - int(resumed_step))
    lost = 0.0
    if from_hb:  # the heartbeat's ledger counted those steps as productive; a checkpoint's did not
        lost = ledger.move("productive", "lost_work",
                           lost_work_s(prev.get("last_step"), resumed_step, prev.get("step_time_s")))
    else:
        lost_steps = 0  # the checkpoint knows nothing past itself
    gap = float(meter.current["gap_s"])
    ledger.add("downtime", gap)
    return ResumeInfo("heartbeat" if from_hb else "checkpoint", meter.attempt,
                      float(meter.current["gap_raw_s"]), gap, lost_steps, lost)


# -- the trainer's one object ---------------------------------------------------------------------


def next_save_step(step: int, every_steps: int, max_steps: int) -> int:
    """The step of the next scheduled save after ``step`` (the final step if sooner)."""
    if every_steps and every_steps > 0:
        return min(max_steps, (step // every_steps + 1) * every_steps)
    return max_steps


class RunAccounting:
    """Cost meter + goodput ledger + budget + heartbeat, behind the calls the loop makes.

    ``clock`` is ``time.time`` (wall clock: it must compare across processes and machines);
    tests pass a fake. Only the ``heartbeat`` is rank-0-only; the rest is cheap arithmetic every
    rank may do, but stop decisions should be taken on rank 0 and shared (the loop's all-reduce).
    """

    def __init__(self, cluster: ClusterConfig, cost_cfg: CostConfig, run_dir: str,
                 start_time: float, *,
                 rank: int = 0, clock: Callable[[], float] = time.time,
                 hooks: Sequence[Callable[[str, str], None]] = (),
                 rate_usd_per_hour: Optional[float] = None):
        self.cfg, self.run_dir, self.clock = cost_cfg, run_dir, clock
        self.meter = CostMeter.from_config(cluster, cost_cfg, start_time=start_time,
                                           rate_usd_per_hour=rate_usd_per_hour)
        self.ledger = GoodputLedger()
        self.budget = Budget.from_config(cost_cfg, hooks)
        self.heartbeat = Heartbeat(run_dir, cost_cfg.heartbeat_every_s, enabled=rank == 0)
        self.step = 0
        self.attempt_steps = 0
        self._step_times: Deque[float] = deque(maxlen=50)
        self._save_times: Deque[float] = deque(maxlen=5)
        self._warned = False

    # -- start --------------------------------------------------------------------------------

    def resume(self, trainer_state: Optional[Dict[str, Any]], step: int,
               heartbeat: Any = "read") -> ResumeInfo:
        """After build/resume (``trainer_state`` None on a fresh start): continue every total.
        ``heartbeat``: the heartbeat as rank 0 read it before anyone wrote (train/agree.py; None:
        there is none); by default this process reads it itself (one process, tests)."""
        hb = read_heartbeat(self.run_dir) if heartbeat == "read" else heartbeat
        info = resume_accounting(self.meter, self.ledger, trainer_state, hb, step)
        fired, stopped = set(), None
        for src in ((trainer_state or {}).get("budget"), (hb or {}).get("budget")):  # hb is newer
            fired |= {float(x) for x in (src or {}).get("fired", [])}
            stopped = (src or {}).get("stopped_at") or stopped
        self.budget.load_state_dict({"fired": sorted(fired), "stopped_at": stopped})
        self.step = int(step)
        self.tick(force=True)
        return info

    def refuse_start(self) -> Optional[str]:
        """The message to log before exiting 77 when the budget is already spent, else None."""
        return self.budget.refuse_start(self.meter.spent_usd(self.clock()), self.step)

    # -- the loop -----------------------------------------------------------------------------

    def on_step(self, step: int, step_s: float, data_wait_s: float = 0.0) -> None:
        """After each optimizer step. The attempt's first step closes its startup: everything
        from process start to its end (init, load, compile) is startup."""
        now = self.clock()
        if self.attempt_steps == 0:
            self.ledger.add("startup", now - self.meter.start_time)
        else:
            self.ledger.add_step(step_s, data_wait_s)
            self._step_times.append(step_s)
        self.attempt_steps += 1
        self.step = int(step)
        self.meter.note_progress(step, self.step_time_s())

    def on_eval(self, seconds: float) -> None:
        self.ledger.add("eval", seconds)

    def on_checkpoint(self, blocked_s: float, step: int) -> None:
        """After a save: ``blocked_s`` is how long the loop waited (staging, for async saves)."""
        self.ledger.add("checkpoint", blocked_s)
        self._save_times.append(blocked_s)
        self.meter.note_progress(step, commit_step=step)

    def step_time_s(self) -> Optional[float]:
        return statistics.median(self._step_times) if self._step_times else None

    def check_budget(self, step: int, next_save: int) -> Optional[str]:
        """At a step boundary: fire alerts; the stop message when the budget says stop."""
        now = self.clock()
        spent = self.meter.spent_usd(now)
        st = self.step_time_s()
        proj = None if st is None else spend_at_next_save(
            spent, self.meter.usd_per_hour, next_save - step, st,
            statistics.median(self._save_times) if self._save_times else 0.0)
        return self.budget.check(spent, proj, step)

    def projection(self, step: int, max_steps: int, tokens_per_step: float,
                   tokens_done: float = 0.0) -> Optional[Projection]:
        st = self.step_time_s()
        if st is None:
            return None
        now = self.clock()
        paid = self.meter.elapsed_paid_s(now)
        return project(step=step, max_steps=max_steps, step_time_s=st, tokens_per_step=tokens_per_step,
                       usd_per_hour=self.meter.usd_per_hour, spent_usd=self.meter.spent_usd(now),
                       paid_s=paid, ettr=self.ledger.summary(paid)["ettr"], tokens_done=tokens_done,
                       target_tokens=float(self.cfg.target_tokens or 0))

    def projection_warning(self, step: int, max_steps: int, tokens_per_step: float,
                           tokens_done: float = 0.0) -> Optional[str]:
        """Once per attempt, after ``cost.projection_warmup_steps`` steps: the warning when the
        projected total passes ``cost.budget_usd`` (log it as a warning)."""
        if self._warned or self.attempt_steps <= max(1, self.cfg.projection_warmup_steps):
            return None
        self._warned = True
        p = self.projection(step, max_steps, tokens_per_step, tokens_done)
        if p is None:
            return None
        now = self.clock()
        return budget_warning(p, self.budget.budget_usd, self.meter.spent_usd(now), step,
                              self.step_time_s() or 0.0, self.meter.usd_per_hour, p.ettr)

    def metrics(self, tokens: float) -> Dict[str, Any]:
        """Cost fields of the metric line plus ``goodput/*`` keys for JSONL/W&B."""
        now = self.clock()
        out: Dict[str, Any] = dict(self.meter.metrics(tokens, now))
        out["nodes"] = self.meter.current.get("nodes")  # nodes billed: metric line and JSONL
        out.update(self.ledger.metrics(self.meter.elapsed_paid_s(now)))
        return out

    def tick(self, force: bool = False, **extra: Any) -> bool:
        """Heartbeat (rank 0; throttled to ``cost.heartbeat_every_s`` unless ``force``)."""
        return self.heartbeat.maybe_write(self.meter, self.ledger, now=self.clock(), force=force,
                                          budget=self.budget.state_dict(), step=self.step, **extra)

    # -- persistence and exit -----------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Keys ``cost``, ``goodput``, ``budget`` to merge into trainer_state."""
        return {"cost": self.meter.state_dict(self.clock()), "goodput": self.ledger.state_dict(),
                "budget": self.budget.state_dict()}

    def mark_exit(self, exit_code: int, reason: str = "") -> None:
        """Before the final save, when the exit is already decided (done, early stop, budget):
        the checkpoint then records a deliberate exit, so a later re-run bills no idle gap even
        if the heartbeat is lost."""
        self.meter.end_attempt(exit_code, reason, now=self.clock())

    def finish(self, exit_code: int, reason: str = "") -> str:
        """At exit, every path: records the exit, writes the last heartbeat, returns the
        end-of-attempt goodput line to log."""
        now = self.clock()
        if self.attempt_steps == 0:  # never finished a step: all of it was startup
            self.ledger.add("startup", now - self.meter.start_time)
            self.attempt_steps = -1  # once, even if finish is called twice
        self.meter.end_attempt(exit_code, reason, now=now)
        self.tick(force=True)
        return (self.ledger.line(self.meter.elapsed_paid_s(now), self.meter.attempt)
                + f" | spent ${self.meter.spent_usd(now):.2f}")
