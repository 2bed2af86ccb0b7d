"""How many nodes are running, and what they cost together.

The launcher's count is authoritative (docs/cost.md, "Nodes"):

- torchrun: ``WORLD_SIZE / LOCAL_WORLD_SIZE`` when every node runs the same number of workers
  (``ROLE_WORLD_SIZE`` is WORLD_SIZE for the one role we run); ``GROUP_RANK`` is this node's index.
- Slurm: ``SLURM_JOB_NUM_NODES`` (the allocation), else ``SLURM_NNODES``.
- HyperPod EKS (hyperpodrun, or the Kubeflow PyTorchJob env the operator sets): ``PET_NNODES``
  (a number or a ``min:max`` range, whose max is used when nothing else says).

``cluster.nodes=0`` (the default) means "use what was launched"; a positive value is a claim that
:func:`check_nodes` compares with the launcher's count. Host names gathered at start-up are only a
cross-check: two agents on one machine (tests, a fat node split in two) share one name.

Pure functions of their inputs; the one collective (:func:`gather_node_prices`) is separate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

log = logging.getLogger("moeforge")


@dataclass(frozen=True)
class Topology:
    nodes: int  # nodes the launcher started
    node_rank: int  # this node's index (0 when unknown)
    source: str  # which variables said so, for messages


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    value = env.get(key, "").strip()
    return int(value) if value.isdigit() else None


def launched_topology(env: Optional[Mapping[str, str]] = None) -> Topology:
    """The node count from the launcher's environment (1 when nothing launched us)."""
    env = os.environ if env is None else env
    world = _int(env, "WORLD_SIZE") or _int(env, "ROLE_WORLD_SIZE")
    local = _int(env, "LOCAL_WORLD_SIZE")
    if world and local and ("GROUP_RANK" in env or "TORCHELASTIC_RUN_ID" in env):
        if world % local:
            raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: nodes "
                             "run different worker counts; launch the same --nproc-per-node on every node")
        return Topology(world // local, _int(env, "GROUP_RANK") or 0,
                        f"torchrun WORLD_SIZE={world}/LOCAL_WORLD_SIZE={local}")
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        n = _int(env, key)
        if n:
            return Topology(n, _int(env, "SLURM_NODEID") or 0, f"Slurm {key}={n}")
    pet = env.get("PET_NNODES", "").strip()
    if pet:
        n = int(pet.split(":")[-1])
        return Topology(n, _int(env, "PET_NODE_RANK") or 0, f"HyperPod/PyTorchJob PET_NNODES={pet}")
    if world and local:
        return Topology(max(1, world // local), 0, f"WORLD_SIZE={world}/LOCAL_WORLD_SIZE={local}")
    return Topology(1, 0, "no launcher (one process)")


def check_nodes(configured: int, topo: Topology) -> Optional[str]:
    """The validation error when ``cluster.nodes`` is set and disagrees with the launch, else None."""
    if configured and configured != topo.nodes:
        return (f"cluster.nodes={configured} but {topo.nodes} node(s) were launched ({topo.source}): "
                f"the run would be billed for {configured}; set cluster.nodes={topo.nodes} or leave it "
                "unset (0 = count the launched nodes)")
    return None


def host_warning(hosts: Sequence[str], nodes: int) -> Optional[str]:
    """A warning when the distinct host names do not match the launched node count (never an error:
    two agents on one machine share a name)."""
    distinct = sorted(set(hosts))
    if len(distinct) == nodes:
        return None
    return (f"{nodes} node(s) launched but the ranks run on {len(distinct)} distinct host(s) "
            f"({', '.join(distinct[:8])}{' ...' if len(distinct) > 8 else ''}): billing {nodes} node(s) "
            "as the launcher says (several agents on one machine share a host name)")


def run_rate(node_prices: Sequence[float]) -> float:
    """$ per hour of the whole run: each node bills its own instance price."""
    return float(sum(node_prices))


def gather_node_prices(price: float, host: str, local_rank: int, group=None) -> tuple[list[float], list[str]]:
    """One all-gather at start-up: every node's price (from its local rank 0) and every rank's host.

    Returns (prices, one per node; hosts, one per rank). Without a process group: this node alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(price)], [host]
    rows: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(rows, (float(price), host, int(local_rank)), group=group)
    prices = [p for p, _, lr in rows if lr == 0]
    return prices, [h for _, h, _ in rows]
