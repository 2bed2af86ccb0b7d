"""cost/nodes.py: the node count from the launcher's variables (no process group), the check against
cluster.nodes, the host cross-check, and the per-node price gather on real gloo ranks."""

from __future__ import annotations

import pytest

from cost.nodes import Topology, check_nodes, gather_node_prices, host_warning, launched_topology, run_rate
from tests.dist.harness import run_ranks


def test_torchrun_two_nodes_of_four():
    env = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "ROLE_WORLD_SIZE": "8",
           "TORCHELASTIC_RUN_ID": "x"}
    t = launched_topology(env)
    assert (t.nodes, t.node_rank) == (2, 1) and "WORLD_SIZE=8" in t.source


def test_torchrun_uneven_workers_is_an_error():
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=3"):
        launched_topology({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "0"})


@pytest.mark.parametrize("key", ["SLURM_JOB_NUM_NODES", "SLURM_NNODES"])
def test_slurm(key):
    t = launched_topology({key: "4", "SLURM_NODEID": "2", "SLURM_PROCID": "9", "WORLD_SIZE": "16"})
    assert (t.nodes, t.node_rank) == (4, 2) and key in t.source


def test_torchrun_under_slurm_uses_torchrun():
    env = {"SLURM_JOB_NUM_NODES": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
    assert launched_topology(env).nodes == 2  # the workers torchrun started are what runs


def test_hyperpod_eks_operator_env():
    assert launched_topology({"PET_NNODES": "4", "PET_NODE_RANK": "3"}) == Topology(4, 3, "HyperPod/PyTorchJob PET_NNODES=4")
    assert launched_topology({"PET_NNODES": "2:6"}).nodes == 6


def test_no_launcher_is_one_node():
    assert launched_topology({}).nodes == 1


def test_check_names_both_numbers():
    topo = Topology(2, 0, "torchrun WORLD_SIZE=2/LOCAL_WORLD_SIZE=1")
    msg = check_nodes(4, topo)
    assert "cluster.nodes=4" in msg and "2 node(s) were launched" in msg and "cluster.nodes=2" in msg
    assert check_nodes(0, topo) is None and check_nodes(2, topo) is None


def test_hosts_cross_check_warns_only():
    assert host_warning(["a", "a", "b", "b"], 2) is None
    w = host_warning(["box", "box"], 2)
    assert "2 node(s) launched" in w and "1 distinct host" in w


def test_rate_sums_each_nodes_price():
    assert run_rate([98.32, 55.04]) == pytest.approx(153.36)


def test_gather_without_a_group_is_this_node():
    assert gather_node_prices(12.5, "h", 0) == ([12.5], ["h"])


def _gather(rank, world):
    # 4 ranks as 2 nodes of 2: local rank 0 of each node carries that node's own price.
    local = rank % 2
    price = {0: 10.0, 2: 32.77}.get(rank, 0.0)
    prices, hosts = gather_node_prices(price, f"node{rank // 2}", local)
    assert sorted(prices) == [10.0, 32.77] and run_rate(prices) == pytest.approx(42.77)
    assert hosts == ["node0", "node0", "node1", "node1"]


def test_gather_heterogeneous_prices_on_gloo_ranks():
    run_ranks(_gather, 4)
