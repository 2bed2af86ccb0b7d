"""The attention and checkpoint benchmarks run end to end on CPU (tiny shapes) and write JSON."""

import json
import subprocess
import sys

from tests.train.runner import REPO


def _run(args, tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_attn_bench_small(tmp_path):
    _run(["attn", "--small", "--quick", "--reps", "1"], tmp_path)
    rows = json.loads((tmp_path / "attn.json").read_text())["results"]
    auto = [r for r in rows if r["variant"] in ("attend_auto", "full_attend_auto", "local_attend_auto")]
    assert len(auto) == 3
    for r in auto:
        assert r["max_err_vs_fp32"] < 1e-4 and r["fwd_bwd_s"] > 0
    local = next(r for r in rows if r["variant"] == "local_attend_auto")
    assert abs(local["ideal_ratio"] - (2 * 32 / 256 - 32 * 32 / 256 ** 2)) < 1e-12


def test_ckpt_bench_device_staging(tmp_path):
    _run(["ckpt", "--model", "tiny", "--modes", "thread,thread:device", "--saves", "2"], tmp_path)
    rows = json.loads((tmp_path / "ckpt_tiny.json").read_text())["results"]
    assert [r["mode"] for r in rows] == ["thread", "thread", "thread:device", "thread:device"]
    assert all(r["stats"]["ckpt_ok"] == 1 and r["bytes"] > 0 for r in rows)
