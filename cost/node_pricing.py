"""Price the whole run at start-up: every node's own instance price, summed over the launched nodes.

Each node's local rank 0 resolves its price (``cost.price_per_hour``, else its own IMDS, else its
``cluster`` entry: cost/pricing.py); one all-gather on the control group gives every rank every
node's price and every rank's host name. The rate is the sum, the same number on every rank, so
the budget decisions the ranks take from it agree. A $0 rate while ``cost.budget_usd`` is set is a
configuration error: that budget can never fire.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

from cost.config import ClusterConfig, CostConfig
from cost.meter import price_per_instance_hour
from cost.nodes import gather_node_prices, host_warning, launched_topology, run_rate

log = logging.getLogger("moeforge")


def zero_price_budget_error(rate: float, cost: CostConfig, why: str = "") -> str | None:
    if cost.budget_usd > 0 and rate <= 0:
        return (f"cost.budget_usd={cost.budget_usd:g} is set but the run is priced at $0/h{why}: the budget "
                "could never fire. Set cost.price_per_hour=<$ per instance-hour> (or pick cluster=<instance "
                "type>), or make IMDS reachable (health.imds_endpoint)")
    return None


def price_this_run(cluster: ClusterConfig, cost: CostConfig, health,
                   ctx) -> tuple[ClusterConfig, float, str | None]:
    """(this node's cluster entry with ``nodes`` = the launched count, the whole run's $/h, the
    config error to stop with or None). Every rank gets the same rate and error: decided together."""
    from health.imds import ImdsClient
    from cost.pricing import resolve_cluster

    topo = launched_topology()
    out, price, imds = cluster, 0.0, None
    if ctx.local_rank == 0:  # one IMDS conversation per node
        imds = ImdsClient(health.imds_endpoint, timeout_s=health.imds_timeout_s)
        out = resolve_cluster(cluster, cost, imds)
        price = price_per_instance_hour(out, cost)
    prices, hosts = gather_node_prices(price, socket.gethostname(), ctx.local_rank, ctx.control_group)
    nodes = len(prices)
    if nodes != topo.nodes:
        log.warning("the launcher says %d node(s) (%s) but %d rank(s) have local rank 0: billing %d",
                    topo.nodes, topo.source, nodes, nodes)
    warning = host_warning(hosts, nodes)
    if warning and ctx.rank == 0:
        log.warning(warning)
    rate = run_rate(prices)
    out = dataclasses.replace(out, nodes=nodes)
    if ctx.rank == 0:
        kinds = sorted(set(prices))
        log.info("cost: %d node(s) x %s = $%.2f/h (%s)", nodes,
                 f"${kinds[0]:.2f}/h" if len(kinds) == 1 else "{" + ", ".join(f"${p:.2f}" for p in prices) + "}/h",
                 rate, topo.source)
    why = ""
    if imds is not None and imds.disabled and getattr(imds, "on_ec2", False):
        why = f" (IMDS unreachable: {imds.disabled_reason})"
    return out, rate, zero_price_budget_error(rate, cost, why)
