"""The goodput ledger and resume accounting (cost/goodput.py) against hand-computed runs."""

import json

import pytest

from cost.meter import CostMeter
from cost.goodput import GoodputLedger, lost_work_s, resume_accounting, summarize


def test_ledger_summary_other_and_ettr():
    g = GoodputLedger()
    g.add_step(2.0, 0.5)
    g.add("startup", 3.0)
    g.add("checkpoint", 1.0)
    g.add("eval", 0.5)
    s = g.summary(paid_s=10.0)
    assert s["seconds"]["productive"] == pytest.approx(1.5)
    assert s["seconds"]["data_wait"] == pytest.approx(0.5)
    assert s["seconds"]["other"] == pytest.approx(3.5)
    assert s["ettr"] == pytest.approx(0.15)
    assert sum(s["fraction"].values()) == pytest.approx(1.0)
    line = g.line(10.0, attempt=2)
    assert line.startswith("goodput after attempt 2: ETTR 15.0% of 0:00:10 paid")
    assert "startup 0:00:03 (30.0%)" in line
    assert g.metrics(10.0)["goodput/ettr"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="category"):
        g.add("coffee", 1.0)


def test_other_never_negative_and_empty_ledger():
    assert summarize({"productive": 5.0}, paid_s=4.0)["seconds"]["other"] == 0.0
    assert GoodputLedger().summary(0.0)["ettr"] is None


def test_state_round_trip():
    g = GoodputLedger()
    g.add("eval", 2.0)
    h = GoodputLedger()
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.seconds == g.seconds
    with pytest.raises(ValueError, match="newer"):
        h.load_state_dict({"version": 9})


def test_lost_work():
    assert lost_work_s(40, 20, 1.5) == 30.0
    assert lost_work_s(20, 30, 1.0) == 0.0
    assert lost_work_s(None, 0, 1.0) == 0.0 and lost_work_s(40, 0, None) == 0.0


def _first_attempt():
    """$36/h from t=0: 10 s startup, steps 1..20 at 1 s, 5 s save at step 20 (state at t=35),
    steps 21..40 (heartbeat at t=55), killed soon after."""
    m, g = CostMeter(36.0, start_time=0.0), GoodputLedger()
    g.add("startup", 10.0)
    for _ in range(20):
        g.add_step(1.0)
    g.add("checkpoint", 5.0)
    m.note_progress(20, 1.0, commit_step=20)
    ts = json.loads(json.dumps({"cost": m.state_dict(now=35.0), "goodput": g.state_dict()}))
    for _ in range(20):
        g.add_step(1.0)
    m.note_progress(40, 1.0)
    hb = json.loads(json.dumps({"cost": m.state_dict(now=55.0), "goodput": g.state_dict()}))
    return ts, hb


def test_resume_from_heartbeat_bills_gap_and_moves_lost_work():
    ts, hb = _first_attempt()
    m, g = CostMeter(36.0, start_time=100.0), GoodputLedger()
    info = resume_accounting(m, g, ts, hb, resumed_step=20)
    assert (info.source, info.attempt, info.lost_steps) == ("heartbeat", 2, 20)
    assert info.gap_billed_s == pytest.approx(45.0) and info.lost_s == pytest.approx(20.0)
    s = g.summary(m.elapsed_paid_s(now=100.0))
    assert s["paid_s"] == pytest.approx(100.0)
    assert s["seconds"] == pytest.approx({"productive": 20.0, "startup": 10.0, "checkpoint": 5.0,
                                          "eval": 0.0, "data_wait": 0.0, "lost_work": 20.0,
                                          "downtime": 45.0, "other": 0.0})
    assert s["ettr"] == pytest.approx(0.2)
    assert "attempt 2" in info.message() and "20 steps" in info.message()


def test_resume_from_checkpoint_only():
    ts, _ = _first_attempt()
    m, g = CostMeter(36.0, start_time=100.0), GoodputLedger()
    info = resume_accounting(m, g, ts, None, resumed_step=20)
    assert (info.source, info.lost_steps, info.gap_billed_s) == ("checkpoint", 0, pytest.approx(65.0))
    s = g.summary(m.elapsed_paid_s(now=100.0))
    assert s["paid_s"] == pytest.approx(100.0) and s["seconds"]["downtime"] == pytest.approx(65.0)
    assert s["seconds"]["productive"] == pytest.approx(20.0) and s["seconds"]["other"] == pytest.approx(0.0)


def test_fresh_start_after_attempt_killed_before_first_checkpoint():
    _, hb = _first_attempt()
    m, g = CostMeter(36.0, start_time=100.0), GoodputLedger()
    info = resume_accounting(m, g, None, hb, resumed_step=0)
    assert info.source == "heartbeat" and info.lost_steps == 40
    assert g.seconds["lost_work"] == pytest.approx(40.0) and g.seconds["productive"] == 0.0
    assert m.spent_usd(now=100.0) == pytest.approx(1.0)


def test_first_attempt_is_fresh():
    m, g = CostMeter(36.0, start_time=0.0), GoodputLedger()
    info = resume_accounting(m, g, None, None, resumed_step=0)
    assert info.source == "fresh" and m.attempt == 1 and g.seconds["downtime"] == 0.0


# -- RunAccounting: the loop's calls, on a fake clock ---------------------------------------------

from cost.config import ClusterConfig, CostConfig  # noqa: E402
from cost.heartbeat import read_heartbeat  # noqa: E402
from cost.goodput import RunAccounting, next_save_step  # noqa: E402


