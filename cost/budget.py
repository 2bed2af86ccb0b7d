"""The budget: ``cost.budget_usd`` (save and exit 77 before the spend passes it), ``cost.alert_usd``
and ``cost.alert_fractions`` (one warning and one alert, moeforge.alerts, per level, across
attempts). Pure decisions, and a small stateful ``Budget`` whose state rides in the checkpoint's
trainer_state."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from cost.config import CostConfig
from cost.meter import usd_for
from health.exit_codes import ExitCode  # health never imports cost or train
from moeforge.alerts import alert  # imports nothing of ours

log = logging.getLogger("moeforge")


def spend_at_next_save(spent_usd: float, usd_per_hour: float, steps_to_next_save: int,
                       step_time_s: float, save_time_s: float = 0.0) -> float:
    """Spend when the next checkpoint would be committed, at the current rate and step time."""
    return spent_usd + usd_for(max(0, steps_to_next_save) * max(0.0, step_time_s)
                               + max(0.0, save_time_s), usd_per_hour)


def should_stop(spent_now: float, projected_spend_at_next_save: Optional[float],
                budget_usd: float) -> bool:
    """Stop (save now, exit 77) when the spend has reached the budget, or would pass it before
    the next save could commit. ``budget_usd`` <= 0 is no budget."""
    if budget_usd <= 0:
        return False
    if spent_now >= budget_usd:
        return True
    return projected_spend_at_next_save is not None and projected_spend_at_next_save > budget_usd


def budget_stop_message(spent_usd: float, budget_usd: float, step: int,
                        projected_usd: Optional[float] = None) -> str:
    why = (f"spent ${spent_usd:.2f} of cost.budget_usd=${budget_usd:.2f}" if spent_usd >= budget_usd
           else f"spent ${spent_usd:.2f}; the next checkpoint would bring it to "
                f"${projected_usd or 0.0:.2f}, past cost.budget_usd=${budget_usd:.2f}")
    return (f"budget exhausted at step {step}: {why}. Saved a checkpoint and exiting "
            f"{ExitCode.BUDGET_EXHAUSTED} (do not resubmit). To continue, raise cost.budget_usd and run the same command.")


def budget_refusal_message(spent_usd: float, budget_usd: float, step: int,
                           stopped: bool = True) -> str:
    """What a re-run says when the budget is spent (or the run stopped on this same budget):
    it does not train further. ``stopped``: a budget stop happened at ``step`` (else the spend
    reached the budget some other way, e.g. a killed attempt, and ``step`` is the resumed one)."""
    where = (f"stopped on its budget at step {step}" if stopped
             else f"has used up its budget (resumed at step {step})")
    return (f"not training: this run {where} (spent ${spent_usd:.2f}, "
            f"cost.budget_usd=${budget_usd:.2f}). Exiting {ExitCode.BUDGET_EXHAUSTED}. To continue, raise the "
            f"budget, e.g. cost.budget_usd={_suggest(budget_usd)}.")


def _suggest(budget: float) -> str:
    return f"{budget * 1.5:.0f}" if budget >= 10 else f"{budget * 1.5:.2f}"


def alert_message(level_usd: float, spent_usd: float, budget_usd: float) -> str:
    of = f" ({level_usd / budget_usd:.1%} of cost.budget_usd=${budget_usd:.2f})" if budget_usd > 0 else ""
    return f"cost alert: spent ${spent_usd:.2f}, past the ${level_usd:.2f} level{of}"


def alerts_crossed(spent_usd: float, levels: Iterable[float], fired: Iterable[float]) -> List[float]:
    """Alert levels reached by ``spent_usd`` that have not fired yet, ascending."""
    done = {float(x) for x in fired}
    return sorted(float(x) for x in set(levels) if float(x) not in done and spent_usd >= float(x))


class Budget:
    """``cost.budget_usd`` and ``cost.alert_usd`` over a run: which alerts fired (once each,
    across attempts: persist ``state_dict`` in trainer_state) and whether to stop."""

    def __init__(self, budget_usd: float = 0.0, alert_usd: Iterable[float] = (),
                 hooks: Sequence[Callable[[str, str], None]] = ()):
        self.budget_usd = float(budget_usd or 0.0)
        self.alert_usd = sorted(float(x) for x in alert_usd)
        self.hooks = list(hooks)
        self.fired: List[float] = []
        self.stopped_at: Optional[Dict[str, Any]] = None

    @classmethod
    def from_config(cls, cost: CostConfig, hooks: Sequence[Callable[[str, str], None]] = ()) -> "Budget":
        # cost.alert_fractions become $ levels of this budget (raising the budget moves them)
        fractions = [f * cost.budget_usd for f in cost.alert_fractions]
        return cls(cost.budget_usd, list(cost.alert_usd) + fractions, hooks)

    def refuse_start(self, spent_usd: float, step: int) -> Optional[str]:
        """At start, after resume: the refusal message when the budget is already spent, or when
        the run already stopped on a budget at least this large (it stops a little short of
        the budget, so ``spent < budget`` alone would let a re-run train on). Raising
        ``cost.budget_usd`` above the stop's budget lets the run continue."""
        if self.budget_usd <= 0:
            return None
        stopped = self.stopped_at or {}
        same_budget = bool(stopped) and self.budget_usd <= float(stopped.get("budget_usd", 0.0))
        if spent_usd >= self.budget_usd or same_budget:
            return budget_refusal_message(spent_usd, self.budget_usd,
                                          int(stopped.get("step", step)), stopped=bool(stopped))
        return None

    def alerts(self, spent_usd: float) -> List[str]:
        """Messages for levels newly crossed (logged as warnings and sent to every hook)."""
        out = []
        for level in alerts_crossed(spent_usd, self.alert_usd, self.fired):
            msg = alert_message(level, spent_usd, self.budget_usd)
            self.fired.append(level)
            log.warning(msg)
            alert("budget", msg, "ERROR" if 0 < self.budget_usd <= level else "WARN")  # W&B, webhook
            for hook in self.hooks:
                try:
                    hook(f"moeforge cost ${level:.2f}", msg)
                except Exception as e:  # an alert must not kill the run: say so loudly instead
                    log.warning("cost alert hook failed: %s", e)
            out.append(msg)
        return out

    def check(self, spent_now: float, projected_at_next_save: Optional[float], step: int) -> Optional[str]:
        """Alerts, then the stop decision: the stop message, or None to go on."""
        self.alerts(spent_now)
        if not should_stop(spent_now, projected_at_next_save, self.budget_usd):
            return None
        self.stopped_at = {"step": int(step), "spent_usd": float(spent_now),
                           "budget_usd": self.budget_usd}
        return budget_stop_message(spent_now, self.budget_usd, step, projected_at_next_save)

    def state_dict(self) -> Dict[str, Any]:
        return {"fired": list(self.fired), "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        state = state or {}
        self.fired = [float(x) for x in state.get("fired", [])]
        self.stopped_at = state.get("stopped_at")
