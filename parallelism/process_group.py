"""Process-group initialisation from torchrun's or Slurm's environment, with explicit timeouts.

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: used as they are.
- ``srun python -m train`` (one task per GPU, no torchrun): :func:`apply_slurm_env` fills the same
  variables from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; MASTER_ADDR defaults to the first
  host of SLURM_JOB_NODELIST (or SLURM_NODELIST) and MASTER_PORT to ``20000 + SLURM_JOB_ID % 20000``,
  so every task of one job agrees without talking and two jobs sharing a node rarely collide.
  Variables already set are never overwritten.
- NCCL on GPU, gloo on CPU (``backend=auto``); beside an NCCL world a gloo group carries the small
  control-plane collectives (stop/save flags) so they never queue behind training kernels.
- :func:`shutdown` is idempotent; :func:`distributed` is a context manager that calls it on every
  exit path (return, exception, ``SystemExit``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control_group: object | None = None  # gloo group for small control-plane collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control_group)


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``"gpu-[003-005,9],cpu1"`` -> ``"gpu-003"``.

    Handles the compressed forms Slurm prints (prefix, bracketed ranges with zero padding);
    ``scontrol show hostnames`` would need the Slurm binaries on every node.
    """
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse a host from Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + nodelist[m.end():].split(",")[0]


def apply_slurm_env(environ=None) -> dict:
    """Under Slurm without torchrun, set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from
    Slurm's variables where unset. Returns what it set (empty when not under srun or torchrun
    already set them). Call it before anything reads LOCAL_RANK."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env or "RANK" in env:
        return {}
    values = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
              "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and nodelist:
        values["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
        values["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    set_now = {k: v for k, v in values.items() if k not in env}
    env.update(set_now)
    return set_now


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's (srun without torchrun)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return 0, 1, 0


def init_distributed(backend: str, timeout_s: float, device_type: str) -> DistContext:
    apply_slurm_env()
    rank, world, local = env_ranks()
    if world == 1:
        return DistContext()
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return DistContext(rank, world, local, control)


def shutdown() -> None:
    """Destroy the process group if there is one; safe to call twice and on error paths."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (peer died) must not mask the original error
            import logging

            logging.getLogger("moeforge").warning("destroy_process_group failed", exc_info=True)


@contextlib.contextmanager
def distributed(backend: str, timeout_s: float, device_type: str):
    """``with distributed(...) as ctx:`` init, and :func:`shutdown` on every way out."""
    try:
        yield init_distributed(backend, timeout_s, device_type)
    finally:
        shutdown()
