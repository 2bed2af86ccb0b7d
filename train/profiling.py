"""Profile a window of optimizer steps of the user command (``trainer.profile_start``,
``trainer.profile_steps``): where the loop's device time goes, and how much of the wall time the
device was busy, as the user's own run sees it (not a bench's re-built step).

Writes, per rank, into ``<run dir>/profile/``: ``trace_rank<r>.json.gz`` (chrome://tracing or
Perfetto) and ``top_ops_rank<r>.txt`` (kernels and ops by self device time, or CPU time on a CPU),
and logs one line with the window's wall time and the device kernels' share of it (near 100%:
the GPU never waited for the host)."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import time

import torch

log = logging.getLogger("moeforge.train")

TOP_N = 40


def kernel_busy_s(events) -> float:
    """Seconds of device kernels among profiler ``events`` (kernels only: an op's device time would
    count its kernels twice)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if getattr(e, "device_type", None) == DeviceType.CUDA) / 1e6


def top_table(averages, n: int, window_s: float, steps: int, device: bool) -> str:
    """The ``n`` entries with the most self time (device time when ``device``), per step."""
    key = "self_device_time_total" if device else "self_cpu_time_total"
    rows = sorted((e for e in averages if getattr(e, key, 0) > 0), key=lambda e: -getattr(e, key))[:n]
    head = f"{'share':>7} {'ms/step':>9} {'calls/step':>10}  name ({'device' if device else 'CPU'} self time)"
    lines = [head]
    for e in rows:
        t = getattr(e, key) / 1e6
        lines.append(f"{t / window_s if window_s else 0:7.1%} {1e3 * t / steps:9.2f} {e.count / steps:10.1f}  {e.key[:120]}")
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Starts ``torch.profiler`` before step ``start`` (1-based optimizer steps; 0 = off) and
    stops after ``steps`` steps. Off, each call is one integer comparison."""

    def __init__(self, start: int, steps: int, run_dir: str, rank: int, device_type: str):
        self.start, self.steps = int(start), int(steps)
        self.dir = os.path.join(run_dir, "profile")
        self.rank = rank
        self.cuda = device_type == "cuda"
        self._prof = None
        self._t0 = 0.0
        self.summary: dict | None = None

    def before_step(self, step: int) -> None:
        """``step``: the optimizer step about to run."""
        if self.start <= 0 or step != self.start or self._prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> None:
        """``step``: the optimizer step just done (also after a skipped or final step)."""
        if self._prof is not None and step >= self.start + self.steps - 1:
            self._finish(step)

    def close(self, step: int) -> None:
        """The run ends inside the window: write what was profiled."""
        if self._prof is not None:
            self._finish(step)

    def _finish(self, step: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        window_s = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        n = max(1, step - self.start + 1)
        os.makedirs(self.dir, exist_ok=True)
        busy_s = kernel_busy_s(prof.events()) if self.cuda else 0.0
        table = top_table(prof.key_averages(), TOP_N, window_s, n, device=self.cuda)
        top_path = os.path.join(self.dir, f"top_ops_rank{self.rank}.txt")
        with open(top_path, "w") as f:
            f.write(f"steps {self.start}-{step}: {window_s:.3f} s wall, {window_s / n * 1e3:.1f} ms/step"
                    + (f", device kernels {busy_s / window_s:.1%} of the wall time (kernels on several streams overlap)\n" if self.cuda else "\n"))
            f.write(table)
        trace = os.path.join(self.dir, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
        self.summary = {"steps": n, "window_s": window_s, "device_kernel_share": busy_s / window_s if self.cuda else None,
                        "top_ops": top_path, "trace": trace + ".gz"}
        log.info("profile: steps %d-%d, %.1f ms/step%s; %s and %s", self.start, step, window_s / n * 1e3,
                 f", device kernels {busy_s / window_s:.1%} of the wall time" if self.cuda else "",
                 top_path, trace + ".gz")
