"""Three consecutive async saves in thread and process mode (one persistent stager, its host buffers reused), each
bitwise; per-save stats. Each runs in a child with a 1-rank gloo group: process mode's daemon
needs one, and it outlives the test otherwise."""

import json
import os
import subprocess
import sys

import pytest

from tests.checkpointing.test_cli import REPO


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_three_consecutive_async_saves(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "tests.checkpointing._async_child", str(tmp_path), mode],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["mode"] == mode  # no fallback when a process group exists
    assert [s["ckpt_step"] for s in result["stats"]] == [1, 2, 3]
    for s in result["stats"]:
        assert s["ckpt_ok"] == 1 and s["ckpt_bytes"] > 0
        assert 0 <= s["ckpt_blocked_s"] and 0 <= s["ckpt_staging_s"] <= s["ckpt_commit_s"]
