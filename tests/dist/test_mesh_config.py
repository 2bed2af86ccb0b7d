"""Bad parallel configs fail before any collective, naming the key; Slurm env; a 1-rank build."""

import subprocess
import sys

import pytest

from parallelism.mesh import resolve_parallel
from parallelism.process_group import apply_slurm_env, first_host
from tests.dist.common import par


@pytest.mark.parametrize("cfg,world,n_experts,key", [
    (par(dp_replicate=3), 4, 8, "parallel.dp_replicate=3"),
    (par(dp_shard=3), 4, 8, "parallel.dp_shard=3"),
    (par(dp_replicate=2, dp_shard=4), 4, 8, "parallel.dp_replicate=2 x parallel.dp_shard=4"),
    (par(dp_shard=4, ep=3), 4, 8, "parallel.ep=3 must divide parallel.dp_shard=4"),
    (par(dp_shard=4, ep=4), 4, 6, "parallel.ep=4 must divide model.moe.n_experts=6"),
    (par(dp_shard=2, ep=2), 2, 0, "model.moe.n_experts=0"),
    (par(ep=0), 2, 8, "parallel.ep=0"),
    (par(dp_shard=0), 2, 8, "parallel.dp_shard=0"),
])
def test_bad_configs_name_the_key(cfg, world, n_experts, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(".", r"\.")):
        resolve_parallel(cfg, world, n_experts)


def test_good_configs_resolve():
    d = resolve_parallel(par(dp_replicate=2, ep=2), 8, 8)
    assert (d.dp_replicate, d.dp_shard, d.ep, d.efsdp, d.hsdp) == (2, 4, 2, 2, True)
    assert resolve_parallel(par(), 1, 8).dp_shard == 1


def test_bad_mesh_fails_before_any_collective(tmp_path):
    """parallelize() on a bad config raises in every rank before init_device_mesh: here one
    process in a 2-rank group whose peer never comes: a collective would hang until timeout."""
    code = f"""
import datetime, sys, time, torch.distributed as dist
sys.path.insert(0, {str(__import__('os').getcwd())!r})
from types import SimpleNamespace
import torch
from model.transformer import Transformer
from parallelism.parallelize import parallelize
from tests.dist.common import tiny_cfg, par
dist.init_process_group("gloo", init_method="file://{tmp_path}/pg", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=20))
with torch.device("meta"):
    m = Transformer(tiny_cfg())
t = time.monotonic()
try:
    parallelize(m, par(dp_shard=2, ep=3), SimpleNamespace(world_size=2), "cpu")
except ValueError as e:
    print("ERR", e, round(time.monotonic() - t, 2))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR parallel.dp_replicate=1 x parallel.dp_shard=2 = 2" not in out.stdout
    assert "ERR parallel.ep=3 must divide parallel.dp_shard=2" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split()[-1]) < 5


def test_slurm_env():
    assert first_host("gpu-[003-005,9],cpu1") == "gpu-003"
    assert first_host("p5-st-p5-[1-4]") == "p5-st-p5-1"
    assert first_host("node7") == "node7"
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[07-08]",
           "SLURM_JOB_ID": "123456", "MASTER_PORT": "1234"}
    assert apply_slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n07"}
    assert env["MASTER_PORT"] == "1234"
    torchrun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "5", "WORLD_SIZE": "8"}
    assert apply_slurm_env(torchrun) == {} and torchrun["RANK"] == "5"
