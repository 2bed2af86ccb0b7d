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
- The store is ours, namespaced per attempt (``moeforge/<run id>/attempt_<TORCHELASTIC_RESTART_COUNT>``).
  Measured (torch 2.13, ``--rdzv-backend c10d``): torchrun's agent keeps one TCPStore across
  restarts and the workers' ``default_pg`` keys from the killed round stay in it, so a restarted
  rank could read a dead peer's gloo address and wait in ``connectFullMesh`` forever (the restart
  hang of issue 18). A fresh prefix per attempt makes every key of the new round new.
- Set-up has its own deadline, ``parallel.init_timeout_s``, enforced by a watchdog thread (gloo's
  ``Pair::waitUntilConnected`` can ignore the process group's timeout): past it the process
  leaves a record through ``on_init_timeout`` and exits 1, so torchrun or Slurm tries again.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control_group: object | None = None  # gloo group for small control-plane collectives
    store: object | None = None  # this attempt's key-value store (the abort flag lives there)

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


def attempt_prefix(environ=None) -> str:
    """The store namespace of this attempt: a restarted round never reads the killed round's keys."""
    env = os.environ if environ is None else environ
    run_id = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID") or "run"
    restart = env.get("TORCHELASTIC_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
    return f"moeforge/{run_id}/attempt_{restart}/"


def make_store(rank: int, world: int, timeout: datetime.timedelta):
    """The attempt's store: a client of torchrun's agent store when torchrun says it hosts one
    (TORCHELASTIC_USE_AGENT_STORE), else rank 0 serves it on MASTER_ADDR:MASTER_PORT."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(addr, port, world_size=None if agent else world, is_master=not agent and rank == 0,
                         timeout=timeout, wait_for_workers=False, multi_tenant=not agent)
    return dist.PrefixStore(attempt_prefix(), base)


@contextlib.contextmanager
def init_deadline(seconds: float, on_timeout: Optional[Callable[[str], None]] = None):
    """Exit the process (code 1) when the block is not done within ``seconds``: a hung set-up must
    let the launcher restart us. ``on_timeout(message)`` runs first (the exit record)."""
    done = threading.Event()

    def watch():
        if done.wait(seconds):
            return
        msg = (f"process-group set-up did not finish within parallel.init_timeout_s={seconds:g} s "
               f"(rank {os.environ.get('RANK', '?')}, MASTER_ADDR={os.environ.get('MASTER_ADDR')} "
               f"MASTER_PORT={os.environ.get('MASTER_PORT')}, restart "
               f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}): a peer never connected; exiting 1 so "
               "the launcher restarts the attempt")
        logging.getLogger("moeforge").error(msg)
        try:
            if on_timeout is not None:
                on_timeout(msg)
        finally:
            import sys

            print(msg, file=sys.stderr, flush=True)
            os._exit(1)

    t = threading.Thread(target=watch, name="moeforge-init-deadline", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()


def init_distributed(backend: str, timeout_s: float, device_type: str, init_timeout_s: float = 120.0,
                     on_init_timeout: Optional[Callable[[str], None]] = None) -> DistContext:
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
    with init_deadline(init_timeout_s, on_init_timeout):
        # The store's own timeout is longer: the deadline above, with its clear record, fires first.
        store = make_store(rank, world, datetime.timedelta(seconds=init_timeout_s + 60))
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return DistContext(rank, world, local, control, store)


def shutdown() -> None:
    """Destroy the process group if there is one; safe to call twice and on error paths."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (peer died) must not mask the original error
            import logging

            logging.getLogger("moeforge").warning("destroy_process_group failed", exc_info=True)


@contextlib.contextmanager
def distributed(backend: str, timeout_s: float, device_type: str, init_timeout_s: float = 120.0):
    """``with distributed(...) as ctx:`` init, and :func:`shutdown` on every way out."""
    try:
        yield init_distributed(backend, timeout_s, device_type, init_timeout_s)
    finally:
        shutdown()
