"""Fail together, fast: when one rank raises, every rank leaves within seconds, each with an exit
record naming the rank that failed and its exception.

Without this a rank that raises leaves its peers blocked in the next collective until
``parallel.timeout_s`` (600 s) or the hang watchdog (1800 s) while the bill runs. The abort path:

1. The failing rank publishes ``{"rank", "error", "host"}`` under ``abort`` in this attempt's store
   (``compare_set``: the first failure wins, so a peer's follow-on "connection closed" never
   hides the root cause), writes its own exit record, and exits 1 without tearing down the
   process group (a teardown can itself block on a peer).
2. Every rank runs a watcher thread that checks the key every ``interval_s``; on seeing another
   rank's failure it writes its exit record (CRASH, naming that rank and exception) and
   ``os._exit(1)``: whatever the main thread is blocked in (a collective, a checkpoint wait)
   does not matter. torchrun and Slurm see a non-zero worker and restart or requeue.

The store is the attempt's own (parallelism/process_group.py: one prefix per restart), so a
restarted round never sees the killed round's flag.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

from health.background import BackgroundThread
from health.exit_codes import ExitCode
from health.exit_record import write_exit_record

log = logging.getLogger("moeforge.health")

ABORT_KEY = "abort"


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class FailTogether:
    def __init__(self, store, rank: int, run_dir: str, interval_s: float = 1.0):
        self.store, self.rank, self.run_dir = store, rank, run_dir
        self.interval_s = float(interval_s)
        self._thread = BackgroundThread("moeforge-fail-together", self._watch)
        self.seen: dict | None = None

    def start(self) -> "FailTogether":
        if self.store is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop(timeout=2.0)

    # -- the failing rank ------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> dict:
        """Publish this rank's failure (unless another rank's came first) and return the failure to
        report: the first one published. Never raises."""
        mine = {"rank": self.rank, "error": describe(exc), "host": socket.gethostname(), "time": time.time()}
        first = mine
        if self.store is not None:
            try:
                blob = json.dumps(mine)
                got = self.store.compare_set(ABORT_KEY, "", blob)
                first = json.loads(got.decode() if isinstance(got, bytes) else got) if got else mine
            except Exception as e:  # the store's server may be gone with a dead node: still exit
                log.warning("could not publish the failure to the other ranks (%s)", describe(e))
        return first

    def reason(self, first: dict) -> str:
        if first.get("rank") == self.rank:
            return f"rank {self.rank} raised {first['error']}"
        return (f"rank {first.get('rank')} ({first.get('host', '?')}) raised {first.get('error')}; rank {self.rank} "
                "left with it")

    # -- every rank ------------------------------------------------------------------------------
    def check(self) -> dict | None:
        """Another rank's published failure, or None."""
        try:
            if not self.store.check([ABORT_KEY]):
                return None
            got = self.store.get(ABORT_KEY)
            info = json.loads(got.decode() if isinstance(got, bytes) else got)
        except Exception:  # a store that went away: the collectives will say so
            return None
        return info if info.get("rank") != self.rank else None

    def _watch(self) -> None:
        stop = self._thread.stop_event
        while not stop.wait(self.interval_s):
            info = self.check()
            if info is not None:
                self.seen = info
                self.leave(info)
                return

    def leave(self, info: dict) -> None:
        """Exit now (code 1) with an exit record naming the failed rank."""
        reason = self.reason(info)
        log.error("%s: leaving now (exit %d) instead of waiting for the process-group timeout", reason,
                  ExitCode.CRASH)
        try:
            write_exit_record(self.run_dir, self.rank, ExitCode.CRASH, reason)
        except OSError as e:
            log.error("could not write the exit record: %s", e)
        _hard_exit(ExitCode.CRASH)


def _hard_exit(code: int) -> None:
    """Leave without the interpreter's teardown (threads blocked in collectives would hold it),
    ending child processes first (a DCP process-mode saver would outlive us, re-parented to init)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            child.kill()
        except Exception:
            pass
    for h in logging.getLogger("moeforge").handlers:
        try:
            h.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))
