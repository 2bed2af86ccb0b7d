"""``model.init_from`` into a sharded model: 2 gloo ranks, FSDP2 with EP=2. Each rank reads only the
rows its shards hold (counted), and the sharded model equals the exported one, weight for weight and
logit for logit."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from tests.dist.common import par
from tests.dist.harness import run_ranks

pytest.importorskip("safetensors", reason="export writes safetensors (test extra)")


def _worker(rank, world, cases):
    from checkpointing.hf import safetensors_io
    from checkpointing.hf.load import load_hf_weights, model_config_from_hf
    from model.transformer import Transformer
    from parallelism.parallelize import parallelize
    from tests.dist.common import full_params

    read = {"bytes": 0}
    original = safetensors_io.HFDir._read

    def counting(self, *args):  # the real reader (every read goes through it), with a byte count
        t = original(self, *args)
        read["bytes"] += t.numel() * t.element_size()
        return t

    safetensors_io.HFDir._read = counting
    for out, ref_path in cases:
        ref = torch.load(ref_path)
        cfg = model_config_from_hf(out)
        with torch.device("meta"):
            model = Transformer(cfg)
        parallelize(model, par(dp_shard=2, ep=2), SimpleNamespace(world_size=world), "cpu")
        model.init_weights(99, device="cpu")
        w1 = model.layers["1"].ffn.experts.w1
        assert w1.to_local().shape[0] == cfg.moe.n_experts // 2  # EP really split the experts
        read["bytes"] = 0
        load_hf_weights(model, out)
        total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
        assert read["bytes"] < 0.6 * total, f"rank {rank} read {read['bytes']} of {total} bytes"
        got = full_params(model)
        for k, t in ref["state"].items():
            torch.testing.assert_close(got[k], t, rtol=0, atol=0, msg=lambda m: f"{out} {k}: {m}")
        model.eval()
        with torch.no_grad():
            logits, _ = model(ref["tokens"])
        torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)


def test_import_into_fsdp2_ep2(tmp_path):
    from checkpointing.cli import main as cli_main
    from tests.checkpointing.hf_helpers import batch, family_cfg, trained, write_run

    cases = []
    for family, layout in (("deepseek_v3", "per_expert"), ("qwen3_moe", "fused")):
        d = tmp_path / family
        d.mkdir()
        model = trained(family_cfg(family), steps=2)
        out = str(d / "hf")
        assert cli_main(["export", write_run(d, model), "--out", out, "--dtype", "float32",
                         "--experts-layout", layout, "--max-shard-gb", "0.0001"]) == 0
        tokens = batch(model.cfg, 5)
        with torch.no_grad():
            logits, _ = model(tokens)
        torch.save({"state": model.state_dict(), "tokens": tokens, "logits": logits}, d / "ref.pt")
        cases.append((out, str(d / "ref.pt")))
    run_ranks(_worker, 2, cases)
