"""`python -m launch local`: torchrun here, with the Slurm script's exit-code policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.common import SLOW, SLOW_STEPS, TINY, env, metric_steps, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch", "local", "--nproc-per-node", "2", "--", f"output_dir={tmp_path}",
           "run_name=loc", *TINY, *overrides]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_local_restarts_after_75_and_completes(tmp_path):
    p = _start(tmp_path, *SLOW)
    run = tmp_path / "loc"
    wait_for(run / "metrics.jsonl", r'"step": 3\b', 120)
    # A worker-side preemption (as a spot notice would be): torchrun's agent gets SIGTERM, not the launcher.
    kids = _children(p.pid)
    assert kids, "torchrun not running"
    os.kill(kids[0], signal.SIGTERM)
    out, _ = p.communicate(timeout=200)
    assert p.returncode == 0, out[-4000:]
    assert "exit code to act on: 75" in out and "[launch] attempt 1" in out, out[-4000:]
    assert "resumed from step" in out
    assert metric_steps(run)[-1] == SLOW_STEPS


def test_signal_to_the_launcher_stops_with_75_and_a_rerun_resumes(tmp_path):
    p = _start(tmp_path, *SLOW)
    run = tmp_path / "loc"
    wait_for(run / "metrics.jsonl", r'"step": 2\b', 120)
    p.send_signal(signal.SIGUSR1)  # forwarded to torchrun, then to the workers
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 75, out[-4000:]
    assert "[launch] attempt 1" not in out
    p2 = _start(tmp_path, *SLOW)
    out2, _ = p2.communicate(timeout=200)
    assert p2.returncode == 0 and "resumed from step" in out2, out2[-4000:]
    assert metric_steps(run)[-1] == SLOW_STEPS
