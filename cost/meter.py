"""What a run costs: the hourly rate from the cluster catalog and a meter that spans attempts
(the heartbeat file that lets the next attempt bill a killed one: cost/heartbeat.py; the budget:
cost/budget.py).

The rate is per instance-hour times nodes: ``cost.price_per_hour`` (an override, e.g. a negotiated
or Savings-Plan rate) wins; else ``cluster.price_spot_per_hour`` when ``cluster.lifecycle`` is
``spot``; else ``cluster.price_on_demand_per_hour``.

Paid time of a run = Σ over attempts (attempt wall time from process start to its last sign of
life) + Σ billed gaps between attempts. EC2 bills the instance while it loads checkpoints,
compiles and waits on stragglers, so the meter starts at process start (``start_time`` from the
trainer), not at the first step. A killed attempt's time after its last checkpoint is known from
the heartbeat file (``heartbeat.json`` in the run directory, rewritten atomically by rank 0); the
gap from its last heartbeat to the next attempt's start is billed at the previous attempt's rate,
capped by ``cost.max_gap_billed_s`` (-1 = the whole gap, the default: for capacity that stays
paid while a job is requeued). A gap after a deliberate exit (0 done, 2 bad config, 77 budget)
is never billed: the person chose when to start again.

Every attempt is one record in ``history`` with its own rate, so an attempt that resumes on a
different rate (spot after on-demand) does not re-price the past. docs/cost.md has the formulas.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from cost.config import ClusterConfig, CostConfig
from health.exit_codes import ExitCode

log = logging.getLogger("moeforge")

LIFECYCLES = ("on_demand", "spot")
STATE_VERSION = 2
# Exits after which the next start is a person's choice, not a requeue: the gap is not billed.
DELIBERATE_EXITS = (ExitCode.OK, ExitCode.CONFIG_ERROR, ExitCode.BUDGET_EXHAUSTED)


def price_per_instance_hour(cluster: ClusterConfig, cost: CostConfig) -> float:
    """$ per instance-hour that applies to this run (override > spot > on-demand)."""
    if cost.price_per_hour and cost.price_per_hour > 0:
        return float(cost.price_per_hour)
    if cluster.lifecycle not in LIFECYCLES:
        raise ValueError(
            f"cluster.lifecycle={cluster.lifecycle!r} must be one of {LIFECYCLES}"
        )
    if cluster.lifecycle == "spot":
        return float(cluster.price_spot_per_hour)
    return float(cluster.price_on_demand_per_hour)


def usd_per_hour(cluster: ClusterConfig, cost: CostConfig) -> float:
    """$ per wall-clock hour for the whole run: instance price x nodes. ``cluster.nodes=0`` (unset)
    counts as one node here; the trainer replaces it by the launched count first (cost/nodes.py)."""
    if cluster.nodes < 0:
        raise ValueError(f"cluster.nodes={cluster.nodes} must be >= 0")
    return price_per_instance_hour(cluster, cost) * max(1, cluster.nodes)


def process_start_time() -> float:
    """This process's start on the ``time.time()`` clock, from /proc (Linux): the meter then
    bills interpreter start and imports too (seconds for torch). Elsewhere: now, said loudly."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        # Age on the boot clock (starttime counts from boot, like CLOCK_BOOTTIME), subtracted from
        # now: /proc/stat's btime is whole seconds and drifts from the wall clock.
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError) as e:
        log.warning("process start time unavailable (%s): billing from now", e)
        return time.time()


def usd_for(seconds: float, rate_usd_per_hour: float) -> float:
    return seconds / 3600.0 * rate_usd_per_hour


def usd_per_mtok(spent_usd: float, tokens: float) -> Optional[float]:
    """$ per million tokens; None when no token has been trained yet."""
    if tokens <= 0:
        return None
    return spent_usd / (tokens / 1e6)


def tokens_per_usd(spent_usd: float, tokens: float) -> Optional[float]:
    """Tokens per dollar; None when nothing has been spent (free hardware or time zero)."""
    if spent_usd <= 0:
        return None
    return tokens / spent_usd


def billed_gap_s(prev_end: Optional[float], start: float, max_gap_billed_s: float = -1.0,
                 prev_exit_code: Optional[int] = None) -> float:
    """Seconds of the gap between attempts that are billed.

    ``prev_end`` is the previous attempt's last persisted wall time (heartbeat or checkpoint);
    ``max_gap_billed_s`` < 0 bills the whole gap, 0 none, > 0 at most that much. A gap after a
    deliberate exit (``DELIBERATE_EXITS``) is not billed; a clock that went backwards bills 0.
    """
    if prev_end is None or prev_exit_code in DELIBERATE_EXITS:
        return 0.0
    gap = max(0.0, float(start) - float(prev_end))
    return gap if max_gap_billed_s < 0 else min(gap, float(max_gap_billed_s))


