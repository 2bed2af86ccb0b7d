"""Two nodes on one machine, for real (issue 18, point 6): two torchrun agents, one worker each.

1. Billing: with cluster.nodes unset the run is billed for the 2 launched nodes: spend equals
   2 x price x the attempt's paid wall-clock within 1%; nodes=2 on the metric line and in JSONL.
2. Node 1 dies (SIGKILL of its agent and worker, by PID) mid-run: node 0 leaves within 60 s with a
   non-zero code and an exit record; a re-run on one node resumes from the last commit with the exact
   data cursor, and the redone steps' losses equal the killed run's.
"""

from __future__ import annotations

import json
import signal
import time

from tests.dist.train_launch import (FAST, Launch, committed_steps, losses, metric_rows, run_ok, step_dir,
                                     torchrun_cmd, trainer_state, wait_until)
from tests.dist.two_nodes import start_two_nodes, wait_all

PRICE = 36.0  # $ per instance-hour (cost.price_per_hour): each node bills it
COMMON = [*FAST, "trainer.eval_every=0", "health.preflight=off", "health.straggler_every=0",
          "parallel.timeout_s=120", f"cost.price_per_hour={PRICE}"]
NODE_LEAVES_S = 60


def test_two_nodes_are_billed_as_two(tmp_path):
    t0 = time.time()
    nodes = start_two_nodes(tmp_path, *COMMON, "trainer.max_steps=4", f"output_dir={tmp_path}", "run_name=bill")
    try:
        assert wait_all(nodes, 240) == [0, 0], nodes[0].tail() + nodes[1].tail()
        outside_s = time.time() - t0
    finally:
        for n in nodes:
            n.kill() if n.proc.poll() is None else None
    run = tmp_path / "bill"
    hb = json.loads((run / "heartbeat.json").read_text())
    rec = hb["cost"]["current"] if "current" in hb["cost"] else hb["cost"]["history"][-1]
    paid_s = float(rec["paid_s"])
    spent = float(hb["cost"].get("spent_usd", rec["spent_usd"]))
    assert hb["cost"]["usd_per_hour"] == 2 * PRICE
    assert abs(spent - 2 * PRICE * paid_s / 3600) <= 0.01 * spent, (spent, paid_s)
    # the paid wall-clock is the worker's life: inside the launch as the test timed it, and most of it
    assert 0.5 * outside_s <= paid_s <= outside_s + 1.0, (paid_s, outside_s)
    rows = metric_rows(run)
    assert rows and all(r["nodes"] == 2 for r in rows.values())
    out0 = nodes[0].output()
    assert "nodes=2" in out0 and "cost: 2 node(s) x $36.00/h = $72.00/h" in out0, out0[-3000:]
    assert "1 distinct host" in out0  # the cross-check warns, the launcher's count stands


def test_node1_killed_node0_leaves_and_one_node_resumes(tmp_path):
    args = [*COMMON, "trainer.max_steps=40", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
            f"output_dir={tmp_path}", "run_name=kill"]
    run = tmp_path / "kill"
    nodes = start_two_nodes(tmp_path, *args, "health.fault_inject_slow_s=0.2")
    try:
        wait_until(lambda: max(committed_steps(run), default=0) >= 4, 180, "the step-4 commit", nodes[0])
        nodes[1].signal(signal.SIGKILL, tree=True)  # every process of node 1, by PID
        t_kill = time.monotonic()
        rc0 = nodes[0].wait(NODE_LEAVES_S + 30)
        took = time.monotonic() - t_kill
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    assert rc0 != 0, nodes[0].tail()
    assert took < NODE_LEAVES_S, f"node 0 took {took:.1f} s to leave\n{nodes[0].tail()}"
    rec0 = json.loads((run / "exit_code.rank0.json").read_text())
    assert rec0["code"] != 0 and rec0["reason"], rec0
    killed_losses = losses(run)
    last = max(committed_steps(run))
    assert last < 40
    # Re-run on one node (two workers): resumes from the last commit, exact cursor, loss continues.
    out = run_ok(torchrun_cmd(2, *args), tmp_path / "resume.log", timeout=240)
    assert f"resumed from step {last} ({last * 4} samples consumed" in out, out[-3000:]
    ts = trainer_state(step_dir(run, 40))
    assert ts["samples_consumed"] == 40 * 4 and ts["step"] == 40
    resumed = losses(run)
    redone = [s for s in killed_losses if s > last]
    for s in redone:  # steps the killed run logged past its commit, done again: the same loss
        assert abs(resumed[s] - killed_losses[s]) < 1e-5, (s, resumed[s], killed_losses[s])
    print(f"node 0 left {took:.1f} s after node 1 was killed; resumed from step {last}, redone {redone}")
