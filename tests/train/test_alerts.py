"""Alerts (moeforge/alerts.py): the webhook gets Slack-compatible POSTs with retries and never
blocks; a real run sends budget-threshold and NaN-rollback alerts to a loopback webhook and, with
W&B offline, records the same alerts in the run's .wandb file."""

from __future__ import annotations

import glob
import time

import pytest

from moeforge.alerts import Alerts
from tests.netutil import free_port
from tests.train.runner import FAST, last_per_step, read_jsonl, run_train
from tests.webhook_server import RecordingServer


def test_webhook_body_is_slack_compatible_and_retries():
    with RecordingServer(fail_first=1) as srv:
        a = Alerts(run="r1", enabled=True, webhook=srv.url)
        a.alert("save_failed", "disk full", "ERROR")
        a.shutdown(timeout_s=20)
        assert srv.requests == 2  # one 500, then delivered
        (body,) = srv.bodies
        assert body["text"] == "[ERROR] moeforge r1: save_failed: disk full"
        assert (body["event"], body["level"], body["run"]) == ("save_failed", "ERROR", "r1")


def test_a_dead_or_slow_receiver_never_blocks_the_caller():
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens
    a = Alerts(run="r", enabled=True, webhook=dead)
    t0 = time.perf_counter()
    for _ in range(5):
        a.alert("budget", "x")
    assert time.perf_counter() - t0 < 0.1
    a.shutdown(timeout_s=0.5)  # bounded, whatever is left
    with RecordingServer(delay_s=2.0) as slow:
        b = Alerts(run="r", enabled=True, webhook=slow.url)
        t0 = time.perf_counter()
        b.alert("budget", "y")
        assert time.perf_counter() - t0 < 0.1
        b.shutdown(timeout_s=10)
        assert [x["event"] for x in slow.bodies] == ["budget"]


def test_other_ranks_send_nothing():
    with RecordingServer() as srv:
        a = Alerts(run="r", enabled=False, webhook=srv.url)
        a.alert("budget", "x")
        a.shutdown(timeout_s=1)
        assert srv.requests == 0


@pytest.mark.slow
def test_a_run_alerts_on_budget_levels_and_a_nan_rollback(tmp_path, monkeypatch):
    """cost.price_per_hour makes dollars move (36 $/h = 1 cent/s): a cost.alert_fractions level
    (0.1% of $10) and a cost.alert_usd level ($0.02) are crossed early; NaNs at steps 4 and 5 with
    health.nan_max_skips=1 roll back to the commit at step 4 once (the replayed step 5 is skipped).
    Webhook and W&B get the same alerts."""
    from tests.train import wandb_reader

    with RecordingServer() as srv:
        out = tmp_path / "out"
        p = run_train(*FAST, "trainer.max_steps=8", "checkpoint.every_steps=2", "cost.price_per_hour=36",
                      "cost.budget_usd=10", "cost.alert_fractions=[0.001,0.9]", "cost.alert_usd=[0.02]",
                      "health.fault_inject_nan_steps=[4,5]", "health.nan_max_skips=1", "logging.wandb=true",
                      f"logging.alert_webhook={srv.url}", f"output_dir={out}", "run_name=alerts",
                      WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "wandb"))
        bodies = list(srv.bodies)
    assert (p.stdout + p.stderr).count("step 5: non-finite 2 times in a row; rolled back to the commit at step 4") == 1
    events = [b["event"] for b in bodies]
    assert events.count("budget") == 2 and events.count("nan_rollback") == 1, bodies
    budget = [b["text"] for b in bodies if b["event"] == "budget"]
    assert any("past the $0.01 level (0.1% of cost.budget_usd=$10.00)" in t for t in budget), budget
    assert any("past the $0.02 level" in t for t in budget), budget
    assert all(b["run"] == "alerts" and b["text"].startswith(("[WARN]", "[ERROR]")) for b in bodies)
    assert max(last_per_step(read_jsonl(out / "alerts" / "metrics.jsonl"))) == 8

    (path,) = glob.glob(str(out / "alerts" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_reader.wait_until_complete(path)
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert sorted(a.title.rsplit(": ", 1)[1] for a in alerts) == sorted(events)
    texts = {a.text for a in alerts}
    assert {b["text"].split(": ", 2)[2] for b in bodies} == texts


@pytest.fixture
def full_disk(tmp_path):
    """A 24 MiB tmpfs: the tiny model's first checkpoint fits, the next ones fail with ENOSPC."""
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a real full disk) needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_run_alerts_on_a_failed_save_and_on_preemption(tmp_path, full_disk):
    """checkpoint.root on a full disk with checkpoint.on_save_error=continue: each failed save
    alerts; then SIGTERM (a preemption) alerts at the agreed stop."""
    import signal
    import subprocess

    from tests.train.runner import REPO, env, train_cmd

    with RecordingServer() as srv:
        cmd = train_cmd(*FAST, "trainer.eval_every=0", "trainer.max_steps=40", "checkpoint.every_steps=1",
                        "checkpoint.on_save_error=continue", f"checkpoint.root={full_disk}",
                        "health.fault_inject_slow_s=0.3", f"logging.alert_webhook={srv.url}",
                        f"output_dir={tmp_path / 'out'}", "run_name=disk")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 180
            while not any(b["event"] == "save_failed" for b in srv.bodies) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=120)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        bodies = list(srv.bodies)
    events = [b["event"] for b in bodies]
    assert "save_failed" in events and events.count("preemption") == 1, (events, out[-3000:])
    failed = next(b for b in bodies if b["event"] == "save_failed")
    assert failed["level"] == "ERROR" and "not committed" in failed["text"]
    assert "No space left on device" in failed["text"] or "GB free" in failed["text"], failed  # the full disk, named
    preempted = next(b for b in bodies if b["event"] == "preemption")
    assert "SIGTERM" in preempted["text"] and preempted["level"] == "WARN", preempted
