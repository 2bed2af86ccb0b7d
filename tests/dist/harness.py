"""Run a function on N real gloo ranks (spawned processes), with short timeouts and bounded waits.

``run_ranks(fn, world, *args)`` calls ``fn(rank, world, *args)`` in each rank after
``init_process_group("gloo")``; a failure in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

PG_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 150


def _entry(fn, rank, world, init_file, err_dir, args, env):
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=PG_TIMEOUT_S))
        try:
            fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    # Leave as the trainer does (train/cli.py _exit_now): everything is closed, skip the
    # interpreter's teardown. Left to it, about 1 spawn in 15 of the EP test aborted there, after
    # every assertion had passed ("terminate called without an active exception", exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args, env: dict | None = None, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, err_dir = os.path.join(tmp, "pg_init"), os.path.join(tmp, "errs")
        os.makedirs(err_dir)
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init_file, err_dir, args, env or {}))
                 for r in range(world)]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        errs = {}
        for name in sorted(os.listdir(err_dir)):
            with open(os.path.join(err_dir, name)) as f:
                errs[name] = f.read()
        codes = [p.exitcode for p in procs]
        if errs or hung or any(c != 0 for c in codes):
            msg = "\n".join(f"--- {k}\n{v}" for k, v in errs.items())
            raise AssertionError(f"ranks failed: exit codes {codes}, hung {hung}\n{msg}")
