"""The exit code, written where a launcher can read it: torchrun does not pass it through.

Measured (torch 2.13): when any worker exits non-zero, torchrun itself exits 1, whatever the
worker's code (PREEMPTED, UNHEALTHY, ...). So each rank writes ``<dir>/exit_code.rank<r>.json`` just before it
exits with a deliberate code, and the launcher asks
``python -m health exit-code --dir RUN_DIR --rc $?`` for the code to act on. A rank that crashed
writes nothing; with no record the launcher's own ``--rc`` stands.

Several ranks' records combine by (``ExitCode`` names): CONFIG_ERROR > UNHEALTHY > BUDGET_EXHAUSTED >
HANG > CRASH > PREEMPTED > OK (whatever is most permanent wins; PREEMPTED needs every rank's shards, so one rank's
crash or hang means the attempt did not end cleanly).
"""

from __future__ import annotations

import glob
import json
import os
import time

from checkpointing.atomic import atomic_write_text
from health.exit_codes import ExitCode

_E = ExitCode
ORDER = {_E.CONFIG_ERROR: 7, _E.UNHEALTHY: 6, _E.BUDGET_EXHAUSTED: 5, _E.HANG: 4, _E.CRASH: 3, _E.PREEMPTED: 2, _E.OK: 1}
PATTERN = "exit_code.rank*.json"


def record_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"exit_code.rank{rank}.json")


def write_exit_record(directory: str, rank: int, code: int, reason: str = "") -> str:
    """Atomically write this rank's exit code (temp file + rename); returns the path."""
    path = record_path(directory, rank)
    atomic_write_text(path, json.dumps({"code": int(code), "reason": reason, "rank": rank, "pid": os.getpid(),
                                        "time": time.time()}))
    return path


def clear_exit_records(directory: str, rank: int | None = None) -> None:
    """At start-up (each rank its own; a launcher all of them): no stale code from an earlier attempt."""
    paths = [record_path(directory, rank)] if rank is not None else glob.glob(os.path.join(directory, PATTERN))
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def read_exit_records(directory: str) -> list[dict]:
    out = []
    for p in sorted(glob.glob(os.path.join(directory, PATTERN))):
        try:
            with open(p) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue  # a torn or vanished file is no record
    return out


def resolve_exit_code(directory: str, fallback_rc: int) -> tuple[int, str]:
    """(code, reason) the launcher should act on: the records' winner, or ``fallback_rc``."""
    recs = read_exit_records(directory)
    if not recs:
        return fallback_rc, f"no exit record in {directory}: using the launcher's rc {fallback_rc}"
    best = max(recs, key=lambda r: ORDER.get(r["code"], 0))
    return int(best["code"]), f"rank {best.get('rank')}: {best.get('reason', '')}"
