"""Rules of the ``cost`` and ``cluster`` sections, each failure naming the field and the fix.
``train/validate.py`` calls them with the rest of the run's rules."""

from __future__ import annotations

from typing import List

from cost.config import ClusterConfig, CostConfig


def validate_cost_config(cost: CostConfig) -> List[str]:
    """Problems with the ``cost`` section, each naming the field and the fix ([] when fine)."""
    errors = []
    if cost.budget_usd < 0 or cost.price_per_hour < 0:
        errors.append("cost.budget_usd and cost.price_per_hour must be >= 0")
    if any(a <= 0 for a in cost.alert_usd):
        errors.append(f"cost.alert_usd={list(cost.alert_usd)} must hold $ levels > 0")
    if cost.alert_fractions and cost.budget_usd <= 0:
        errors.append(f"cost.alert_fractions={list(cost.alert_fractions)} are fractions of cost.budget_usd: "
                      "set cost.budget_usd, or use cost.alert_usd for $ levels")
    if cost.max_gap_billed_s < 0 and cost.max_gap_billed_s != -1:
        errors.append(f"cost.max_gap_billed_s={cost.max_gap_billed_s} must be -1 (bill the whole "
                      "gap), 0 (none) or a cap in seconds > 0")
    if cost.heartbeat_every_s <= 0:
        errors.append(f"cost.heartbeat_every_s={cost.heartbeat_every_s} must be > 0")
    if cost.projection_warmup_steps < 0 or cost.target_tokens < 0:
        errors.append("cost.projection_warmup_steps and cost.target_tokens must be >= 0")
    return errors


def validate_cluster_config(cluster: ClusterConfig) -> List[str]:
    """Problems with the ``cluster`` section ([] when fine)."""
    errors = []
    if cluster.nodes < 0:
        errors.append(f"cluster.nodes={cluster.nodes} must be >= 0 (0 = the launched node count)")
    return errors
