import os
import subprocess
import sys

from checkpointing import CheckpointManager, layout
from tests.checkpointing.helpers import Cfg, make, state_of, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "checkpointing", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _run_with_steps(tmp_path, steps=(1, 2)):
    model, opt = make()
    mgr = CheckpointManager(Cfg(), str(tmp_path), "run")
    for s in steps:
        train_steps(model, opt, 1)
        mgr.save(s, state_of(model, opt), meta={"tokens": s * 1000})
    return mgr


def test_ls_and_verify_good_run(tmp_path):
    mgr = _run_with_steps(tmp_path)
    out = _cli("ls", mgr.run_dir)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "step" in lines[0] and "tokens" in lines[0] and "age" in lines[0]
    assert any(l.split()[:3] == ["1", "committed", "1000"] for l in lines)
    assert any(l.split()[:3] == ["2", "committed", "2000"] for l in lines)
    out = _cli("verify", mgr.run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 committed, 0 failed" in out.stdout


def test_verify_reports_partial_and_fails_on_bad_shard(tmp_path):
    mgr = _run_with_steps(tmp_path, steps=(1, 2, 3))
    os.remove(os.path.join(mgr.step_path(3), layout.COMMIT_MARKER))  # a save that died
    out = _cli("verify", mgr.run_dir)
    assert out.returncode == 0, out.stdout  # a partial step alone is not a failure of the run ...
    assert f"PARTIAL {mgr.step_path(3)}" in out.stdout
    assert "UNCOMMITTED" in _cli("ls", mgr.run_dir).stdout
    out = _cli("verify", mgr.step_path(3))  # ... but naming it is
    assert out.returncode == 1
    shard = next(f for f in os.listdir(mgr.step_path(2)) if f.endswith(".distcp"))
    path = os.path.join(mgr.step_path(2), shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    out = _cli("verify", mgr.run_dir)
    assert out.returncode == 1
    assert f"FAIL {mgr.step_path(2)}" in out.stdout and shard in out.stdout
    os.remove(path)
    out = _cli("verify", mgr.step_path(2))
    assert out.returncode == 1 and "missing" in out.stdout


def test_empty_dir_is_an_error(tmp_path):
    assert _cli("verify", str(tmp_path)).returncode == 1
    assert _cli("ls", str(tmp_path / "nope")).returncode == 1
