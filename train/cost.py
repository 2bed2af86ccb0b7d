"""What a run costs: the hourly rate from the cluster catalog, and a meter that spans attempts.

The rate is per instance-hour times nodes: ``cost.price_per_hour`` (an override, e.g. a negotiated
or Savings-Plan rate) wins; else ``cluster.price_spot_per_hour`` when ``cluster.lifecycle`` is
``spot``; else ``cluster.price_on_demand_per_hour``.

The meter bills wall time from process start (``start_time`` from the trainer), not only step
time: EC2 bills the instance while it loads checkpoints, compiles and waits on stragglers too.
Prior attempts are carried as dollars *and* seconds, so an attempt that resumes on a different
rate (spot after on-demand) does not re-price the past. The state is a flat, versioned dict so a
budget stop and a goodput ledger can add keys later without breaking old checkpoints.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from train.config import ClusterConfig, CostConfig

LIFECYCLES = ("on_demand", "spot")
STATE_VERSION = 1


def price_per_instance_hour(cluster: ClusterConfig, cost: CostConfig) -> float:
    """$ per instance-hour that applies to this run (override > spot > on-demand)."""
    if cost.price_per_hour and cost.price_per_hour > 0:
        return float(cost.price_per_hour)
    if cluster.lifecycle not in LIFECYCLES:
        raise ValueError(
            f"cluster.lifecycle={cluster.lifecycle!r} must be one of {LIFECYCLES}"
        )
    if cluster.lifecycle == "spot":
        return float(cluster.price_spot_per_hour)
    return float(cluster.price_on_demand_per_hour)


def usd_per_hour(cluster: ClusterConfig, cost: CostConfig) -> float:
    """$ per wall-clock hour for the whole run: instance price x nodes."""
    if cluster.nodes < 1:
        raise ValueError(f"cluster.nodes={cluster.nodes} must be >= 1")
    return price_per_instance_hour(cluster, cost) * cluster.nodes


# The name the trainer uses: the whole run's $ per hour (instance price x nodes).
price_per_hour = usd_per_hour


def usd_for(seconds: float, rate_usd_per_hour: float) -> float:
    return seconds / 3600.0 * rate_usd_per_hour


def usd_per_mtok(spent_usd: float, tokens: float) -> Optional[float]:
    """$ per million tokens; None when no token has been trained yet."""
    if tokens <= 0:
        return None
    return spent_usd / (tokens / 1e6)


def tokens_per_usd(spent_usd: float, tokens: float) -> Optional[float]:
    """Tokens per dollar; None when nothing has been spent (free hardware or time zero)."""
    if spent_usd <= 0:
        return None
    return tokens / spent_usd


class CostMeter:
    """Dollars spent by a run across all its attempts.

    ``usd_per_hour`` is the rate of the whole run (all nodes); ``start_time`` is this process's
    start on the ``time.time()`` clock (the trainer passes it, so time spent before the meter was
    built still counts).
    """

    def __init__(self, usd_per_hour: float, start_time: Optional[float] = None):
        if usd_per_hour < 0:
            raise ValueError(f"usd_per_hour={usd_per_hour} must be >= 0")
        self.usd_per_hour = float(usd_per_hour)
        self.start_time = time.time() if start_time is None else float(start_time)
        self.prior_paid_s = 0.0  # paid seconds of earlier attempts
        self.prior_spent_usd = 0.0  # their dollars, at the rates they ran at
        self.attempt = 1  # 1 = first attempt of this run

    @classmethod
    def from_config(
        cls, cluster: ClusterConfig, cost: CostConfig, start_time: Optional[float] = None
    ) -> "CostMeter":
        return cls(usd_per_hour(cluster, cost), start_time=start_time)

    def attempt_paid_s(self, now: Optional[float] = None) -> float:
        now = time.time() if now is None else now
        return max(0.0, now - self.start_time)

    def elapsed_paid_s(self, now: Optional[float] = None) -> float:
        """Paid seconds of every attempt so far, this one included."""
        return self.prior_paid_s + self.attempt_paid_s(now)

    def spent_usd(self, now: Optional[float] = None) -> float:
        return self.prior_spent_usd + usd_for(self.attempt_paid_s(now), self.usd_per_hour)

    def usd_per_mtok(self, tokens: float, now: Optional[float] = None) -> Optional[float]:
        """``tokens`` is the run's total (all attempts), as the trainer counts it."""
        return usd_per_mtok(self.spent_usd(now), tokens)

    def tokens_per_usd(self, tokens: float, now: Optional[float] = None) -> Optional[float]:
        return tokens_per_usd(self.spent_usd(now), tokens)

    def projected_usd(self, remaining_s: float, now: Optional[float] = None) -> float:
        """Spent so far plus ``remaining_s`` more at the current rate (for an ETA in dollars)."""
        return self.spent_usd(now) + usd_for(max(0.0, remaining_s), self.usd_per_hour)

    def metrics(self, tokens: float, now: Optional[float] = None) -> Dict[str, Optional[float]]:
        """The cost fields of a metric line: ``spent_usd``, ``usd_per_mtok``, ``tok_per_usd``."""
        spent = self.spent_usd(now)
        return {
            "spent_usd": spent,
            "usd_per_mtok": usd_per_mtok(spent, tokens),
            "tok_per_usd": tokens_per_usd(spent, tokens),
        }

    def state_dict(self, now: Optional[float] = None) -> Dict[str, Any]:
        """Plain JSON-able totals, to be stored in the checkpoint's meta.json."""
        return {
            "version": STATE_VERSION,
            "paid_s": self.elapsed_paid_s(now),
            "spent_usd": self.spent_usd(now),
            "attempts": self.attempt,
            "usd_per_hour": self.usd_per_hour,  # the rate of the attempt that saved
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues the totals of a saved run; this process becomes the next attempt."""
        version = int(state.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(
                f"cost state version {version} is newer than this code understands "
                f"({STATE_VERSION}); upgrade moeforge to resume this run"
            )
        self.prior_paid_s = float(state["paid_s"])
        self.prior_spent_usd = float(state["spent_usd"])
        self.attempt = int(state.get("attempts", 1)) + 1
