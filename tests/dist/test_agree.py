"""Every decision taken together (train/agree.py, checkpointing/manager.py): on real gloo ranks, one
rank is made to disagree (a failed read, a raising logger, a different budget view) and every rank
must reach the same outcome within seconds (the harness bounds each test; the asserts time it)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.dist.harness import run_ranks

SECONDS = 20.0  # "within seconds" on a loaded 2-core machine; the collectives themselves take ms


def _outcome_file(d, rank):
    return os.path.join(d, f"outcome{rank}.json")


def _write(d, rank, **outcome):
    with open(_outcome_file(d, rank), "w") as f:
        json.dump(outcome, f)


def _outcomes(d, world):
    return [json.load(open(_outcome_file(d, r))) for r in range(world)]


# -- refuse to start ----------------------------------------------------------------------------

def _refuse(rank, world, d):
    from cost.config import ClusterConfig, CostConfig
    from cost.goodput import RunAccounting
    from train.agree import from_rank0

    # Rank 1 disagrees: its view says no budget (a rank that would go on into collectives).
    cost = CostConfig(budget_usd=1.0, price_per_hour=3600.0) if rank == 0 else CostConfig(price_per_hour=3600.0)
    acct = RunAccounting(ClusterConfig(), cost, os.path.join(d, f"r{rank}"), start_time=time.time() - 10)
    t0 = time.monotonic()
    refusal = from_rank0(acct.refuse_start() if rank == 0 else None)
    _write(d, rank, refused=bool(refusal), took=time.monotonic() - t0)


def test_refuse_start_is_rank0s_for_everyone(tmp_path):
    run_ranks(_refuse, 2, str(tmp_path))
    out = _outcomes(tmp_path, 2)
    assert [o["refused"] for o in out] == [True, True]
    assert max(o["took"] for o in out) < SECONDS


# -- the attempt record -------------------------------------------------------------------------

def _attempt(rank, world, d):
    import cost.heartbeat as hbmod
    from cost.config import ClusterConfig, CostConfig
    from cost.goodput import RunAccounting
    from train.agree import from_rank0

    if rank == 1:  # rank 1 cannot read the file at all (a node without the shared run directory)
        hbmod.read_heartbeat = lambda run_dir: (_ for _ in ()).throw(OSError("no such file on this node"))
    acct = RunAccounting(ClusterConfig(), CostConfig(price_per_hour=1.0), d, start_time=time.time(), rank=rank)
    hb = from_rank0(hbmod.read_heartbeat(d) if rank == 0 else None)  # read before anyone writes
    info = acct.resume(None, 0, heartbeat=hb)  # rank 0 rewrites heartbeat.json in here
    torch.distributed.barrier()
    _write(d, rank, attempt=info.attempt)


def test_attempt_record_read_once_by_rank0(tmp_path):
    from cost.config import ClusterConfig, CostConfig
    from cost.goodput import RunAccounting

    # An earlier attempt, killed before its first checkpoint, left a heartbeat.
    prev = RunAccounting(ClusterConfig(), CostConfig(price_per_hour=1.0), str(tmp_path), start_time=time.time() - 60)
    prev.resume(None, 0)
    prev.finish(1, "crash")
    run_ranks(_attempt, 2, str(tmp_path))
    assert [o["attempt"] for o in _outcomes(tmp_path, 2)] == [2, 2]


# -- resume from which step -----------------------------------------------------------------------

def _resume(rank, world, d, break_rank):
    import checkpointing.commit as commit
    from checkpointing.config import CheckpointConfig
    from checkpointing.errors import CheckpointError
    from checkpointing.manager import CheckpointManager

    mgr = CheckpointManager(CheckpointConfig(every_steps=2, keep_last=5), d, "run", rank=rank, world_size=world)
    state = {"w": torch.full((4,), float(rank))}
    for step in (2, 4):
        state["w"].fill_(step)
        mgr.save(step, state, {"tokens": step}, trainer_state={"step": step})
    mgr.close()
    if rank == break_rank:  # this rank cannot read the newest step (transient S3 error, non-shared disk)
        real = commit.is_committed
        commit.is_committed = lambda st, path: False if path.endswith("step_000000004") else real(st, path)
    state["w"].zero_()
    t0 = time.monotonic()
    try:
        meta = mgr.load_latest(state)
        _write(d, rank, step=meta["trainer_state"]["step"], w=state["w"][0].item(), took=time.monotonic() - t0)
    except CheckpointError as e:
        _write(d, rank, error=str(e), took=time.monotonic() - t0)


def test_resume_step_is_rank0s_and_all_load_it(tmp_path):
    run_ranks(_resume, 2, str(tmp_path), -1)
    assert [(o["step"], o["w"]) for o in _outcomes(tmp_path, 2)] == [(4, 4.0), (4, 4.0)]


def test_a_rank_that_cannot_read_the_chosen_step_fails_everyone(tmp_path):
    run_ranks(_resume, 2, str(tmp_path), 1)
    out = _outcomes(tmp_path, 2)
    for o in out:  # never an older step on one rank: every rank stops, naming rank 1 and the step
        assert "step" not in o, o
        assert "step_000000004" in o["error"] and "rank 1:" in o["error"] and "not every rank" in o["error"]
        assert o["took"] < SECONDS


# -- the metrics logger -------------------------------------------------------------------------

class _Logger:
    closed = False

    def close(self):
        _Logger.closed = True


def _logger(rank, world, d):
    from train.agree import AgreedFailure, build_together

    def factory():
        if rank == 0:  # W&B / TensorBoard are built on rank 0; here it raises
            raise ConnectionError("wandb.init timed out")
        return _Logger()

    t0 = time.monotonic()
    try:
        build_together(factory, "the metrics logger")
        _write(d, rank, ok=True)
    except AgreedFailure as e:
        _write(d, rank, error=str(e), took=time.monotonic() - t0, closed=_Logger.closed)


def test_logger_failure_on_rank0_stops_every_rank(tmp_path):
    run_ranks(_logger, 2, str(tmp_path))
    out = _outcomes(tmp_path, 2)
    assert all(o.get("error") == out[0]["error"] for o in out), out
    assert "rank 0: ConnectionError: wandb.init timed out" in out[0]["error"]
    assert out[1]["closed"] and max(o["took"] for o in out) < SECONDS
