"""Two torchrun agents as two nodes on one machine: ``--nnodes 2 --node-rank 0|1 --master-addr
127.0.0.1 --master-port P``, each agent its own launch (own session, own log). FACTS.md: killing an
agent's session does not kill its workers; ``Launch.signal(..., tree=True)`` kills them by PID."""

from __future__ import annotations

from pathlib import Path

from tests.dist.train_launch import TORCHRUN, Launch, free_port


def node_cmd(node_rank: int, port: int, *overrides: str, nproc: int = 1, max_restarts: int = 0) -> list[str]:
    return [TORCHRUN, "--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--local-addr", "127.0.0.1", "-m", "train", *overrides]


def start_two_nodes(out: Path, *overrides: str, nproc: int = 1, tag: str = "n", **env) -> list[Launch]:
    port = free_port()
    return [Launch(node_cmd(r, port, *overrides, nproc=nproc), out / f"{tag}{r}.log", **env) for r in (0, 1)]


def wait_all(launches: list[Launch], timeout: float) -> list[int]:
    return [launch.wait(timeout) for launch in launches]
