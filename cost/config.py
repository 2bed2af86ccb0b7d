"""The ``cluster`` and ``cost`` sections: what the machines are and cost, and how the run is billed.

docs/cost.md has the formulas; the catalog of instance types is configs/cluster/. Cross-field
rules are in ``cost/validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class ClusterConfig:
    name: str = "local"
    instance_type: str = "local"
    accelerator: str = "auto"  # device name for the peak-FLOPs table; auto = detect
    accelerators_per_node: int = 0  # 0 = whatever the process sees
    nodes: int = 0  # 0 = the launcher's count (cost/nodes.py); set: must equal it
    lifecycle: str = "on_demand"  # on_demand | spot
    price_on_demand_per_hour: float = 0.0  # $ per instance-hour
    price_spot_per_hour: float = 0.0
    price_source: str = ""  # where the on-demand figure comes from
    price_date: str = ""
    spot_price_source: str = ""  # spot prices move: say whether sampled or estimated, and how
    spot_price_date: str = ""
    region: str = ""  # region the prices are for
    peak_tflops_override: float = 0.0  # dense bf16 TFLOP/s per accelerator, 0 = table


@dataclass
class CostConfig:
    price_per_hour: float = 0.0  # override: $ per instance-hour (0 = catalog)
    budget_usd: float = 0.0  # 0 = no budget
    alert_usd: List[float] = field(default_factory=list)  # $ levels: one logged warning (+ alert) each
    alert_fractions: List[float] = field(default_factory=list)  # of budget_usd, e.g. [0.5, 0.8, 1.0]: alerts too
    # Gap between attempts billed at most this long: -1 = the whole gap (capacity stays paid while
    # a job is requeued), 0 = none (elastic capacity: nothing is paid between attempts).
    max_gap_billed_s: float = -1.0
    heartbeat_every_s: float = 30.0  # rank 0 rewrites RUN_DIR/heartbeat.json at most this often
    projection_warmup_steps: int = 10  # steps of an attempt before its projection is trusted
    target_tokens: int = 0  # project to this many tokens; 0 = to trainer.max_steps
