"""The logger decision end to end: under torchrun with 2 ranks, TensorBoard cannot open on rank 0 (its
directory is a file: a real failure), and both ranks leave at once with the same reason."""

from __future__ import annotations

import json
import time

from tests.dist.train_launch import FAST, run, torchrun_cmd


def test_tensorboard_failing_on_rank0_stops_both_ranks_alike(tmp_path):
    run_dir = tmp_path / "lg"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("not a directory")
    t0 = time.monotonic()
    rc, out = run(torchrun_cmd(2, *FAST, "trainer.max_steps=3", "logging.tensorboard=true", f"output_dir={tmp_path}",
                               "run_name=lg", "health.preflight=off"), tmp_path / "out.log", timeout=180)
    assert rc != 0, out[-3000:]
    reasons = [json.loads((run_dir / f"exit_code.rank{r}.json").read_text())["reason"] for r in (0, 1)]
    for reason in reasons:
        assert "the metrics logger" in reason and "failed on rank 0" in reason, reasons
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
    assert time.monotonic() - t0 < 150
