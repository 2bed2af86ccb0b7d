"""The loop's side of checkpointing: when to save, what a save costs the loop, the emergency save.

* A save costs the loop its snapshot only (async modes); that time, and any wait for a host copy
  inside the next step (``staging=host``), is booked to the goodput ledger's ``checkpoint`` and
  reported on the next metric row as ``ckpt/stall_s``.
* A periodic save never queues behind one still writing: ``checkpoint.if_busy`` skips or defers
  it, said once with the interval and the write time (checkpointing/schedule.py).
* An emergency save (spot notice, SIGTERM) reuses a periodic save still writing instead of
  waiting for it and then writing again, and logs its phases: snapshot, host copy, write, commit.
* At the start of the run: can an emergency save meet ``health.preemption_deadline_s``?
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from checkpointing.schedule import BusySaves, deadline_message, emergency_estimate_s
from moeforge.alerts import alert

log = logging.getLogger("moeforge")

GRACE_S = 900.0  # the hang watchdog waits this long around a save (first saves allocate buffers)


class Saver:
    """One per trainer. ``tr`` is the Trainer: its checkpoint manager, accounting, health and state."""

    def __init__(self, tr: Any):
        self.tr = tr
        self.busy = BusySaves(policy=getattr(tr.cfg.checkpoint, "if_busy", "skip"))
        self.stall_s = 0.0  # loop seconds lost to checkpointing since the last metric row
        self.state_bytes = 0
        self.gbps: Optional[float] = None  # per-rank write bandwidth measured by the last save

    # -- booking --------------------------------------------------------------------------------
    def book(self, seconds: float) -> None:
        if seconds > 0:
            self.stall_s += seconds
            self.tr.acct.ledger.add("checkpoint", seconds)

    def take_step_wait(self) -> float:
        """Seconds the step just run waited for a save's host copy: checkpoint, not productive."""
        waited = self.tr.ckpt.take_wait_s()
        self.book(waited)
        return waited

    def row_metrics(self) -> dict:
        out = {}
        if self.stall_s > 0:
            out["ckpt/stall_s"] = self.stall_s
            self.stall_s = 0.0
        if self.busy.skipped:
            out["ckpt/skipped"] = self.busy.skipped
        return out

    # -- periodic -------------------------------------------------------------------------------
    def wants(self, due: bool) -> bool:
        return due or self.busy.deferred

    def periodic(self, due: bool) -> None:
        """A save came due (or is owed): start it unless one is still writing on any rank."""
        tr = self.tr
        if not tr.ckpt.busy():
            self.busy.deferred = False
            self.save()
            return
        if not due:
            return  # deferred, and the previous save is still writing
        writing = tr.ckpt.inflight()
        warning = self.busy.on_busy(
            tr.step, tr.cfg.checkpoint.every_steps, writing.step if writing else None,
            (time.perf_counter() - writing.started_at) if writing and writing.started_at else None,
            tr.acct.step_time_s())
        if warning:
            log.warning(warning)
        else:
            log.info("checkpoint due at step %d %s: a save is still writing (checkpoint.if_busy=%s)", tr.step,
                     "deferred" if self.busy.policy == "defer" else "skipped", self.busy.policy)

    # -- a save ---------------------------------------------------------------------------------
    def save(self, emergency=None) -> bool:
        """Save this step; True when it is committed (False: skipped as non-finite, or failed with
        checkpoint.on_save_error=continue)."""
        from train.run_dir import config_hash
        from train.version import versions

        tr = self.tr
        if emergency is not None and tr.ckpt.busy():
            return self._reuse_inflight(emergency)
        t0 = time.perf_counter()
        # Never checkpoint a non-finite state (checked on every rank, agreed by one all-reduce).
        if not tr.hr.state_ok(tr.model, tr.optimizer):
            log.error("step %d: state is not finite; checkpoint skipped", tr.step)
            return False
        ts = tr._trainer_state()
        meta = {"tokens": ts["tokens"], "samples_consumed": tr.samples, "config_hash": config_hash(tr.cfg),
                "cost_usd": ts["cost"].get("spent_usd", 0.0), "versions": versions()}
        with tr.hr.grace(GRACE_S):
            result = tr.ckpt.save(tr.step, tr._state(), meta, trainer_state=ts)
            if emergency is not None:
                result = tr.ckpt.wait_committed() or result  # the commit must land before we leave
        blocked = time.perf_counter() - t0
        tr.acct.on_checkpoint(blocked, tr.step)
        self.stall_s += blocked
        committed = result is not None and result.error is None
        if result is not None and result.error is not None:
            alert("save_failed", f"checkpoint at step {tr.step} failed, not committed: {result.error}", "ERROR")
        if emergency is not None:
            self._log_emergency(emergency, committed, result)
        else:
            self._measure_bandwidth()
        return committed

    def _reuse_inflight(self, emergency) -> bool:
        """A periodic save was still writing at the notice: it becomes the emergency checkpoint
        (nothing is written twice, and it commits sooner than a fresh save could); the steps
        after it are redone after the restart."""
        tr = self.tr
        writing = tr.ckpt.inflight()
        t0 = time.perf_counter()
        with tr.hr.grace(GRACE_S):
            result = tr.ckpt.wait_committed()
        waited = time.perf_counter() - t0
        step = result.step if result is not None else (writing.step if writing else tr.step)
        tr.acct.on_checkpoint(waited, step)
        self.stall_s += waited
        log.info("emergency checkpoint: reusing the save of step %d, still writing at the notice, instead of "
                 "writing step %d as well; the %d step(s) after it are redone after the restart", step, tr.step,
                 tr.step - step)
        committed = result is None or result.error is None  # None: this rank's part had already finished
        self._log_emergency(emergency, committed, result)
        return committed

    def _log_emergency(self, emergency, committed: bool, result) -> None:
        took = time.time() - emergency.t_notice
        deadline = self.tr.cfg.health.preemption_deadline_s
        phases = result.phases() if result is not None and hasattr(result, "phases") else "phases n/a"
        (log.info if took <= deadline and committed else log.error)(
            "emergency checkpoint at step %d %s %.1f s after the notice (%s); %s; "
            "health.preemption_deadline_s=%.0f", result.step if result is not None else self.tr.step,
            "committed" if committed else "FAILED", took, emergency.reason, phases, deadline)

    # -- the deadline ---------------------------------------------------------------------------
    def estimate_at_start(self) -> None:
        """After the first step (the optimizer state exists): the state's size, whether an
        emergency save fits the deadline at the configured bandwidth; and the manager allocates
        its reusable host buffers now, off the loop."""
        tr = self.tr
        self.state_bytes = tr.ckpt.prepare(tr._state())
        if self.state_bytes > 0:
            self._say(tr.cfg.checkpoint.write_bandwidth_gbps, "checkpoint.write_bandwidth_gbps")

    def _fits(self, gbps: float) -> bool:
        h = self.tr.cfg.health
        return self._estimate(gbps) <= h.preemption_deadline_s

    def _estimate(self, gbps: float) -> float:
        h = self.tr.cfg.health
        return emergency_estimate_s(self.state_bytes, gbps, poll_s=h.imds_interval_s,
                                    step_s=self.tr.acct.step_time_s() or 0.0)

    def _say(self, gbps: float, source: str) -> None:
        deadline = self.tr.cfg.health.preemption_deadline_s
        est = self._estimate(gbps)
        (log.info if est <= deadline else log.warning)(
            deadline_message(self.state_bytes, gbps, source, est, deadline))

    def _measure_bandwidth(self) -> None:
        """The last committed save's write bandwidth replaces the configured guess: said the first
        time, then only when it changes the verdict."""
        st = self.tr.ckpt.last_save_stats()
        if not self.state_bytes or st.get("ckpt_bytes", -1) <= 0 or st.get("ckpt_write_s", 0) <= 0:
            return
        gbps = st["ckpt_bytes"] / self.tr.ctx.world_size / st["ckpt_write_s"] / 1e9
        first = self.gbps is None
        changed = self._fits(self.gbps or self.tr.cfg.checkpoint.write_bandwidth_gbps) != self._fits(gbps)
        self.gbps = gbps
        if first or changed:
            self._say(gbps, f"measured by the save of step {st['ckpt_step']}")
