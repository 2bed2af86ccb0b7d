"""cost/projection.py: projections and the spot/on-demand what-if, by hand."""

import pytest

from cost.projection import (
    budget_warning, project, remaining_steps, restart_stats, wall_with_interruptions, what_if,
)


def test_project_to_max_steps():
    p = project(step=100, max_steps=1100, step_time_s=2.0, tokens_per_step=1e6, usd_per_hour=72.0,
                spent_usd=10.0, paid_s=500.0, ettr=0.8)
    # 1000 steps x 2 s = 2000 s productive, / 0.8 = 2500 s wall, x $0.02/s = $50
    assert p.remaining_steps == 1000 and p.remaining_tokens == 1e9
    assert p.remaining_train_s == 2000.0 and p.remaining_wall_s == pytest.approx(2500.0)
    assert p.remaining_usd == pytest.approx(50.0) and p.total_usd == pytest.approx(60.0)
    assert p.total_paid_s == pytest.approx(3000.0)
    assert project(step=0, max_steps=10, step_time_s=1.0, tokens_per_step=1, usd_per_hour=3600.0,
                   spent_usd=0.0, paid_s=0.0, ettr=None).remaining_usd == pytest.approx(10.0)


def test_token_target():
    assert remaining_steps(5, 10, 1e6, tokens_done=1e8, target_tokens=1.5e8) == 50
    assert remaining_steps(5, 10, 1e6, tokens_done=1e8, target_tokens=1.0000001e8) == 1
    assert remaining_steps(5, 10, 1e6, tokens_done=2e8, target_tokens=1e8) == 0
    assert remaining_steps(15, 10, 1e6) == 0


def test_what_if_spot_vs_on_demand():
    w = what_if(3600.0, base_ettr=0.9, on_demand_usd_per_hour=72.0, spot_usd_per_hour=36.0,
                interruptions_per_hour=0.5, restart_cost_s=720.0)
    # on-demand: 3600/0.9 = 4000 s at $0.02/s; spot: 4000 / (1 - 0.5 x 720/3600) = 4444.4 s at $0.01/s
    assert w["on_demand"]["wall_s"] == pytest.approx(4000.0) and w["on_demand"]["usd"] == pytest.approx(80.0)
    assert w["spot"]["wall_s"] == pytest.approx(4444.444, rel=1e-5)
    assert w["spot"]["usd"] == pytest.approx(44.444, rel=1e-4)
    assert wall_with_interruptions(3600.0, 1.0, 5.0, 720.0) is None  # restarts eat every hour


def test_restart_stats():
    history = [{"paid_s": 3600.0, "exit_code": None}, {"paid_s": 3600.0, "exit_code": 75},
               {"paid_s": 0.0, "exit_code": None}]
    g = {"productive": 5000.0, "startup": 300.0, "downtime": 600.0, "lost_work": 200.0}
    r = restart_stats(history, g, paid_s=7800.0)
    assert r["interruptions"] == 2 and r["interruptions_per_hour"] == pytest.approx(1.0)
    assert r["restart_cost_s"] == pytest.approx(800 / 2 + 300 / 3)
    assert r["base_ettr"] == pytest.approx(5000 / 6800)
    none = restart_stats([{"paid_s": 100.0, "exit_code": None}], {"productive": 50.0}, 100.0)
    assert none["interruptions"] == 0 and none["restart_cost_s"] == 0.0 and none["base_ettr"] == 0.5


def test_budget_warning():
    p = project(step=100, max_steps=1100, step_time_s=2.0, tokens_per_step=1e6, usd_per_hour=72.0,
                spent_usd=10.0, paid_s=500.0, ettr=0.8)
    msg = budget_warning(p, 40.0, 10.0, 100, 2.0, 72.0, ettr=0.8)
    # $0.05 per step (2 s / 0.8 x $0.02/s): $30 left buys ~600 steps
    assert "$60.00" in msg and "cost.budget_usd=$40.00" in msg
    assert "near step 699" in msg or "near step 700" in msg
    assert budget_warning(p, 100.0, 10.0, 100, 2.0, 72.0) is None
    assert budget_warning(p, 0.0, 10.0, 100, 2.0, 72.0) is None
