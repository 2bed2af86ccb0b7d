"""One facade for the training loop: start the watchers, feed them each step, agree at the step
boundary, leave an exit record, shut down. Takes the ``health`` config section (``health.config``).

    hr = HealthRuntime(cfg.health, rank=..., local_rank=..., world_size=..., run_dir=..., group=ctl)
    hr.apply_early_env()                   # before init_process_group (flight recorder)
    ...init process group...
    report = hr.preflight(expected_gpus, instance_type)   # ExitCode.UNHEALTHY when not report.healthy
    hr.start()                             # signals, spot watcher, GPU monitor, hang watchdog
    for each step:
        verdict = hr.nan_guard.check(loss, grad_norm)       # ok | skip | rollback | stop
        hr.step_done(step, step_seconds)   # watchdog beat + straggler times
        stop = hr.at_boundary(step)        # collective on every rank: StopRequest | None
        if stop: save (if hr.state_ok(model, opt)), hr.exit(stop.code, stop.reason), return stop.code
    hr.shutdown()
"""

from __future__ import annotations

import logging
import os
import socket
import time

from health.config import HealthConfig
from health.exit_record import clear_exit_records, write_exit_record
from health.flags import StopFlags, StopRequest, agree_stop
from health.nan_guard import NonFiniteGuard, first_non_finite

log = logging.getLogger("moeforge.health")


def own_times(steps: list[list[float]], leads: list[list[float]]) -> list[list[float]]:
    """Per rank and step, the step time less the time it waited for the last rank to arrive:
    ``step - (max lead over ranks - own lead)``. Collectives make wall-clock step times equal on
    every rank; a rank slowed before its first collective (data, host, an injected delay) keeps
    its time, the others lose their wait. A rank slow only inside GPU compute is not isolated
    this way (its peers wait inside later collectives): docs/resilience.md says so."""
    if not leads or any(len(l) != len(s) for l, s in zip(leads, steps)):
        return steps
    n = min(len(s) for s in steps)
    out = []
    for s_r, l_r in zip(steps, leads):
        out.append([s_r[i] - (max(l[i] for l in leads) - l_r[i]) for i in range(n)])
    return out


