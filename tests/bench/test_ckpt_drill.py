"""bench ckpt_drill on CPU: the user command, periodic saves, a spot notice mid-run; the figures
it reads back (ckpt/stall_s per save step, notice -> commit with its phases, exit 75)."""

import json
import subprocess
import sys

from tests.train.runner import REPO, env


def test_ckpt_drill_reads_stall_and_notice_to_commit(tmp_path):
    overrides = [f"output_dir={tmp_path}", "run_name=drill", "trainer.max_steps=400", "trainer.seq_len=64",
                 "trainer.global_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0",
                 "checkpoint.every_steps=3", "checkpoint.async_mode=process", "checkpoint.staging=device",
                 "health.imds_interval_s=0.2", "health.fault_inject_slow_s=0.05"]
    p = subprocess.run([sys.executable, "-m", "bench", "ckpt_drill", "--notice-at", "7", "--out", str(tmp_path / "o"),
                        "--", *overrides], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "o" / "ckpt_drill.json").read_text())
    assert r["exit_code"] == 75 and r["armed_at_step"] == 7, r
    assert r["emergency_ok"] and r["notice_to_commit_s"] < 60, r
    assert "snapshot" in r["emergency_phases"] and "write" in r["emergency_phases"]
    assert r["save_steps_stall_s"], r  # the save steps' rows carry ckpt/stall_s
    assert r["median_step_s"] > 0 and r["estimates"]
