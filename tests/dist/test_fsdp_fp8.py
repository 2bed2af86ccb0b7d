"""FSDP2 with fp8 linears on two real gloo ranks (torchao's emulation: fp8 casts, matmuls in high
precision): the converted weights are all-gathered in fp8 (torchao's float8 all-gather wrapper
under the DTensor shard), the kept ones stay plain, and a step gives the single-process loss and
gradients to fp8 accuracy."""

import pytest

from tests.dist.harness import run_ranks

pytest.importorskip("torchao", reason="fp8 is the optional extra 'fp8' (torchao), in the test extra")


def small_dense():
    from bench.common import preset

    return preset("llama_1b", vocab_size=512, d_model=128, n_layers=2, ffn_dim=2048,
                  attention={"n_heads": 4, "n_kv_heads": 1})


def step(world, rank):
    """Loss and the w1 gradient (full) after one forward/backward of this rank's half of the batch."""
    import torch
    from types import SimpleNamespace

    from model.fp8 import Fp8Config, convert_to_fp8
    from model.transformer import Transformer
    from parallelism.parallelize import parallelize
    from train.config import ParallelConfig

    with torch.device("meta"):
        model = Transformer(small_dense())
    report = convert_to_fp8(model, Fp8Config(recipe="tensorwise"), fsdp_float8_all_gather=world > 1, emulate=True)
    parallelize(model, ParallelConfig(), SimpleNamespace(world_size=world, rank=rank), "cpu")
    model.init_weights(0, device="cpu")
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    x = x[2 * rank: 2 * rank + 2] if world > 1 else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    return model, report, loss.detach()


def _rank(rank, world, ref_loss, ref_grad):
    import torch
    import torch.distributed as dist

    model, report, loss = step(world, rank)
    w1, wk = model.layers["0"].ffn.w1.weight, model.layers["0"].attention.wk.weight
    assert "layers.0.ffn.w1" in report.converted and "layers.0.attention.wk" in report.kept
    assert type(w1._local_tensor).__name__ == "WeightWithDynamicFloat8CastTensor"
    assert type(wk._local_tensor) is torch.Tensor
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    assert abs(loss.item() - ref_loss) < 1e-2 * ref_loss, (loss.item(), ref_loss)
    grad = w1.grad.full_tensor()
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), 0)
    assert cos > 0.98, cos


@pytest.mark.slow
def test_fsdp2_all_gathers_fp8_weights_and_matches_one_process():
    model, _, loss = step(1, 0)
    run_ranks(_rank, 2, loss.item(), model.layers["0"].ffn.w1.weight.grad)
