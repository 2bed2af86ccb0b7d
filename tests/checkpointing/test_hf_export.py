"""Export of every architecture we train to the transformers class that expresses it: a model
trained a few steps, exported in fp32, loaded by transformers, logits within 1e-4 of ours."""

from __future__ import annotations

import json
import os

import pytest
import torch

from checkpointing.cli import main as cli_main
from checkpointing.hf.families import FAMILIES, for_model
from checkpointing.hf.mapping import ExportRefused
from tests.checkpointing.hf_helpers import FAMILY_NAMES, family_cfg, max_logit_diff, trained, write_run

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_matches_transformers(tmp_path, family):
    cfg = family_cfg(family)
    model = trained(cfg)
    assert for_model(cfg).model_type == family
    out = str(tmp_path / "hf")
    layout = "fused" if family == "qwen3_moe" else "per_expert"
    assert cli_main(["export", write_run(tmp_path, model), "--out", out, "--dtype", "float32",
                     "--experts-layout", layout]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [FAMILIES[family].hf_class]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(hf).__name__ == FAMILIES[family].hf_class
    # T=24 > window 8: the windowed layers really cut context.
    assert max_logit_diff(model, hf) <= 1e-4


def test_trained_bias_is_non_trivial():
    """The DeepSeek-V3 case exports a selection bias the steps moved (not the init's zeros)."""
    model = trained(family_cfg("deepseek_v3"))
    assert model.layers["1"].ffn.router.expert_bias.abs().max() > 0


@pytest.mark.parametrize("family,change,key", [
    ("gemma3_text", {"embed_scale": False}, "model.embed_scale"),
    ("gemma3_text", {"ffn_activation": "silu"}, "model.ffn_activation"),
    ("qwen3", {"attention.qk_norm_scope": "projection"}, "model.attention.qk_norm_scope"),
    ("llama", {"rope.local_theta": 500.0, "attention.window": 8, "attention.global_every": 2}, "model.rope.local_theta"),
    ("mistral", {"attention.bias": True}, "model.attention.bias"),
    ("qwen3_moe", {"moe.n_shared_experts": 1}, "model.moe.n_shared_experts"),
    ("qwen3_moe", {"moe.route_scale": 2.0}, "model.moe.route_scale"),
    ("deepseek_v3", {"norm_eps": 1e-5}, "model.norm_eps"),
    ("olmo2", {"attention.window": 8}, "sliding-window"),
])
def test_export_refuses_inexact(family, change, key):
    cfg = family_cfg(family)
    for path, value in change.items():
        obj = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    with pytest.raises(ExportRefused, match=key.replace(".", r"\.")):
        for_model(cfg)


def test_export_refuses_a_non_zero_selection_bias_for_qwen3_moe(tmp_path, capsys):
    cfg = family_cfg("qwen3_moe")
    cfg.moe.bias_update_rate = 0.01
    model = trained(cfg)
    assert cli_main(["export", write_run(tmp_path, model), "--out", str(tmp_path / "hf")]) == 1
    assert "expert_bias is non-zero" in capsys.readouterr().out


def test_export_refuses_mixed_attention_kinds(tmp_path):
    from bench.common import preset

    with pytest.raises(ExportRefused, match="mixes MLA and GQA"):
        for_model(preset("tiny"))
