"""A writer SIGKILLed mid-save leaves no marker; resume takes the previous commit; verify says so."""

import os
import signal
import subprocess
import sys
import time

from checkpointing import CheckpointManager, layout
from checkpointing.cli import main as cli_main
from tests.checkpointing.helpers import Cfg, make, state_of
from tests.checkpointing.test_cli import REPO


def _verify(path, capsys):
    """``python -m checkpointing verify PATH`` in-process (test_cli.py runs the real command)."""
    rc = cli_main(["verify", path])
    return rc, capsys.readouterr().out


def test_sigkill_during_dcp_write(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    child = subprocess.Popen([sys.executable, "-m", "tests.checkpointing._killed_writer_child", str(tmp_path)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("WRITING"):
                break
        assert lines[-1:] == ["WRITING"], (lines, child.stderr.read() if child.poll() is not None else "")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    mgr = CheckpointManager(Cfg(), str(tmp_path), "run")
    step2 = mgr.step_path(2)
    assert any(f.endswith(".distcp") for f in os.listdir(step2))  # a shard made it to disk ...
    assert not os.path.exists(os.path.join(step2, layout.COMMIT_MARKER))  # ... but no marker
    assert mgr.committed_steps() == [1]
    model, opt = make(seed=3)
    assert mgr.load_latest(state_of(model, opt))["step"] == 1
    rc, out = _verify(mgr.run_dir, capsys)
    assert rc == 0, out  # the run still has a good commit to resume from
    assert f"PARTIAL {step2}" in out
    assert "committed: 1" in out and "partial: 2" in out
    rc, out = _verify(step2, capsys)  # naming the partial step is a failure
    assert rc == 1 and "PARTIAL" in out
    # the next save at step 2 clears the leftovers and commits
    model, opt = make(seed=4)
    assert mgr.save(2, state_of(model, opt)).committed
    assert mgr.committed_steps() == [1, 2]
