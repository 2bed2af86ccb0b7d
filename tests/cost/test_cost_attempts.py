"""Attempt history, gap billing, the heartbeat file and the budget (cost/meter.py, cost/heartbeat.py,
cost/budget.py), by hand."""

import json
import logging

import pytest

from cost.budget import Budget, budget_refusal_message, should_stop, spend_at_next_save
from cost.config import ClusterConfig, CostConfig
from cost.heartbeat import Heartbeat, read_heartbeat
from cost.meter import (
    CostMeter, billed_gap_s, interruptions, interruptions_per_hour, newest_state, process_start_time,
)


def _killed_first_attempt():
    """$36/h = $0.01/s from t=0; checkpoint state at t=60, last heartbeat at t=100, then killed."""
    m = CostMeter(36.0, start_time=0.0)
    m.note_progress(30, step_time_s=1.0, commit_step=30)
    ckpt = json.loads(json.dumps(m.state_dict(now=60.0)))
    m.note_progress(70, step_time_s=1.0)
    hb = json.loads(json.dumps(m.state_dict(now=100.0)))
    return ckpt, hb


def test_billed_gap_rules():
    assert billed_gap_s(100.0, 400.0) == 300.0  # default -1: the whole gap
    assert billed_gap_s(100.0, 400.0, max_gap_billed_s=120) == 120.0
    assert billed_gap_s(100.0, 400.0, max_gap_billed_s=0) == 0.0
    assert billed_gap_s(100.0, 400.0, prev_exit_code=0) == 0.0  # deliberate exits: not billed
    assert billed_gap_s(100.0, 400.0, prev_exit_code=77) == 0.0
    assert billed_gap_s(100.0, 400.0, prev_exit_code=75) == 300.0  # preempted: requeue gap billed
    assert billed_gap_s(500.0, 400.0) == 0.0  # clock went backwards
    assert billed_gap_s(None, 400.0) == 0.0


def test_killed_attempt_billed_to_last_heartbeat_and_gap_at_its_rate():
    _, hb = _killed_first_attempt()
    second = CostMeter(72.0, start_time=400.0)  # $0.02/s
    second.load_state_dict(hb)
    assert second.attempt == 2
    # 100 s of attempt 1 ($1) + 300 s gap at attempt 1's rate ($3) + 50 s of attempt 2 ($1)
    assert second.elapsed_paid_s(now=450.0) == pytest.approx(450.0)
    assert second.spent_usd(now=450.0) == pytest.approx(5.0)
    capped = CostMeter(72.0, start_time=400.0, max_gap_billed_s=120)
    capped.load_state_dict(hb)
    assert capped.elapsed_paid_s(now=450.0) == pytest.approx(270.0)
    assert capped.spent_usd(now=450.0) == pytest.approx(1.0 + 1.2 + 1.0)


def test_checkpoint_only_fallback_is_exact_when_the_whole_gap_is_billed():
    ckpt, hb = _killed_first_attempt()
    assert newest_state(ckpt, hb) is hb and newest_state(ckpt, None) is ckpt
    m = CostMeter(72.0, start_time=400.0)
    m.load_state_dict(ckpt)  # heartbeat lost: the gap then runs from the checkpoint (t=60)
    assert m.current["gap_s"] == pytest.approx(340.0)
    assert m.spent_usd(now=450.0) == pytest.approx(0.6 + 3.4 + 1.0)


def test_clean_exit_then_rerun_bills_no_gap_and_history_spans_attempts():
    m = CostMeter(36.0, start_time=0.0)
    m.end_attempt(0, "done", now=100.0)
    state = m.state_dict(now=100.0)
    assert state["history"][-1]["exit_code"] == 0
    m2 = CostMeter(36.0, start_time=10_000.0)
    m2.load_state_dict(state)
    assert m2.spent_usd(now=10_100.0) == pytest.approx(2.0)
    m3 = CostMeter(36.0, start_time=20_000.0)
    m3.load_state_dict(m2.state_dict(now=10_100.0))  # attempt 2 killed: gap 9900 s billed
    recs = m3.all_records(now=20_000.0)
    assert [r["attempt"] for r in recs] == [1, 2, 3]
    assert m3.spent_usd(now=20_000.0) == pytest.approx(2.0 + 99.0)


