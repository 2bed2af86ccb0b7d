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


def test_ckpt_bench_reports_the_in_loop_stall(tmp_path):
    out = _run(["ckpt", "--model", "tiny", "--modes", "thread:device,off", "--saves", "2", "--every", "3",
                "--batch", "2", "--seq", "32", "--warmup", "1"], tmp_path)
    rows = json.loads((tmp_path / "ckpt_tiny.json").read_text())["results"]
    assert [r["mode"] for r in rows] == ["thread:device", "off"]
    for r in rows:
        assert r["ok"] == 1 and r["final_committed"] and 3 in r["saves"]
        assert sorted(r["saves"] + r["skipped_busy"]) == [3, 6]  # a save due while one writes is skipped
        assert len(r["step_s"]) == 2 * 3 + 3 + 1 and len(r["extra_s_per_save"]) == len(r["saves"])
        assert r["component"]["last_bytes"] > 0 and len(r["component"]["per_save"]) == len(r["saves"])
    assert "in-loop stall s" in out and "component: save() return s" in out


def test_stall_figures_from_step_times():
    from bench.ckpt_bench import stall_figures

    steps = [1.0] * 20
    steps[5], steps[6] = 3.0, 1.5  # a save step, and the one after it
    steps[15] = 2.0
    f = stall_figures(steps, [5, 15], around=2)
    assert f["median_step_s"] == 1.0
    assert f["stall_s"] == 1.5  # median of the save steps (3.0, 2.0) - 1.0
    assert f["after_s"] == 0.0  # median of 1.5, 1, 1, 1
    assert f["extra_s_per_save"] == [2.5, 1.0]
