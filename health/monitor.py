"""HealthMonitor: a low-priority daemon thread that reads every GPU each interval, logs findings
(GPU index, host, raw value) and requests ``ExitCode.UNHEALTHY`` for ECC / row-remap / bad-XID findings.

Thermal and power slowdowns are warnings only. Each distinct (gpu, what, value) is logged once, so a
GPU stuck at its power cap does not fill the log. ``last_poll_s`` is the measured cost of one pass.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from health.background import BackgroundThread
from health.exit_codes import ExitCode
from health.flags import StopFlags
from health.policy import EXIT_76, IGNORE, WARN, Finding, PolicyConfig, evaluate, evaluate_xid

WARN_REPEAT_S = 600.0  # a repeating warning about one GPU counter is logged at most this often

log = logging.getLogger("moeforge.health")


class HealthMonitor:
    def __init__(self, probe, flags: StopFlags, interval_s: float = 30.0, policy: PolicyConfig | None = None,
                 logger: logging.Logger | None = None, host: str | None = None, xid_wait_ms: int = 100,
                 max_polls: int | None = None, gpus: list[int] | None = None):
        self.probe = probe
        self.gpus = gpus  # indices to read; None = every GPU the probe sees
        self.flags = flags
        self.interval_s = interval_s
        self.policy = policy or PolicyConfig()
        self.log = logger or log
        self.host = host or socket.gethostname()
        self.xid_wait_ms = xid_wait_ms
        self.max_polls = max_polls
        self.last_poll_s: float | None = None  # wall time of the last read pass over all GPUs
        self.polls = 0
        self.findings: list[Finding] = []  # every finding ever logged (deduplicated), newest last
        self._seen: set[tuple] = set()
        self._warned: dict = {}  # (gpu, what) -> when last warned
        self._prev: dict[int, object] = {}
        self._requested = False
        self._thread = BackgroundThread("moeforge-nvml", self._run)
        self._stop = self._thread.stop_event

    def start(self) -> "HealthMonitor":
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._thread.stop(timeout)

    def poll_once(self) -> list[Finding]:
        """Read all GPUs and pending XIDs once; returns this pass's new findings."""
        t0 = time.perf_counter()
        indices = self.gpus if self.gpus is not None else range(self.probe.device_count())
        readings = [self.probe.read(i) for i in indices]
        self.last_poll_s = time.perf_counter() - t0
        self.polls += 1
        found: list[Finding] = []
        for r in readings:
            found += evaluate(r, self._prev.get(r.index), self.policy, self.host)
            self._prev[r.index] = r
        for gpu, xid in self.probe.xid_events(0):
            found.append(evaluate_xid(gpu, xid, self.host, self.policy))
        return self._act(found)

    def _act(self, found: list[Finding]) -> list[Finding]:
        new = []
        now = time.monotonic()
        for f in found:
            key = (f.gpu, f.what, str(f.raw_value))
            if key in self._seen and not f.what.startswith("xid_"):
                continue
            if f.action == WARN:
                # A counter delta (NVLink, PCIe replays) changes every poll: warn about each
                # (gpu, what) at most once per WARN_REPEAT_S, or a 30 s poll floods the log.
                last = self._warned.get((f.gpu, f.what))
                if last is not None and now - last < WARN_REPEAT_S:
                    continue
                self._warned[(f.gpu, f.what)] = now
            if len(self._seen) < 10_000:
                self._seen.add(key)
            new.append(f)
            self.findings.append(f)
            del self.findings[:-1000]  # bounded on long runs
            if f.action == IGNORE:
                self.log.debug("health: %s", f.message())
            elif f.action == EXIT_76:
                self.log.error("health: %s", f.message())
            else:
                self.log.warning("health: %s", f.message())
            if f.action == EXIT_76 and not self._requested:
                self._requested = True
                self.flags.request(ExitCode.UNHEALTHY, f"unhealthy GPU: {f.message()}")
        return new

    def _run(self) -> None:
        try:  # low priority: this thread's nice value only (Linux threads have their own)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # a probe failure must never kill training; say so loudly
                self.log.warning("health: GPU poll failed: %s: %s", e.__class__.__name__, e)
            if self.max_polls is not None and self.polls >= self.max_polls:
                return
            # Wait for XIDs (short, GIL released) instead of sleeping, so a fatal XID is seen early.
            deadline = time.monotonic() + self.interval_s
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    events = self.probe.xid_events(self.xid_wait_ms)
                except Exception as e:
                    self.log.warning("health: XID wait failed: %s", e)
                    events = []
                if events:
                    self._act([evaluate_xid(g, x, self.host, self.policy) for g, x in events])
                self._stop.wait(min(0.5, max(0.0, deadline - time.monotonic())))
