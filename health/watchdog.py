"""Hang watchdog: if the training loop makes no progress for ``timeout_s``, dump every thread's
Python stack (and, on GPU, the NCCL flight recorder) and exit with ``ExitCode.HANG``.

Why exit at all: a rank stuck in a collective holds every other rank; NCCL's own timeout
(``parallel.timeout_s``) may be long and its abort does not say where Python was. The dump names the
frame each rank is in; the exit lets the launcher resubmit (bounded retries, like a crash).

The flight recorder must be configured *before* the process group is created: apply
``flight_recorder_env(dump_dir)`` to ``os.environ`` before ``init_process_group``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
import traceback

from health.background import BackgroundThread
from health.exit_codes import ExitCode

log = logging.getLogger("moeforge.health")


def flight_recorder_env(dump_dir: str, buffer_size: int = 2000) -> dict[str, str]:
    """Environment for PyTorch's flight recorder; apply to os.environ before the process group is
    created (the recorder reads it once, at its first use).

    TORCH_FR_BUFFER_SIZE > 0 records the last N collectives per rank (torch >= 2.9 name; the old
    TORCH_NCCL_TRACE_BUFFER_SIZE is a deprecated alias); TORCH_NCCL_DUMP_ON_TIMEOUT=1 makes NCCL's
    own watchdog write them when a collective times out, to TORCH_FR_DUMP_TEMP_FILE + rank. The hang
    watchdog also dumps them itself (``flight_recorder_rank<r>.pkl``) when it fires.
    """
    return {
        "TORCH_FR_BUFFER_SIZE": str(buffer_size),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": os.path.join(dump_dir, "nccl_trace_rank_"),
    }


def format_all_stacks() -> str:
    """Every thread's stack, via sys._current_frames, with thread names."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, '?')} (ident {ident}) ---\n")
        parts.append("".join(traceback.format_stack(frame)))
    return "".join(parts)


def dump_flight_recorder(path: str) -> bool:
    """Write the flight-recorder trace (pickled: version, pg_config, pg_status, entries) to ``path``.

    The private entry points live behind ``compat.torch_compat.dump_flight_recorder_trace``. False
    where this build has none, no process group is up, or torch was never imported (no PG then
    either: the lazy imports keep torch out of processes that never loaded it)."""
    if "torch.distributed" not in sys.modules:
        return False
    try:
        import torch.distributed as dist

        from compat.torch_compat import dump_flight_recorder_trace
    except ImportError:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        data = dump_flight_recorder_trace()
    except Exception as e:  # never let the dump stop the exit
        log.warning("flight recorder dump failed: %s", e)
        return False
    if data is None:
        return False
    with open(path, "wb") as f:
        f.write(data)
    return True


class HangWatchdog:
    def __init__(self, timeout_s: float, dump_dir: str, rank: int = 0, exit_code: int = ExitCode.HANG,
                 poll_s: float | None = None, on_hang=None, exit_record_dir: str | None = None):
        self.timeout_s = float(timeout_s)
        self.dump_dir = dump_dir
        self.rank = rank
        self.exit_code = exit_code
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, self.timeout_s / 10))
        self.on_hang = on_hang  # test hook: called with the dump path instead of os._exit
        self.exit_record_dir = exit_record_dir  # where to leave exit_code.rank<r>.json (the run dir)
        self.step = -1
        self._last = time.monotonic()
        self._extra = 0.0  # grace seconds granted by grace()
        self._thread = BackgroundThread("moeforge-hang-watchdog", self._run)
        self._stop = self._thread.stop_event
        self.fired = False

    def start(self) -> "HangWatchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._thread.stop(timeout)

    def beat(self, step: int) -> None:
        """Progress: call once per optimizer step (two attribute stores; no lock)."""
        self.step = step
        self._last = time.monotonic()

    @contextlib.contextmanager
    def grace(self, seconds: float):
        """Allow a known-long phase (first step with compile, a synchronous save, evaluation)
        ``seconds`` beyond the timeout; progress is counted again from its end."""
        self._extra = float(seconds)
        try:
            yield
        finally:
            self._extra = 0.0
            self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s + self._extra:
                self._fire(idle)
                return

    def dump(self, idle_s: float = 0.0) -> str:
        os.makedirs(self.dump_dir, exist_ok=True)
        path = os.path.join(self.dump_dir, f"hang_rank{self.rank}.txt")
        with open(path, "w") as f:
            f.write(f"moeforge hang watchdog: rank {self.rank} pid {os.getpid()} made no progress for "
                    f"{idle_s:.1f}s (timeout {self.timeout_s:.1f}s); last completed step {self.step}\n")
            f.write("=== faulthandler (all threads) ===\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.write("\n=== sys._current_frames ===\n")
            f.write(format_all_stacks())
        fr = os.path.join(self.dump_dir, f"flight_recorder_rank{self.rank}.pkl")
        if dump_flight_recorder(fr):
            log.error("hang: flight recorder (last collectives) written to %s", fr)
        return path

    def _fire(self, idle_s: float) -> None:
        self.fired = True
        path = None
        try:
            path = self.dump(idle_s)
            msg = (f"hang: rank {self.rank} made no progress for {idle_s:.0f}s after step {self.step} "
                   f"(health.hang_timeout_s={self.timeout_s:g}); stacks in {path}; exiting {self.exit_code}")
            if log.hasHandlers():
                log.critical(msg)
            else:  # logging not configured (a bare script): stderr, not swallowed
                print(msg, file=sys.stderr, flush=True)
        finally:
            if self.exit_record_dir:
                try:
                    from health.exit_record import write_exit_record

                    write_exit_record(self.exit_record_dir, self.rank, self.exit_code,
                                      f"hang: no progress for {idle_s:.0f}s after step {self.step}")
                except OSError as e:
                    log.error("hang: could not write the exit record: %s", e)
            if self.on_hang is not None:
                self.on_hang(path)
            else:
                # os._exit: the main thread is stuck (often inside a C call); atexit and finally
                # blocks would never run anyway, and a clean sys.exit cannot interrupt it.
                os._exit(self.exit_code)
