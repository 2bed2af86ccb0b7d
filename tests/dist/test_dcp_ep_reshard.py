"""DCP across layouts: FSDP2 + EP on 4 ranks (dp_shard=4, ep=2) saves model + optimizer; 2 ranks
(dp_shard=2, ep=2) and one plain process load it and hold the same full state, and the 2-rank
load continues training exactly like the 4-rank run would."""

import pytest
import torch

from tests.dist.common import GLOBAL_BATCH, batch, build, build_parallel, full_params, optimizer, par, train_step
from tests.dist.harness import run_ranks

STEPS = 2


def _full_optim(model, opt):
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return copy.deepcopy(sd["state"])


def _train(model, meshes, opt, rank, world, steps, first=0):
    from parallelism.expert_parallel import make_count_reducer

    reducer = make_count_reducer(meshes.dp_group) if world > 1 else None
    per = GLOBAL_BATCH // world
    for s in range(first, first + steps):
        inputs, targets = batch(s)
        train_step(model, opt, inputs[rank * per:(rank + 1) * per], targets[rank * per:(rank + 1) * per],
                   reducer)


def _save_worker(rank, world, ckpt_dir, ref_file):
    import torch.distributed.checkpoint as dcp

    from checkpointing.state import AppState

    model, parallel = build_parallel(par(dp_shard=4, ep=2), world)
    opt = optimizer(model)
    _train(model, parallel.meshes, opt, rank, world, STEPS)
    dcp.save({"app": AppState(model, opt)}, checkpoint_id=ckpt_dir)
    ref = {"params": full_params(model), "optim": _full_optim(model, opt)}
    _train(model, parallel.meshes, opt, rank, world, 1, first=STEPS)  # the step after the checkpoint
    ref["next"] = full_params(model)
    if rank == 0:
        torch.save(ref, ref_file)


def _assert_state(model, opt, ref):
    got = full_params(model)
    assert got.keys() == ref["params"].keys()
    for n, t in ref["params"].items():
        assert torch.equal(got[n], t), n
    optim = _full_optim(model, opt)
    assert optim.keys() == ref["optim"].keys()
    for fqn, st in ref["optim"].items():
        for k, v in st.items():
            assert torch.equal(optim[fqn][k], v), (fqn, k)


def _load_worker(rank, world, ckpt_dir, ref_file):
    import torch.distributed.checkpoint as dcp

    from checkpointing.state import AppState

    ref = torch.load(ref_file, weights_only=False)
    model, parallel = build_parallel(par(dp_shard=2, ep=2), world, seed=99)  # other init: the load must overwrite all
    opt = optimizer(model)
    dcp.load({"app": AppState(model, opt)}, checkpoint_id=ckpt_dir)
    _assert_state(model, opt, ref)
    _train(model, parallel.meshes, opt, rank, world, 1, first=STEPS)
    got = full_params(model)
    for n, t in ref["next"].items():
        torch.testing.assert_close(got[n], t, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_dcp_fsdp_ep_4_to_2_and_1(tmp_path):
    import torch.distributed.checkpoint as dcp

    from checkpointing.state import AppState

    ckpt, ref_file = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    run_ranks(_save_worker, 4, ckpt, ref_file)
    run_ranks(_load_worker, 2, ckpt, ref_file)

    ref = torch.load(ref_file, weights_only=False)
    model = build(par(), 1, seed=99)  # plain single process, no process group
    opt = optimizer(model)
    dcp.load({"app": AppState(model, opt)}, checkpoint_id=ckpt)
    _assert_state(model, opt, ref)
