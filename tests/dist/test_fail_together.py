"""Fail together, fast (health/fail_together.py): under torchrun with 2 ranks, rank 1 raises before
step 4 (health.fault_inject_raise_step); both workers leave within 60 s with non-zero codes, and
every rank's exit record names rank 1 and its exception. parallel.timeout_s stays at its 600 s
default: waiting it out would fail the bound."""

from __future__ import annotations

import json
import time

from tests.dist.train_launch import FAST, Launch, TORCHRUN, free_port, wait_until

FAIL_TOGETHER_BOUND_S = 60


def test_one_rank_raises_every_rank_leaves_within_60s(tmp_path):
    run = tmp_path / "ft"
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--local-addr", "127.0.0.1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "train", *FAST, "trainer.max_steps=50",
           "trainer.eval_every=0", "checkpoint.every_steps=0", f"output_dir={tmp_path}", "run_name=ft",
           "health.fault_inject_rank=1", "health.fault_inject_raise_step=4", "parallel.timeout_s=600"]
    launch = Launch(cmd, tmp_path / "out.log")
    # the clock starts when rank 1 raises (its log says so), not at launch (imports, set-up)
    wait_until(lambda: (run / "rank1.log").exists() and "fault injection" in (run / "rank1.log").read_text(),
               180, "rank 1's injected failure", launch)
    t_raise = time.monotonic()
    rc = launch.wait(FAIL_TOGETHER_BOUND_S + 30)
    took = time.monotonic() - t_raise
    assert rc != 0, launch.tail()
    assert took < FAIL_TOGETHER_BOUND_S, f"ranks left {took:.1f} s after the failure\n{launch.tail()}"
    records = {r: json.loads((run / f"exit_code.rank{r}.json").read_text()) for r in (0, 1)}
    for r, rec in records.items():
        assert rec["code"] == 1, rec
        assert "rank 1" in rec["reason"] and "RuntimeError: fault injection" in rec["reason"], rec
    print(f"fail-together: both ranks left {took:.1f} s after rank 1 raised")
