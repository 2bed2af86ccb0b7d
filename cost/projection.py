"""Projected $ and time to finish a run, and the spot vs on-demand what-if. Pure arithmetic.

    remaining_steps   = max_steps - step                 (or ceil(tokens left / tokens per step))
    remaining_train_s = remaining_steps x step_time_s    (productive time still needed)
    remaining_wall_s  = remaining_train_s / ETTR          (badput at the rate observed so far)
    remaining_usd     = remaining_wall_s / 3600 x $/h     (the whole run's rate, all nodes)

What-if, same throughput: ``base_ettr`` is ETTR without restart badput (startup of later
attempts, lost work, downtime). With λ interruptions per hour, each costing ``restart_cost_s``
of paid time, a wall hour holds (1 - λ x restart_cost_s / 3600) hours of useful wall time:

    wall_s = remaining_train_s / base_ettr / (1 - λ x restart_cost_s / 3600)

on-demand uses λ = 0 at the on-demand price; spot the observed λ at the spot price. When
λ x restart_cost_s >= 3600 s the run never finishes (``None``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

from cost.meter import interruptions, interruptions_per_hour, usd_for


@dataclass
class Projection:
    remaining_steps: int
    remaining_tokens: float
    remaining_train_s: float
    remaining_wall_s: Optional[float]
    remaining_usd: Optional[float]
    total_usd: Optional[float]
    total_paid_s: Optional[float]
    ettr: float

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def remaining_steps(step: int, max_steps: int, tokens_per_step: float, tokens_done: float = 0.0,
                    target_tokens: float = 0.0) -> int:
    """Steps left to ``max_steps``, or to ``target_tokens`` when that is set (> 0)."""
    if target_tokens and target_tokens > 0:
        if tokens_per_step <= 0:
            raise ValueError("tokens_per_step must be > 0 to project to a token target")
        return max(0, math.ceil((target_tokens - tokens_done) / tokens_per_step))
    return max(0, int(max_steps) - int(step))


def project(*, step: int, max_steps: int, step_time_s: float, tokens_per_step: float,
            usd_per_hour: float, spent_usd: float, paid_s: float, ettr: Optional[float] = None,
            tokens_done: float = 0.0, target_tokens: float = 0.0) -> Projection:
    """$ and wall time to finish from the observed step time and ETTR (None/<=0 ETTR: 1.0)."""
    n = remaining_steps(step, max_steps, tokens_per_step, tokens_done, target_tokens)
    e = ettr if ettr and ettr > 0 else 1.0
    train_s = n * max(0.0, step_time_s)
    wall = train_s / e
    usd = usd_for(wall, usd_per_hour)
    return Projection(n, n * tokens_per_step, train_s, wall, usd, spent_usd + usd, paid_s + wall, e)


def wall_with_interruptions(train_s: float, base_ettr: float, per_hour: float,
                            restart_cost_s: float) -> Optional[float]:
    """Wall seconds to get ``train_s`` of productive time (see module docstring); None = never."""
    e = base_ettr if base_ettr and base_ettr > 0 else 1.0
    useful = 1.0 - per_hour * restart_cost_s / 3600.0
    if useful <= 0:
        return None
    return train_s / e / useful


def what_if(remaining_train_s: float, *, base_ettr: float, on_demand_usd_per_hour: float,
            spot_usd_per_hour: float, interruptions_per_hour: float,
            restart_cost_s: float) -> Dict[str, Dict[str, Optional[float]]]:
    """Remaining wall hours and $ on on-demand (no interruptions) vs spot (observed rate)."""
    out = {}
    for name, rate, lam in (("on_demand", on_demand_usd_per_hour, 0.0),
                            ("spot", spot_usd_per_hour, interruptions_per_hour)):
        wall = wall_with_interruptions(remaining_train_s, base_ettr, lam, restart_cost_s)
        out[name] = {"usd_per_hour": rate, "interruptions_per_hour": lam,
                     "wall_s": wall, "usd": None if wall is None else usd_for(wall, rate)}
    return out


def restart_stats(history: Sequence[Dict[str, Any]], goodput_seconds: Dict[str, float],
                  paid_s: float) -> Dict[str, float]:
    """Observed interruption rate, cost per restart and ETTR without restart badput.

    restart_cost_s = (downtime + lost work) / interruptions + startup per attempt (0 with no
    interruption yet); base_ettr = productive / (paid - downtime - lost work - startup beyond one
    attempt's worth).
    """
    n_int = interruptions(history)
    n_att = max(1, len(history))
    startup = float(goodput_seconds.get("startup", 0.0))
    restart_bad = float(goodput_seconds.get("downtime", 0.0)) + float(goodput_seconds.get("lost_work", 0.0))
    per_restart = (restart_bad / n_int + startup / n_att) if n_int else 0.0
    base_paid = paid_s - restart_bad - startup * (n_att - 1) / n_att
    prod = float(goodput_seconds.get("productive", 0.0))
    return {"interruptions": n_int, "interruptions_per_hour": interruptions_per_hour(history),
            "restart_cost_s": per_restart, "base_ettr": prod / base_paid if base_paid > 0 and prod > 0 else 1.0}


def budget_warning(proj: Projection, budget_usd: float, spent_usd: float, step: int,
                   step_time_s: float, usd_per_hour: float, ettr: float = 1.0) -> Optional[str]:
    """The start-of-run warning when the projected total passes ``cost.budget_usd`` (else None),
    with the step the budget is expected to stop the run at."""
    if budget_usd <= 0 or proj.total_usd is None or proj.total_usd <= budget_usd:
        return None
    usd_per_step = usd_for(step_time_s / (ettr if ettr > 0 else 1.0), usd_per_hour)
    stop = step + int(max(0.0, budget_usd - spent_usd) / usd_per_step) if usd_per_step > 0 else step
    return (f"projected total ${proj.total_usd:.2f} to finish ({proj.remaining_steps} more steps) "
            f"exceeds cost.budget_usd=${budget_usd:.2f}: the budget will stop the run near step "
            f"{stop}. Raise cost.budget_usd or lower trainer.max_steps.")
