"""Spend and goodput across a run killed twice and resumed, against the wall clock this test
measures; and the report rendered from that run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.runner import FAST, REPO, env, run_train, train_cmd

PRICE = 3600.0  # $ per instance-hour = $1 per second: dollars read as seconds


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear"


def _last_logged_step(metrics: Path) -> int:
    try:
        lines = [l for l in metrics.read_text().splitlines() if l.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or a line being written


def _kill_past(args: list[str], run: Path, commit_step: int, kill_at: int) -> float:
    """Start an attempt; SIGKILL it once it has committed ``commit_step`` and logged ``kill_at``
    (the steps in between are lost and redone by the next attempt)."""
    start = time.time()
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(run / f"step_{commit_step:09d}" / "COMMITTED")
    deadline = time.time() + 120
    while time.time() < deadline and _last_logged_step(run / "metrics.jsonl") < kill_at:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _last_logged_step(run / "metrics.jsonl") < commit_step + 10, "ran into the next commit"
    return start


def test_killed_twice_spend_and_goodput_match_the_wall_clock(tmp_path):
    run = tmp_path / "c"
    args = [*FAST, "trainer.max_steps=60", "checkpoint.every_steps=10", "trainer.eval_every=0",
            f"cost.price_per_hour={PRICE}", "cost.heartbeat_every_s=0.05", f"output_dir={tmp_path}", "run_name=c"]
    t0 = _kill_past(args, run, 10, 16)
    time.sleep(2.0)  # downtime between attempts (billed: whole gaps by default)
    _kill_past(args, run, 20, 26)
    time.sleep(2.0)
    p = run_train(*args)
    t_end = time.time()
    wall = t_end - t0
    hb = json.loads((run / "heartbeat.json").read_text())
    spent = hb["cost"]["spent_usd"]
    assert hb["cost"]["attempts"] == 3
    # $1 per second: the spend is the paid time, which must be the whole wall clock (within 1%).
    assert spent == pytest.approx(wall, rel=0.01), (spent, wall, t0, t_end, hb["cost"]["history"])
    g = hb["goodput"]
    totals = g.get("seconds", g)
    assert totals.get("downtime", 0) >= 3.5  # two gaps of ~2 s (plus restart latency)
    assert totals.get("lost_work", 0) > 0  # steps past the commits were redone
    assert "redone" in p.stdout and "goodput after attempt 3" in p.stdout

    from cost.report import main as report_main

    report_main([str(run)])
    html = (run / "report" / "report.html").read_text()
    pngs = sorted((run / "report").glob("*.png"))
    assert len(pngs) >= 5
    for png in pngs:
        assert png.name in html
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Soak only: the default suite has the same drill, with a superset of these assertions, in
# tests/health/test_train_resilience.py::test_budget_runs_out_mid_run_exit_77_after_commit_and_stays_out
# (exit 77 after a commit at the stop step, nothing trained after it, a re-run that refuses).
@pytest.mark.soak
def test_budget_stop_commits_exits_77_and_refuses_to_continue(tmp_path):
    # $1 a second, start-up included (~4 s idle, over 10 s on a loaded 2-core machine): $20 leaves
    # room for a slow start-up; steps slowed to >= 0.1 s cannot finish 400 steps within it anywhere.
    args = [*FAST, "trainer.max_steps=400", "trainer.log_every=5", "checkpoint.every_steps=20",
            "health.fault_inject_slow_s=0.1", f"cost.price_per_hour={PRICE}", "cost.budget_usd=20",
            f"output_dir={tmp_path}", "run_name=b"]
    p = run_train(*args, check=False)
    assert p.returncode == 77, p.stdout[-3000:]
    assert "budget" in p.stdout.lower()
    run = tmp_path / "b"
    steps = sorted(d.name for d in run.glob("step_*") if (d / "COMMITTED").exists())
    assert steps, "no commit before the budget stop"
    last = json.loads((run / steps[-1] / "trainer_state.json").read_text())["step"]
    assert last < 400
    again = run_train(*args, check=False)
    assert again.returncode == 77
    assert "budget" in again.stdout.lower()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert max(r["step"] for r in rows) == last  # nothing trained after the stop