def test_three_attempts_second_killed_before_any_checkpoint():
    ckpt, hb1 = _killed_first_attempt()
    second = CostMeter(36.0, start_time=200.0)
    second.load_state_dict(hb1)  # resumed from the step-30 checkpoint, gap 100 s
    second.set_resumed_step(30)
    hb2 = second.state_dict(now=260.0)  # heartbeat, then killed before its first save
    third = CostMeter(36.0, start_time=300.0)
    third.load_state_dict(newest_state(ckpt, hb2))
    assert third.attempt == 3
    # 100 + 100 gap + 60 + 40 gap = 300 s at $0.01/s
    assert third.spent_usd(now=300.0) == pytest.approx(3.0)
    assert interruptions(third.all_records(now=300.0)) == 2
    assert interruptions_per_hour(third.all_records(now=300.0)) == pytest.approx(2 / (160 / 3600))


def test_version_1_state_still_loads():
    m = CostMeter(36.0, start_time=1000.0)
    m.load_state_dict({"version": 1, "paid_s": 100.0, "spent_usd": 1.0, "attempts": 1})
    assert m.attempt == 2 and m.spent_usd(now=1000.0) == pytest.approx(1.0)


def test_from_config_carries_gap_cap():
    m = CostMeter.from_config(ClusterConfig(nodes=2, price_on_demand_per_hour=18.0),
                              CostConfig(max_gap_billed_s=5.0), start_time=0.0)
    assert m.max_gap_billed_s == 5.0 and m.current["nodes"] == 2


def test_heartbeat_throttle_atomic_write_and_read(tmp_path, caplog):
    m = CostMeter(36.0, start_time=0.0)
    hb = Heartbeat(str(tmp_path), every_s=30.0)
    assert hb.maybe_write(m, now=0.0, step=1)
    assert not hb.maybe_write(m, now=10.0)
    assert hb.maybe_write(m, now=31.0, step=5)
    assert hb.maybe_write(m, now=32.0, force=True, step=6)
    got = read_heartbeat(str(tmp_path))
    assert got["step"] == 6 and got["cost"]["history"][0]["last_alive"] == 32.0
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat.json"]  # no temp file left
    (tmp_path / "heartbeat.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        assert read_heartbeat(str(tmp_path)) is None
    assert "heartbeat.json" in caplog.text
    assert read_heartbeat(str(tmp_path / "nowhere")) is None


def test_should_stop_and_spend_at_next_save():
    assert not should_stop(9.0, 9.5, 10.0)
    assert should_stop(9.0, 10.5, 10.0)
    assert should_stop(10.0, None, 10.0)
    assert not should_stop(1e9, 1e9, 0.0)  # no budget
    # 10 steps x 2 s + 10 s save = 30 s at $0.01/s
    assert spend_at_next_save(5.0, 36.0, 10, 2.0, 10.0) == pytest.approx(5.30)


def test_budget_alerts_once_each_and_stop_message():
    seen = []
    b = Budget(10.0, [5.0, 1.0], hooks=[lambda title, text: seen.append(title)])
    assert b.check(0.5, 0.6, step=1) is None and seen == []
    assert b.check(2.0, 2.5, step=2) is None and seen == ["moeforge cost $1.00"]
    assert b.check(2.5, 3.0, step=3) is None and len(seen) == 1
    b2 = Budget(10.0, [1.0, 5.0])
    b2.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert b2.alerts(6.0) and b2.fired == [1.0, 5.0] and not b2.alerts(7.0)
    msg = b.check(9.0, 10.5, step=40)
    assert "budget exhausted at step 40" in msg and "77" in msg and "$10.50" in msg
    assert b.stopped_at == {"step": 40, "spent_usd": 9.0, "budget_usd": 10.0}


def test_rerun_after_budget_refuses_with_reason():
    b = Budget(10.0)
    assert b.refuse_start(9.99, step=40) is None
    msg = b.refuse_start(10.2, step=40)
    assert msg == budget_refusal_message(10.2, 10.0, 40, stopped=False)
    assert "has used up its budget (resumed at step 40)" in msg
    assert "not training" in msg and "cost.budget_usd=15" in msg and "77" in msg
    assert Budget(0.0).refuse_start(1e9, 0) is None
    # stopped a little short of the budget (the next save would pass it): still refused ...
    b.load_state_dict({"stopped_at": {"step": 50, "spent_usd": 9.3, "budget_usd": 10.0}})
    assert "at step 50" in b.refuse_start(9.3, step=50)
    # ... until the budget is raised
    raised = Budget(15.0)
    raised.load_state_dict(b.state_dict())
    assert raised.refuse_start(9.3, step=50) is None


def test_failing_alert_hook_does_not_stop_the_run(caplog):
    def boom(title, text):
        raise RuntimeError("no network")

    with caplog.at_level(logging.WARNING, logger="moeforge"):
        assert Budget(0.0, [1.0], hooks=[boom]).alerts(2.0)
    assert "hook failed" in caplog.text


def test_process_start_time_is_before_now():
    import time

    t = process_start_time()
    assert 0.0 <= time.time() - t < 24 * 3600
