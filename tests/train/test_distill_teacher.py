"""train/distill/teacher.py: the teacher read from a Hugging Face directory is the exported model,
frozen, in the autocast dtype with the routing bias kept fp32; its config check names both vocab
sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from devices.runtime import Runtime
from moe.config import ConfigError
from tests.checkpointing.hf_helpers import batch, family_cfg, trained, write_run
from tests.dist.common import par

pytest.importorskip("safetensors", reason="export writes safetensors (test extra)")


def _export(tmp_path, family):
    from checkpointing.cli import main as cli_main

    model = trained(family_cfg(family), steps=2)
    out = str(tmp_path / "hf")
    assert cli_main(["export", write_run(tmp_path, model), "--out", out, "--dtype", "float32"]) == 0
    return model, out


def test_teacher_from_hf_dir_is_the_exported_model_frozen(tmp_path):
    from train.distill.teacher import build_teacher, teacher_model_config

    model, out = _export(tmp_path, "deepseek_v3")
    tcfg = teacher_model_config(out)
    cpu = Runtime(torch.device("cpu"), None)
    teacher = build_teacher(tcfg, out, par(), SimpleNamespace(world_size=1), cpu)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    tokens = batch(model.cfg, 3)
    with torch.no_grad():
        torch.testing.assert_close(teacher(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)
    bf16 = build_teacher(tcfg, out, par(), SimpleNamespace(world_size=1), Runtime(torch.device("cpu"), torch.bfloat16))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bias = bf16.layers["1"].ffn.router.expert_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, model.layers["1"].ffn.router.expert_bias)


def test_vocab_mismatch_names_both_sizes(tmp_path):
    from train.distill.teacher import check_teacher

    _, out = _export(tmp_path, "llama")
    cfg = SimpleNamespace(distill=SimpleNamespace(teacher=out), model=SimpleNamespace(vocab_size=512),
                          checkpoint=SimpleNamespace(storage_options={}))
    with pytest.raises(ConfigError, match=r"vocab_size=96 .*model.vocab_size=512"):
        check_teacher(cfg)
