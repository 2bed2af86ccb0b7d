"""parallel.init_timeout_s: a rank whose peer never comes leaves set-up at the deadline with exit 1
and an exit record that says why (gloo's connect can ignore the process group's own timeout)."""

from __future__ import annotations

import json
import time

from tests.dist.train_launch import FAST, free_port, run, train_cmd


def test_set_up_past_init_timeout_exits_1_with_a_record(tmp_path):
    t0 = time.monotonic()
    rc, out = run(train_cmd(*FAST, "trainer.max_steps=2", "parallel.init_timeout_s=4", f"output_dir={tmp_path}",
                            "run_name=alone"), tmp_path / "out.log", timeout=120,
                  RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    took = time.monotonic() - t0
    assert rc == 1, out[-3000:]
    assert "did not finish within parallel.init_timeout_s=4" in out, out[-3000:]
    rec = json.loads((tmp_path / "alone" / "exit_code.rank0.json").read_text())
    assert rec["code"] == 1 and "parallel.init_timeout_s=4" in rec["reason"]
    assert took < 90, took  # imports (slow on a loaded machine) + 4 s, never the 600 s collective timeout