class HealthRuntime:
    def __init__(self, cfg: HealthConfig | None, *, rank: int = 0, local_rank: int = 0, world_size: int = 1, run_dir: str = ".",
                 group=None, probe=None, install_signals: bool = True, host: str | None = None):
        cfg = HealthConfig() if cfg is None else cfg  # None: every default (tests, tools)
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.run_dir = run_dir
        self.group = group  # the gloo control group for the small collectives
        self.host = host or socket.gethostname()
        self.flags = StopFlags()
        self.nan_guard = NonFiniteGuard(int(cfg.nan_max_skips), str(cfg.nan_on_exhausted),
                                        int(cfg.nan_max_rollbacks))
        self._probe = probe  # None: open NVML on local rank 0 at start()
        self._install_signals = install_signals
        self.signals = self.imds = self.monitor = self.watchdog = self.straggler = None
        self._times: list[float] = []
        self._leads: list[float] = []
        self.hosts: list[str] = [self.host]
        self.last_straggler = None

    # ------------------------------------------------------------------ start-up
    @property
    def dump_dir(self) -> str:
        return os.path.join(self.run_dir, "hang")

    def apply_early_env(self) -> dict:
        """Flight-recorder settings; call before the process group exists (setdefault: a user's own
        values win)."""
        from health.watchdog import flight_recorder_env

        env = flight_recorder_env(self.dump_dir)
        for k, v in env.items():
            os.environ.setdefault(k, v)
        return env

    def preflight(self, expected_gpus: int = 0, instance_type: str = ""):
        """Run the preflight per ``health.preflight`` (off | quick | deep); None when off."""
        mode = str(self.cfg.preflight)
        if mode == "off":
            return None
        from health.preflight import run_preflight

        rep = run_preflight(deep=mode == "deep", expected_gpus=expected_gpus, instance_type=instance_type,
                            group=self.group)
        if self.rank == 0:
            log.info("preflight (%s):\n%s", mode, rep.table())
        (log.info if rep.healthy else log.error)(rep.summary())
        return rep

    def start(self) -> "HealthRuntime":
        import threading

        from health.imds import PreemptionWatcher
        from health.monitor import HealthMonitor
        from health.policy import PolicyConfig
        from health.straggler import StragglerDetector, gather_hosts
        from health.watchdog import HangWatchdog

        clear_exit_records(self.run_dir, self.rank)
        if self._install_signals and threading.current_thread() is threading.main_thread():
            from health.signals import install_signal_handlers

            self.signals = install_signal_handlers(self.flags)
        if self.local_rank == 0:  # one poller per node; agreement spreads its flags to every rank
            w = PreemptionWatcher(self.flags, str(self.cfg.imds_endpoint),
                                  interval_s=float(self.cfg.imds_interval_s),
                                  timeout_s=float(self.cfg.imds_timeout_s),
                                  act_on_rebalance=bool(self.cfg.act_on_rebalance))
            self.imds = w if w.start() else None
            interval = float(self.cfg.nvml_interval_s)
            probe = self._probe
            if probe is None and interval > 0:
                from health.nvml import open_probe

                probe = open_probe()
            if probe is not None and interval > 0:
                self.monitor = HealthMonitor(probe, self.flags, interval, PolicyConfig.from_config(self.cfg),
                                             host=self.host).start()
        hang = float(self.cfg.hang_timeout_s)
        if hang > 0:
            self.watchdog = HangWatchdog(hang, self.dump_dir, rank=self.rank, exit_record_dir=self.run_dir).start()
        if int(self.cfg.straggler_every) > 0 and self.world_size > 1:
            self.hosts = gather_hosts(self.group)  # a collective: every rank calls start()
            self.straggler = StragglerDetector(float(self.cfg.straggler_threshold),
                                               int(self.cfg.straggler_min_slow),
                                               int(self.cfg.straggler_windows), self.hosts)
        return self

    # ------------------------------------------------------------------ each step
    def step_done(self, step: int, step_seconds: float, lead_seconds: float = 0.0) -> None:
        """``lead_seconds``: time from the step's start until this rank reached its first collective
        (data, host work). Ranks that arrive early wait there for the last one, so wall-clock step
        times are equal on every rank; the lead is what tells them apart (see ``own_times``)."""
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if self.straggler is not None:
            self._times.append(step_seconds)
            self._leads.append(lead_seconds)

    def at_boundary(self, step: int) -> StopRequest | None:
        """Collective (every rank, every step): straggler window when due, then the stop agreement."""
        every = int(self.cfg.straggler_every)
        if self.straggler is not None and every > 0 and step % every == 0:
            from health.straggler import gather_step_times

            steps = gather_step_times(self._times[-every:], self.group)
            leads = gather_step_times(self._leads[-every:], self.group)
            s = self.straggler.update(own_times(steps, leads))
            self._times, self._leads = [], []
            self.last_straggler = s
            if s is not None and self.rank == 0:
                log.warning("%s", s.message())
        return agree_stop(self.flags, self.group)

    def grace(self, seconds: float):
        """Context manager: a known-long phase (first compiled step, synchronous save)."""
        import contextlib

        return self.watchdog.grace(seconds) if self.watchdog is not None else contextlib.nullcontext()

    def state_ok(self, model, optimizer=None) -> bool:
        """Finite on every rank (this rank's shards checked, then one all-reduce MAX of 'bad')."""
        bad = first_non_finite(model, optimizer)
        if bad:
            log.error("non-finite state on rank %d: %s; not checkpointing it", self.rank, bad)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import torch

            t = torch.tensor([1 if bad else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            return not bool(t.item())
        return bad is None

    # ------------------------------------------------------------------ shutdown
    def exit(self, code: int, reason: str = "") -> int:
        """Leave this rank's exit record (torchrun loses the code) and return ``code``."""
        try:
            write_exit_record(self.run_dir, self.rank, code, reason)
        except OSError as e:
            log.error("could not write the exit record to %s: %s", self.run_dir, e)
        return code

    def shutdown(self) -> None:
        for w in (self.watchdog, self.monitor, self.imds):
            if w is not None:
                w.stop()
        if self.monitor is not None:
            self.monitor.probe.close()
        if self.signals is not None:
            self.signals.uninstall()
            self.signals = None

    def metrics(self) -> dict:
        """For the metric JSONL: the NVML poll's cost, as seconds per pass and as a share of the
        wall time (it runs in its own low-priority thread; this is the whole of its overhead)."""
        m = self.monitor
        if m is None or m.last_poll_s is None:
            return {}
        return {"health/nvml_poll_s": m.last_poll_s, "health/nvml_overhead": m.last_poll_s / m.interval_s}

    def seconds_to_deadline(self) -> float | None:
        """Seconds left before the announced spot termination (None without a notice)."""
        if self.imds is None or self.imds.deadline is None:
            return None
        return self.imds.deadline - time.time()
