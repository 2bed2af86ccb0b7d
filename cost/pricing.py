"""Pick the price from what the machine says it is: on EC2, IMDS names the instance type and its
lifecycle (spot / on-demand); the catalog in configs/cluster/ has the prices.

Rules (a person's explicit choice always wins):
- `cost.price_per_hour` set: that price, nothing looked up.
- `cluster=local` (the default) on an EC2 instance whose type is in the catalog: that entry, with
  the detected lifecycle. Off EC2 nothing is sent (health.imds.ImdsClient checks the machine first).
- `cluster=<type>` chosen and IMDS reachable: the detected lifecycle replaces the entry's, and a
  detected type different from the chosen one is logged (the chosen entry's prices stay).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from cost.config import ClusterConfig, CostConfig
from moeforge import config_dir

log = logging.getLogger("moeforge")

CATALOG_DIR = os.path.join(config_dir(), "cluster")  # the installed package's tree (moeforge.config_dir)


def catalog_entry(instance_type: str) -> ClusterConfig | None:
    """The catalog's ClusterConfig for an instance type, or None when it has no file."""
    from omegaconf import OmegaConf

    path = os.path.join(CATALOG_DIR, f"{instance_type}.yaml")
    if not instance_type or not os.path.exists(path):
        return None
    merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def resolve_cluster(cluster: ClusterConfig, cost: CostConfig, imds) -> ClusterConfig:
    """The cluster section to price the run with; ``imds`` is an ImdsClient (or None)."""
    if cost.price_per_hour > 0 or imds is None or not imds.available():
        return cluster
    itype, life = imds.instance_type(), imds.instance_life_cycle()
    lifecycle = {"spot": "spot", "on-demand": "on_demand", "scheduled": "on_demand"}.get(life or "", None)
    out = cluster
    if cluster.name == "local" and itype:
        entry = catalog_entry(itype)
        if entry is None:
            log.warning("IMDS says this is a %s, which configs/cluster/ has no price for: the run is "
                        "priced as free; set cost.price_per_hour or add the catalog entry", itype)
            return cluster
        out = dataclasses.replace(entry, nodes=cluster.nodes)
        log.info("pricing: IMDS says %s (%s): using configs/cluster/%s.yaml", itype, life, itype)
    elif itype and itype != cluster.instance_type:
        log.warning("cluster=%s was chosen but IMDS says this instance is a %s: pricing as %s",
                    cluster.name, itype, cluster.name)
    if lifecycle and lifecycle != out.lifecycle:
        log.info("pricing: lifecycle %s from IMDS (cluster.lifecycle was %s)", lifecycle, out.lifecycle)
        out = dataclasses.replace(out, lifecycle=lifecycle)
    return out