def history_totals(history: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """``paid_s`` and ``spent_usd`` over attempt records (gaps included), and the gap parts alone."""
    paid = sum(float(r.get("paid_s", 0.0)) + float(r.get("gap_s", 0.0)) for r in history)
    spent = sum(float(r.get("spent_usd", 0.0)) for r in history)
    gap_s = sum(float(r.get("gap_s", 0.0)) for r in history)
    return {"paid_s": paid, "spent_usd": spent, "gap_s": gap_s,
            "gap_usd": sum(float(r.get("gap_usd", 0.0)) for r in history)}


def interruptions(history: Sequence[Dict[str, Any]]) -> int:
    """Attempts that ended without a deliberate exit and were followed by another attempt.

    The newest record is the live attempt (or the last one); it has not been interrupted yet.
    """
    return sum(1 for r in history[:-1] if r.get("exit_code") not in DELIBERATE_EXITS)


def interruptions_per_hour(history: Sequence[Dict[str, Any]]) -> float:
    """Observed interruptions per paid attempt-hour (gaps excluded); 0 before any paid time."""
    hours = sum(float(r.get("paid_s", 0.0)) for r in history) / 3600.0
    return interruptions(history) / hours if hours > 0 else 0.0


class CostMeter:
    """Dollars spent by a run across all its attempts.

    ``usd_per_hour`` is the rate of the whole run (all nodes); ``start_time`` is this process's
    start on the ``time.time()`` clock (the trainer passes it, so time spent before the meter was
    built still counts). ``load_state_dict`` continues a saved run: the earlier attempts come back
    as records, and the gap since the newest one's last persisted time is billed per
    ``billed_gap_s``.
    """

    def __init__(self, usd_per_hour: float, start_time: Optional[float] = None,
                 max_gap_billed_s: float = -1.0, nodes: int = 1, lifecycle: str = ""):
        if usd_per_hour < 0:
            raise ValueError(f"usd_per_hour={usd_per_hour} must be >= 0")
        self.usd_per_hour = float(usd_per_hour)
        self.start_time = time.time() if start_time is None else float(start_time)
        self.max_gap_billed_s = float(max_gap_billed_s)
        self.history: List[Dict[str, Any]] = []  # earlier attempts, oldest first
        self.current: Dict[str, Any] = self._new_record(1, gap_s=0.0, gap_usd=0.0, gap_raw_s=0.0)
        self.current.update(nodes=int(nodes), lifecycle=lifecycle)

    @classmethod
    def from_config(
        cls, cluster: ClusterConfig, cost: CostConfig, start_time: Optional[float] = None,
        rate_usd_per_hour: Optional[float] = None,
    ) -> "CostMeter":
        """``rate_usd_per_hour``: the whole run's rate when the nodes' prices were summed
        (cost/nodes.py, heterogeneous node groups); else instance price x nodes."""
        rate = usd_per_hour(cluster, cost) if rate_usd_per_hour is None else rate_usd_per_hour
        return cls(rate, start_time=start_time,
                   max_gap_billed_s=cost.max_gap_billed_s, nodes=max(1, cluster.nodes),
                   lifecycle=cluster.lifecycle)

    def _new_record(self, attempt: int, gap_s: float, gap_usd: float, gap_raw_s: float) -> Dict[str, Any]:
        return {"attempt": attempt, "start": self.start_time, "last_alive": self.start_time,
                "paid_s": 0.0, "usd_per_hour": self.usd_per_hour, "gap_s": gap_s,
                "gap_raw_s": gap_raw_s, "gap_usd": gap_usd, "spent_usd": gap_usd,
                "resumed_from_step": 0, "last_step": 0, "commit_step": None,
                "step_time_s": None, "exit_code": None, "exit_reason": None}

    # -- the live attempt -------------------------------------------------------------------------

    @property
    def attempt(self) -> int:
        return int(self.current["attempt"])

    @property
    def prior_paid_s(self) -> float:
        return history_totals(self.history)["paid_s"] + float(self.current["gap_s"])

    @property
    def prior_spent_usd(self) -> float:
        return history_totals(self.history)["spent_usd"] + float(self.current["gap_usd"])

    def attempt_paid_s(self, now: Optional[float] = None) -> float:
        now = time.time() if now is None else now
        return max(0.0, now - self.start_time)

    def elapsed_paid_s(self, now: Optional[float] = None) -> float:
        """Paid seconds of every attempt so far, this one and billed gaps included."""
        return self.prior_paid_s + self.attempt_paid_s(now)

    def spent_usd(self, now: Optional[float] = None) -> float:
        return self.prior_spent_usd + usd_for(self.attempt_paid_s(now), self.usd_per_hour)

    def usd_per_mtok(self, tokens: float, now: Optional[float] = None) -> Optional[float]:
        """``tokens`` is the run's total (all attempts), as the trainer counts it."""
        return usd_per_mtok(self.spent_usd(now), tokens)

    def tokens_per_usd(self, tokens: float, now: Optional[float] = None) -> Optional[float]:
        return tokens_per_usd(self.spent_usd(now), tokens)

    def projected_usd(self, remaining_s: float, now: Optional[float] = None) -> float:
        """Spent so far plus ``remaining_s`` more at the current rate (for an ETA in dollars)."""
        return self.spent_usd(now) + usd_for(max(0.0, remaining_s), self.usd_per_hour)

    def metrics(self, tokens: float, now: Optional[float] = None) -> Dict[str, Optional[float]]:
        """The cost fields of a metric line: ``spent_usd``, ``usd_per_mtok``, ``tok_per_usd``
        (plus ``paid_s`` and ``attempt`` for JSONL)."""
        spent = self.spent_usd(now)
        return {
            "spent_usd": spent,
            "usd_per_mtok": usd_per_mtok(spent, tokens),
            "tok_per_usd": tokens_per_usd(spent, tokens),
            "paid_s": self.elapsed_paid_s(now),
            "attempt": self.attempt,
        }

    def note_progress(self, step: int, step_time_s: Optional[float] = None,
                      commit_step: Optional[int] = None) -> None:
        """The live attempt's last step (and median step time, last committed step), so the next
        attempt can tell how much work past the commit it redoes."""
        self.current["last_step"] = int(step)
        if step_time_s is not None:
            self.current["step_time_s"] = float(step_time_s)
        if commit_step is not None:
            self.current["commit_step"] = int(commit_step)

    def set_resumed_step(self, step: int) -> None:
        self.current["resumed_from_step"] = self.current["last_step"] = int(step)

    def end_attempt(self, exit_code: int, reason: str = "", now: Optional[float] = None) -> None:
        """Marks how this attempt ended (call before the final heartbeat write)."""
        self.current["exit_code"] = int(exit_code)
        self.current["exit_reason"] = reason or None
        self._freeze_current(now)

    def _freeze_current(self, now: Optional[float]) -> Dict[str, Any]:
        now = time.time() if now is None else now
        paid = self.attempt_paid_s(now)
        self.current.update(last_alive=max(self.start_time, now), paid_s=paid,
                            spent_usd=float(self.current["gap_usd"]) + usd_for(paid, self.usd_per_hour))
        return self.current

    def all_records(self, now: Optional[float] = None) -> List[Dict[str, Any]]:
        """Every attempt's record, this one brought up to ``now``; copies, oldest first."""
        return [dict(r) for r in self.history] + [dict(self._freeze_current(now))]

    # -- persistence ------------------------------------------------------------------------------

    def state_dict(self, now: Optional[float] = None) -> Dict[str, Any]:
        """Plain JSON-able totals and the attempt history (checkpoint trainer_state, heartbeat)."""
        records = self.all_records(now)
        totals = history_totals(records)
        return {
            "version": STATE_VERSION,
            "paid_s": totals["paid_s"],
            "spent_usd": totals["spent_usd"],
            "attempts": self.attempt,
            "usd_per_hour": self.usd_per_hour,  # the rate of the attempt that saved
            "saved_at": records[-1]["last_alive"],
            "history": records,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues the totals of a saved run; this process becomes the next attempt, and the gap
        since the saved state's last persisted time is billed (``billed_gap_s``)."""
        history = state_history(state)
        prev = history[-1]
        raw = max(0.0, self.start_time - float(prev["last_alive"])) if prev.get("last_alive") is not None else 0.0
        gap = billed_gap_s(prev.get("last_alive"), self.start_time, self.max_gap_billed_s,
                           prev.get("exit_code"))
        gap_usd = usd_for(gap, float(prev.get("usd_per_hour", self.usd_per_hour)))
        keep = {k: self.current[k] for k in ("nodes", "lifecycle") if k in self.current}
        self.history = history
        self.current = self._new_record(int(prev["attempt"]) + 1, gap, gap_usd, raw)
        self.current.update(keep)

    @property
    def previous(self) -> Optional[Dict[str, Any]]:
        """The attempt before this one (as loaded), or None on a first attempt."""
        return dict(self.history[-1]) if self.history else None


def state_history(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The attempt records of a saved cost state; a version-1 state becomes one summary record."""
    version = int(state.get("version", 1))
    if version > STATE_VERSION:
        raise ValueError(
            f"cost state version {version} is newer than this code understands "
            f"({STATE_VERSION}); upgrade moeforge to resume this run"
        )
    if state.get("history"):
        return [dict(r) for r in state["history"]]
    # version 1: totals only. One record that carries them; no timestamp, so no gap is billed.
    return [{"attempt": int(state.get("attempts", 1)), "start": None, "last_alive": None,
             "paid_s": float(state["paid_s"]), "gap_s": 0.0, "gap_usd": 0.0,
             "spent_usd": float(state["spent_usd"]), "usd_per_hour": state.get("usd_per_hour", 0.0),
             "exit_code": None, "last_step": None, "summary_of_v1": True}]


def newest_state(*states: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The cost state that knows most: highest attempt, then latest persisted time.

    The heartbeat is normally newer than the checkpoint (written more often, and by killed
    attempts that never saved); the checkpoint wins when the heartbeat is missing or older.
    Ties go to the later argument (call it as ``newest_state(checkpoint, heartbeat)``).
    """
    def key(s: Dict[str, Any]):
        last = state_history(s)[-1]
        return (int(last.get("attempt", 0)), float(last.get("last_alive") or 0.0))

    best = None
    for s in states:  # on a tie the later argument wins: pass the heartbeat last
        if s and (best is None or key(s) >= key(best)):
            best = s
    return best