class Clock:
    def __init__(self, t):
        self.t = float(t)

    def __call__(self):
        return self.t


def _loop(acct, clock, start_step, max_steps, every, kill_after=None):
    """The trainer's order: step -> on_step -> budget check -> save (due or final) -> tick."""
    step, ts, stop = start_step, None, None
    while step < max_steps and stop is None:
        clock.t += 1.0
        step += 1
        acct.on_step(step, 1.0)
        stop = acct.check_budget(step, next_save_step(step, every, max_steps))
        if step % every == 0 or step == max_steps or stop:
            if stop:
                acct.mark_exit(77, "budget")
            clock.t += 2.0
            acct.on_checkpoint(2.0, step)
            ts = {"step": step, **json.loads(json.dumps(acct.state_dict()))}
        acct.tick()
        if kill_after is not None and step == kill_after:
            return ts, None, step
    return ts, stop, step


def test_run_accounting_kill_resume_budget_stop_and_refusal(tmp_path):
    cluster = ClusterConfig(price_on_demand_per_hour=36.0)  # $0.01/s
    cost = CostConfig(budget_usd=1.0, alert_usd=[0.5], heartbeat_every_s=1e-6)
    clock = Clock(0.0)
    a1 = RunAccounting(cluster, cost, str(tmp_path), 0.0, clock=clock)
    clock.t = 5.0  # build
    assert a1.resume(None, 0).source == "fresh"
    ts, stop, step = _loop(a1, clock, 0, 100, every=10, kill_after=15)  # SIGKILL at t=22
    assert (step, ts["step"], clock.t) == (15, 10, 22.0)

    clock.t = 40.0
    a2 = RunAccounting(cluster, cost, str(tmp_path), 40.0, clock=clock)
    clock.t = 45.0
    info = a2.resume(ts, ts["step"])
    assert (info.source, info.gap_billed_s, info.lost_steps) == ("heartbeat", 18.0, 5)
    assert a2.refuse_start() is None
    ts, stop, step = _loop(a2, clock, 10, 100, every=10)
    # saves at 20, 30, 40 (t=57, 69, 81); at step 50 (t=91, $0.91) the save at 60 would cost
    # 10 more steps + a 2 s save = $1.03 > $1: stop at 50, save, spend $0.93
    assert step == 50 and "budget exhausted at step 50" in stop and "77" in stop
    assert a2.meter.spent_usd(clock.t) == pytest.approx(0.93)
    assert a2.budget.fired == [0.5]
    line = a2.finish(77, "budget")
    assert line.startswith("goodput after attempt 2: ETTR")
    # productive: steps 2..15 (14 s) - 5 redone + steps 12..50 (39 s) = 48 s of 93 s paid
    s = a2.ledger.summary(a2.meter.elapsed_paid_s(clock.t))
    assert s["paid_s"] == pytest.approx(93.0) and s["ettr"] == pytest.approx(48 / 93)
    assert s["seconds"]["startup"] == pytest.approx(12.0) and s["seconds"]["downtime"] == pytest.approx(18.0)
    # saves at 10 (attempt 1), 20, 30, 40, 50: 5 x 2 s; nothing left unattributed
    assert s["seconds"]["other"] == pytest.approx(0.0)
    assert s["seconds"]["checkpoint"] == pytest.approx(10.0) and s["seconds"]["lost_work"] == pytest.approx(5.0)
    assert read_heartbeat(str(tmp_path))["cost"]["history"][-1]["exit_code"] == 77
    assert ts["cost"]["history"][-1]["exit_code"] == 77  # the final checkpoint knows it too
    assert ts["budget"]["stopped_at"]["step"] == 50

    clock.t = 500.0  # re-run the same command days later: no gap billed after exit 77, refused
    a3 = RunAccounting(cluster, cost, str(tmp_path), 500.0, clock=clock)
    a3.resume(ts, ts["step"])
    assert a3.meter.current["gap_s"] == 0.0
    assert "not training" in a3.refuse_start() and "at step 50" in a3.refuse_start()
    a3.finish(77, "budget already spent")
    raised = CostConfig(budget_usd=2.0, heartbeat_every_s=1e-6)
    a4 = RunAccounting(cluster, raised, str(tmp_path), 600.0, clock=Clock(600.0))
    a4.resume(ts, ts["step"])
    assert a4.refuse_start() is None and a4.meter.attempt == 4


def test_projection_warning_once_after_warmup(tmp_path):
    cluster = ClusterConfig(price_on_demand_per_hour=36.0)
    cost = CostConfig(budget_usd=1.0, projection_warmup_steps=3, heartbeat_every_s=1.0)
    clock = Clock(0.0)
    a = RunAccounting(cluster, cost, str(tmp_path), 0.0, clock=clock, rank=1)
    a.resume(None, 0)
    msgs = []
    for step in range(1, 8):
        clock.t += 1.0
        a.on_step(step, 1.0)
        msgs.append(a.projection_warning(step, 1000, 256))
    assert [m is not None for m in msgs] == [False, False, False, True, False, False, False]
    assert "exceeds cost.budget_usd=$1.00" in msgs[3]
    assert not (tmp_path / "heartbeat.json").exists()  # rank 1 writes no heartbeat
    m = a.metrics(7 * 256)
    assert m["attempt"] == 1 and "goodput/ettr" in m and m["spent_usd"] == pytest.approx(0.07)


def test_next_save_step():
    assert next_save_step(0, 10, 100) == 10 and next_save_step(10, 10, 100) == 20
    assert next_save_step(95, 10, 98) == 98 and next_save_step(5, 0, 50) == 50
