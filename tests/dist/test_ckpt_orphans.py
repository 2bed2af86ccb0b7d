"""No orphans: ``python -m train`` on 2 ranks under torchrun with ``checkpoint.async_mode=process``
saving every step; SIGKILL both workers while DCP's checkpoint daemons are writing. Every process
the launch had started (workers, their checkpoint daemons, multiprocessing's resource trackers)
is gone within a few seconds; before checkpointing.orphan_guard a daemon lived on, re-parented to
init. Process ids come from /proc."""

from __future__ import annotations

import os
import signal
import time

from tests.dist.train_launch import FAST, Launch, descendants, torchrun_cmd, wait_until

GONE_WITHIN_S = 8.0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: only its parent's wait is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _assert_gone(pids, since: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = {p: _cmdline(p)[:200] for p in pids if _alive(p)}
    assert not left, f"still running {GONE_WITHIN_S} s after {since}: {left}"


def test_sigkilled_workers_leave_no_checkpoint_process(tmp_path):
    """One daemon is stopped (SIGSTOP: a peer stalled on slow storage), so the other blocks inside
    a save's collective, as a daemon writing many GB would be busy: without a parent watch both
    outlive their workers (the blocked one until gloo's 30-minute timeout)."""
    cmd = torchrun_cmd(2, *FAST, "trainer.eval_every=0", "trainer.max_steps=400", "checkpoint.every_steps=1",
                       "checkpoint.keep_last=2", "checkpoint.async_mode=process", f"output_dir={tmp_path}",
                       "run_name=orph")
    launch = Launch(cmd, tmp_path / "torchrun.log")
    stopped = None
    try:
        agent = launch.proc.pid

        def daemons():
            workers = sorted(p for p in descendants(agent) if _parent(p) == agent and " -m train " in _cmdline(p))
            found = {_parent(p): p for p in descendants(agent) if _parent(p) in workers
                     and "spawn_main" in _cmdline(p) and "resource_tracker" not in _cmdline(p)}
            return (workers, [found[w] for w in workers]) if len(workers) == 2 and len(found) == 2 else None

        workers, found = wait_until(daemons, 120, "a checkpoint daemon per worker", launch)
        run_dir = tmp_path / "orph"
        wait_until(lambda: list(run_dir.glob("step_*/COMMITTED")), 60, "a process-mode commit", launch)
        stopped = found[1]
        os.kill(stopped, signal.SIGSTOP)
        time.sleep(3.0)  # the next save reaches daemon 0, which waits in a collective for daemon 1
        started = [p for p in descendants(agent) if _alive(p)]
        assert set(workers) | set(found) <= set(started)
        # The agent first: torchrun's own shutdown signals each worker's process group, daemons
        # included; a SIGKILLed agent (or srun, or an OOM kill) leaves them to themselves.
        for pid in [agent, *workers]:
            os.kill(pid, signal.SIGKILL)
        # daemon 0, blocked in the save's collective, must go while its peer is still stopped
        _assert_gone([*workers, found[0]], "SIGKILL of the workers")
        os.kill(stopped, signal.SIGCONT)  # the stalled one wakes up to a dead parent
        _assert_gone(started, "SIGCONT of the stopped daemon")  # resource trackers included
        assert launch.wait(10) == -signal.SIGKILL
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launch.kill()
