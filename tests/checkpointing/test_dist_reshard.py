"""Real 2-process gloo groups with an FSDP2-sharded model + AdamW:
2 ranks save → 1 process loads; 1 process saves → 2 ranks load; 3 async saves on 2 ranks in thread
and in process mode."""

import copy
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from checkpointing import AppState, CheckpointManager
from tests.checkpointing.helpers import Cfg, Tiny, make, train_steps

WORLD = 2


def _state(model, opt):
    return {"app": AppState(model, opt)}


def _full(model, opt):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # deepcopy: on CPU, "offloaded" scalars like AdamW's step alias the live optimizer state
    return copy.deepcopy({"model": get_model_state_dict(model, options=full),
                          "optim": get_optimizer_state_dict(model, opt, options=full)})


def _assert_equal_full(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for fqn, st in a["optim"]["state"].items():
        for k, v in st.items():
            assert torch.equal(b["optim"]["state"][fqn][k], v), (fqn, k)


def _sharded(seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(seed)
    model = Tiny()
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        # 1 → 2: a checkpoint the parent saved in one process loads into the sharded model
        model, opt = _sharded(seed=7)
        meta = CheckpointManager(Cfg(), out_dir, "single", rank=rank, world_size=WORLD).load_latest(
            _state(model, opt))
        assert meta["step"] == 2 and meta["world_size"] == 1
        plain, plain_opt = make(seed=0)
        train_steps(plain, plain_opt, 2)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        loaded = _full(model, opt)  # collective; with cpu_offload only rank 0 gets the values
        if rank == 0:
            expected = {"model": plain.state_dict(), "optim": get_optimizer_state_dict(plain, plain_opt)}
            _assert_equal_full(expected, loaded)

        # 2 → 1: save from the sharded model
        model, opt = _sharded(seed=0)
        train_steps(model, opt, 2)  # same batches on both ranks
        mgr = CheckpointManager(Cfg(), out_dir, "run", rank=rank, world_size=WORLD)
        res = mgr.save(2, _state(model, opt), meta={"tokens": 64}, trainer_state={"samples_consumed": 8})
        assert res.committed
        ref = _full(model, opt)
        if rank == 0:
            torch.save(ref, f"{out_dir}/ref_run.pt")

        # three consecutive async saves per mode, DCP on its own gloo group (the default group
        # stays free for training collectives while the write runs); process mode's daemon
        # processes build their own group from it
        ckpt_pg = dist.new_group(backend="gloo")
        for name, mode, staging in (("thread", "thread", "host"), ("process", "process", "host"),
                                    ("thread_device", "thread", "device")):
            amgr = CheckpointManager(Cfg(async_mode=mode, keep_last=2, staging=staging), out_dir, f"async_{name}",
                                     rank=rank, world_size=WORLD, process_group=ckpt_pg)
            assert amgr._async_mode == mode  # no fallback with a process group
            for step in (3, 4, 5):
                train_steps(model, opt, 1, seed=step)
                amgr.save(step, _state(model, opt), meta={"tokens": step})
                amgr.wait()
                if step == 5:
                    ref = _full(model, opt)
                train_steps(model, opt, 1, seed=100 + step)  # runs while the write may still be going
            amgr.close()
            dist.barrier()
            if rank == 0:
                assert amgr.committed_steps() == [4, 5]
                assert amgr.last_save_stats()["ckpt_ok"] == 1
                torch.save(ref, f"{out_dir}/ref_async_{name}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_two_ranks_reshard_and_async(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    plain, plain_opt = make(seed=0)
    train_steps(plain, plain_opt, 2)
    CheckpointManager(Cfg(), str(tmp_path), "single").save(2, _state(plain, plain_opt))

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "pg_init"), str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD

    for run, step in (("run", 2), ("async_thread", 5), ("async_process", 5), ("async_thread_device", 5)):
        ref = torch.load(tmp_path / f"ref_{run}.pt", weights_only=True)
        model, opt = make(seed=123)
        meta = CheckpointManager(Cfg(), str(tmp_path), run).load_latest(_state(model, opt))
        assert meta["step"] == step and meta["world_size"] == 2
        _assert_equal_full(ref, {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)})
        if run == "run":
            assert meta["trainer_state"] == {"samples_consumed": 8}
            # FSDP2 on CPU matches a plain run of the same steps closely (not bitwise)
            for name, value in model.state_dict().items():
                torch.testing.assert_close(value, plain.state_dict()[name], rtol=1e-5, atol=1e-6)
