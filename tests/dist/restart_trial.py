"""Randomized kill/restart trials, as issue 18 ran them: 2 ranks, parallel.dp_shard=2 parallel.ep=2
checkpoint.async_mode=process, torchrun --max-restarts N --rdzv-backend c10d on 127.0.0.1; one
worker is SIGKILLed at a random step; the restarted round resumes and must end with the
uninterrupted run's final loss, exactly.

``one_trial``: one launch, one kill (the soak). ``chained_trials``: one launch, N kills, each in a
later round after a new commit (every restart is one trial: new round, stale store, resume), so
the default suite pays torchrun's and Python's start-up once per trial, not twice."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from tests.dist.train_launch import FAST, TORCHRUN, Launch, descendants, free_port, losses, run_ok, wait_until

MAX_STEPS = 16  # room for 5 kills, each after a new commit, before the end
ARGS = [*FAST, "trainer.eval_every=0", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2", "parallel.dp_shard=2", "parallel.ep=2", "checkpoint.async_mode=process",
        "health.preflight=off", "health.straggler_every=0", "parallel.timeout_s=60", "parallel.init_timeout_s=60"]


def elastic_cmd(*overrides: str, max_restarts: int = 3) -> list[str]:
    """The uninterrupted reference uses max_restarts=0 and the trials more; the loss does not depend on it."""
    return [TORCHRUN, "--nproc-per-node", "2", "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1", "-m", "train", *ARGS,
            *overrides]


def reference_final_loss(out: Path) -> float:
    # No saves in the reference: saving never changes the maths, and it is the slow part here.
    run_ok(elastic_cmd(f"output_dir={out}", "run_name=ref", "checkpoint.every_steps=0", "checkpoint.save_final=false",
                       "checkpoint.async_mode=off", max_restarts=0), out / "ref.log", timeout=240)
    return losses(out / "ref")[MAX_STEPS]


def workers(launch: Launch) -> list[int]:
    """The training workers (torchrun's direct children), not their DCP saver processes."""
    kids = []
    for pid in descendants(launch.proc.pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launch.proc.pid and b"train" in cmd:
            kids.append(pid)
    return kids


def one_trial(out: Path, seed: int, expected_loss: float) -> dict:
    rng = random.Random(seed)
    kill_after = rng.randint(1, MAX_STEPS - 2)
    run = out / f"t{seed}"
    # Slowed a little (fault injection, not part of the maths) so the kill lands mid-run.
    launch = Launch(elastic_cmd(f"output_dir={out}", f"run_name=t{seed}", "health.fault_inject_slow_s=0.3"),
                    out / f"t{seed}.log")
    try:
        wait_until(lambda: max(losses(run), default=0) >= kill_after, 180, f"step {kill_after}", launch)
        pids = workers(launch)
        assert len(pids) == 2, pids
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        rc = launch.wait(240)
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    log = launch.output()
    assert rc == 0, f"trial {seed}: torchrun exited {rc}\n{log[-5000:]}"
    final = losses(run).get(MAX_STEPS)
    assert final == expected_loss, f"trial {seed}: final loss {final!r} != uninterrupted {expected_loss!r}"
    return {"seed": seed, "killed_after_step": kill_after, "recovered_s": time.monotonic() - t_kill}


def chained_trials(out: Path, seed: int, kills: int, expected_loss: float, max_steps: int = MAX_STEPS) -> list[dict]:
    """One launch, ``kills`` SIGKILLs of a random worker, each after a commit newer than the last
    kill's, at a random moment (0-1 more steps). Needs every_steps=1 (``ARGS`` + override)."""
    rng = random.Random(seed)
    run = out / f"c{seed}"
    launch = Launch(elastic_cmd(f"output_dir={out}", f"run_name=c{seed}", "checkpoint.every_steps=1",
                                f"trainer.max_steps={max_steps}", "health.fault_inject_slow_s=0.2",
                                max_restarts=kills), out / f"c{seed}.log")
    from tests.dist.train_launch import committed_steps

    trials, last_commit = [], 0
    try:
        for i in range(kills):
            target = last_commit + 1
            wait_until(lambda: max(committed_steps(run), default=0) >= target, 180, f"a commit past step {last_commit}",
                       launch)
            last_commit = max(committed_steps(run))
            time.sleep(rng.uniform(0.0, 0.8))  # anywhere in the next step or two, a save maybe in flight
            pids = workers(launch)
            assert len(pids) == 2, (i, pids, launch.tail())
            os.kill(rng.choice(pids), signal.SIGKILL)
            t_kill = time.monotonic()
            # the next round is up when two new workers run
            wait_until(lambda: len(workers(launch)) == 2 and not set(workers(launch)) & set(pids), 120,
                       f"restart {i + 1}", launch)
            trials.append({"kill": i + 1, "after_commit": last_commit, "restart_s": time.monotonic() - t_kill})
        rc = launch.wait(240)
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    log = launch.output()
    assert rc == 0, f"torchrun exited {rc}\n{log[-5000:]}"
    assert log.count("resumed from step") >= 1, log[-3000:]
    final = losses(run).get(max_steps)
    assert final == expected_loss, f"final loss {final!r} != uninterrupted {expected_loss!r}"
    return trials
