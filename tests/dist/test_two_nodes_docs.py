"""docs/distributed.md's multi-node commands, composed and run at two nodes on one machine.

tests/test_docs.py validates them at their written size; here the same launcher lines run for real:
the torchrun line with --nnodes 2 (two agents, c10d rendezvous on 127.0.0.1), the srun line as two
tasks on two "nodes" with the environment srun gives each task (Slurm itself is a one-node cluster
here: docs/distributed.md says why). The model is the tiny one and the parallel layout is scaled
to 2 x 1 ranks; every launcher flag is the doc's."""

from __future__ import annotations

import json
import random
import shlex
import socket
import sys
from pathlib import Path

from tests.dist.train_launch import FAST, TORCHRUN, Launch, free_port, metric_rows
from tests.test_docs import commands

SHRINK = [*FAST, "trainer.max_steps=3", "trainer.eval_every=0", "health.preflight=off", "cost.price_per_hour=10"]


def _doc_line(prefix: str) -> list[str]:
    line = next(c for c in commands("distributed.md") if c.startswith(prefix) and "--n" in c)
    return shlex.split(line)


def _scaled_overrides(args: list[str], nodes: int) -> list[str]:
    """The doc's overrides at two nodes of one rank: the model shrunk, the layout scaled."""
    out = []
    for a in args:
        if "=" not in a or a.startswith("-"):
            continue
        key, value = a.split("=", 1)
        if key in ("model", "trainer.global_batch_size", "trainer.seq_len"):
            continue  # FAST sets the tiny shapes
        if key == "parallel.dp_replicate":
            value = str(nodes)
        if key == "parallel.ep":
            value = "1"
        out.append(f"{key}={value}")
    return out


def _port_20000_to_40000() -> int:
    """A free port srun's rule (MASTER_PORT = 20000 + SLURM_JOB_ID % 20000) can produce."""
    for _ in range(200):
        port = random.randint(20000, 39999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-39999")


def _finish(launches, run):
    try:
        rcs = [launch.wait(240) for launch in launches]
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                launch.kill()
    assert rcs == [0, 0], "\n".join(launch.tail(3000) for launch in launches)
    rows = metric_rows(run)
    assert max(rows) == 3 and all(r["nodes"] == 2 for r in rows.values()), rows
    hb = json.loads((run / "heartbeat.json").read_text())
    assert hb["cost"]["usd_per_hour"] == 20.0  # 2 nodes x $10


def _program(args: list[str], start: int) -> list[str]:
    """The doc's program part, runnable here: ``moeforge train`` -> the venv's moeforge script."""
    prog = args[start:]
    if prog[0] == "moeforge":
        return [str(Path(sys.executable).with_name("moeforge")), *prog[1:2]]
    assert prog[:3] == ["python", "-m", "train"], prog
    return [sys.executable, "-m", "train"]


def test_doc_torchrun_multi_node_line_at_two_nodes(tmp_path):
    args = _doc_line("torchrun --nnodes")
    port = free_port()
    overrides = _scaled_overrides(args, 2)
    launcher, i = [], 1
    while args[i] not in ("-m", "--no-python"):
        flag, value = args[i], args[i + 1]
        value = {"--nnodes": "2", "--nproc-per-node": "1", "--rdzv-endpoint": f"127.0.0.1:{port}",
                 "--rdzv-id": "docs2"}.get(flag, value)
        launcher += [flag, value]
        i += 2
    assert ["--rdzv-backend", "c10d"] == launcher[4:6], launcher  # the doc's rendezvous, unchanged
    program = ["-m", "train"] if args[i] == "-m" else ["--no-python", *_program(args, i + 1)]
    cmd = [TORCHRUN, *launcher, "--local-addr", "127.0.0.1", *program, *overrides, *SHRINK,
           f"output_dir={tmp_path}", "run_name=tr"]
    _finish([Launch(cmd, tmp_path / f"node{r}.log") for r in (0, 1)], tmp_path / "tr")


def test_doc_srun_line_at_two_nodes(tmp_path):
    args = _doc_line("srun --nodes")
    start = next(i for i, a in enumerate(args) if a in ("moeforge", "python"))
    program = _program(args, start)
    overrides = _scaled_overrides(args, 2)
    port = _port_20000_to_40000()
    job_id = port - 20000
    launches = []
    for node in (0, 1):  # srun --nodes 2 --ntasks-per-node 1: what srun sets for each task
        slurm = {"SLURM_PROCID": node, "SLURM_NTASKS": 2, "SLURM_LOCALID": 0, "SLURM_NODEID": node,
                 "SLURM_JOB_NUM_NODES": 2, "SLURM_NNODES": 2, "SLURM_JOB_NODELIST": "127.0.0.1",
                 "SLURM_JOB_ID": job_id}
        cmd = [*program, *overrides, *SHRINK, f"output_dir={tmp_path}", "run_name=sr"]
        launches.append(Launch(cmd, tmp_path / f"task{node}.log", **slurm))
    _finish(launches, tmp_path / "sr")
