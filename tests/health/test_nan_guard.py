"""health/nan_guard.py."""

from __future__ import annotations

import math

import pytest
import torch

from health.nan_guard import NonFiniteGuard, first_non_finite, state_is_finite


def test_skips_then_rollback_then_counts_afresh():
    g = NonFiniteGuard(max_skips=2, on_exhausted="rollback")
    assert g.check(1.0, 0.5) == "ok"
    assert g.check(float("nan"), 0.5) == "skip"
    assert g.check(1.0, float("inf")) == "skip"
    assert g.check(torch.tensor(float("nan")), torch.tensor(1.0)) == "rollback"
    g.reset()
    assert g.check(torch.tensor(2.0), None) == "ok" and g.total_skipped == 2


def test_finite_step_resets_the_count_and_stop_mode():
    g = NonFiniteGuard(max_skips=1, on_exhausted="stop")
    assert [g.check(x) for x in (math.nan, 1.0, math.nan, math.inf)] == ["skip", "ok", "skip", "stop"]
    assert NonFiniteGuard(0).check(math.nan) == "rollback"
    with pytest.raises(ValueError, match="nan_on_exhausted"):
        NonFiniteGuard(on_exhausted="ignore")
    g2 = NonFiniteGuard()
    g2.load_state_dict(g.state_dict())
    assert g2.consecutive == g.consecutive


def test_state_is_finite_checks_params_and_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert state_is_finite(model, opt)
    opt.state[model[1].weight]["exp_avg_sq"][0, 0] = float("nan")
    assert not state_is_finite(model, opt)
    assert first_non_finite(model, opt) == "optimizer state exp_avg_sq of 1.weight"
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    assert first_non_finite(model, opt) == "parameter 0.bias"


def test_rollbacks_are_bounded_per_process():
    """A divergence that survives rollbacks stops instead of reloading forever; the count survives
    the guard state a rollback reloads from the checkpoint."""
    g = NonFiniteGuard(max_skips=0, on_exhausted="rollback", max_rollbacks=2)
    saved = g.state_dict()
    verdicts = []
    for _ in range(3):
        verdicts.append(g.check(math.nan))
        g.load_state_dict(saved)  # what the trainer's rollback does
        g.reset()
    assert verdicts == ["rollback", "rollback", "stop"]
    assert NonFiniteGuard(max_skips=0, max_rollbacks=0).check(math.nan) == "stop"
    with pytest.raises(ValueError, match="health.nan_max_rollbacks"):
        NonFiniteGuard(max_rollbacks=-1)
