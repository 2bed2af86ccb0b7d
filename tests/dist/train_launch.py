"""Launch the real `python -m train` (plain or under torchrun) in a subprocess and watch it.

Shared by tests/dist/test_train_torchrun.py and tests/health/test_train_resilience.py. Every wait is
bounded; torchrun always binds to 127.0.0.1 on a free port; each launch runs in its own session so
a test can signal (or SIGKILL) the whole process group of one launch and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.netutil import free_port  # re-exported for the dist tests
from tests.train.runner import FAST, REPO, env, last_per_step, read_jsonl

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# Short process-group timeout: a broken collective fails a test in a minute, not ten.
DIST = ["parallel.timeout_s=60"]


def torchrun_cmd(nproc: int, *overrides: str, signals: str | None = None) -> list[str]:
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--local-addr", "127.0.0.1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port())]
    if signals:
        cmd += ["--signals-to-handle", signals]
    return [*cmd, "-m", "train", *DIST, *overrides]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "train", *overrides]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children before grandchildren."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


class Launch:
    """One launch; output goes to a log file (no pipe to fill up and block the child)."""

    def __init__(self, cmd: list[str], log_path: Path, **extra_env):
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        e = env(**extra_env)
        e.pop("RUN_DIR", None)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.t0 = time.monotonic()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int, tree: bool = False) -> None:
        """Signal the launched process, or (``tree``) it and every descendant: torchrun starts its
        workers in sessions of their own, so a process-group kill would leave them running."""
        if self.proc.poll() is not None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)] if tree else [self.proc.pid]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.cmd)}\nstill running after {timeout} s\n{self.tail()}")
        self._log.close()
        return rc

    def kill(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def tail(self, n: int = 6000) -> str:
        return self.output()[-n:]


def wait_until(pred, timeout: float, what: str, launch: Launch | None = None, poll: float = 0.05):
    """Poll ``pred`` until truthy (returns its value); fail after ``timeout`` s or if the launch ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if launch is not None and launch.proc.poll() is not None:
            v = pred()
            if v:
                return v
            raise AssertionError(f"launch exited {launch.proc.returncode} before {what}\n{launch.tail()}")
        time.sleep(poll)
    if launch is not None:
        launch.kill()
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"\n{launch.tail()}" if launch else ""))


def run(cmd: list[str], log_path: Path, timeout: float = 120, **extra_env) -> tuple[int, str]:
    launch = Launch(cmd, log_path, **extra_env)
    rc = launch.wait(timeout)
    return rc, launch.output()


def run_ok(cmd: list[str], log_path: Path, timeout: float = 120, **extra_env) -> str:
    rc, out = run(cmd, log_path, timeout, **extra_env)
    assert rc == 0, f"{' '.join(cmd)}\nexited {rc}\n{out[-6000:]}"
    return out


def exit_code(run_dir: Path, rc: int) -> tuple[int, str]:
    """What a launcher acts on: `python -m health exit-code --dir RUN_DIR --rc RC` (stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "health", "exit-code", "--dir", str(run_dir), "--rc", str(rc)],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip()), p.stderr


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(run_dir).glob("step_*") if (p / "COMMITTED").exists())


def metric_rows(run_dir: Path) -> dict[int, dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return last_per_step(read_jsonl(path)) if path.exists() else {}


def first_metric_logged(run_dir: Path) -> bool:
    path = Path(run_dir) / "metrics.jsonl"
    return path.exists() and path.stat().st_size > 0


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in metric_rows(run_dir).items()}


def trainer_state(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / "trainer_state.json").read_text())


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:09d}"


def checkpoint_tensors(step_path: Path) -> dict:
    """name -> tensor of one committed DCP checkpoint, read back without a process group."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.format_utils import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(step_path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", sd)
    return flat


__all__ = ["FAST", "REPO", "Launch", "checkpoint_tensors", "committed_steps", "exit_code", "first_metric_logged",
           "free_port", "losses", "metric_rows", "run", "run_ok", "step_dir", "torchrun_cmd", "train_cmd",
           "trainer_state", "wait_until"]
