"""The distillation teacher sharded like the student: FSDP2 on 2 gloo ranks, reshard after forward.
Its head runs inside its forward (where FSDP2 has gathered the output weight), and each rank's KD
loss and gradient equal a single process's on the same micro-batch."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from tests.dist.common import par
from tests.dist.harness import run_ranks


def _teacher(sharded: bool, world: int = 1):
    from model.transformer import Transformer
    from parallelism.parallelize import parallelize
    from tests.checkpointing.hf_helpers import family_cfg

    with torch.device("meta"):
        t = Transformer(family_cfg("qwen3"))
    t.requires_grad_(False)
    if sharded:
        parallelize(t, par(dp_shard=world), SimpleNamespace(world_size=world), "cpu", reshard_after_forward=True)
    t.init_weights(7, device="cpu")
    return t.eval()


def _kd(teacher, tokens, logits):
    from train.distill.config import DistillConfig
    from train.distill.step import kd_term

    logits = logits.clone().requires_grad_()
    d = DistillConfig(teacher="x", temperature=2.0, top_k_logits=0, chunk_tokens=5)
    kd = kd_term(logits, teacher, tokens, d, contextlib.nullcontext)
    kd.backward()
    return kd.detach(), logits.grad


def _worker(rank, world, tokens, logits, ref):
    teacher = _teacher(True, world)
    w = teacher.output.weight
    assert w.to_local().shape[0] == w.shape[0] // world  # sharded before the forward
    kd, grad = _kd(teacher, tokens[rank:rank + 1], logits[rank:rank + 1])
    assert w.to_local().shape[0] == w.shape[0] // world  # and resharded after it
    torch.testing.assert_close(kd, ref[rank][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref[rank][1], rtol=1e-5, atol=1e-7)


def test_sharded_teacher_matches_one_process():
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(2, 12, 96, generator=torch.Generator().manual_seed(1))
    single = _teacher(False)
    ref = [_kd(single, tokens[r:r + 1], logits[r:r + 1]) for r in range(2)]
    run_ranks(_worker, 2, tokens, logits, ref)


def _ep_worker(rank, world, out):
    """A dense teacher for a student trained with parallel.ep=2: built with the student's parallel
    config, it is FSDP2-sharded over the same ranks (no expert parallelism for a dense model)."""
    from devices.runtime import Runtime
    from train.distill.teacher import build_teacher, teacher_model_config

    teacher = build_teacher(teacher_model_config(out), out, par(dp_shard=2, ep=2), SimpleNamespace(world_size=world),
                            Runtime(torch.device("cpu"), None))
    assert teacher.output.weight.to_local().shape[0] == teacher.output.weight.shape[0] // world


def test_dense_teacher_of_an_ep_student(tmp_path):
    from checkpointing.cli import main as cli_main
    from tests.checkpointing.hf_helpers import family_cfg, trained, write_run

    out = str(tmp_path / "hf")
    model = trained(family_cfg("llama"), steps=1)
    assert cli_main(["export", write_run(tmp_path, model), "--out", out, "--dtype", "float32"]) == 0
    run_ranks(_ep_worker, 2, out)
