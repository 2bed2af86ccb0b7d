"""``model.init_from=<HF dir>`` through the trainer: the architecture from config.json when model= is
absent, each mismatching key named when it is given (exit 2), and an exported run continued by a
fresh run from the export with the same loss."""

from __future__ import annotations

import pytest

from tests.train.runner import FAST, read_jsonl, run_train

pytest.importorskip("safetensors", reason="export writes safetensors (test extra)")

# A llama_1b shrunk to CPU size: exports as LlamaForCausalLM.
SMALL = ["model=llama_1b", "model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.ffn_dim=128",
         "model.max_seq_len=128", "model.attention.n_heads=4", "model.attention.n_kv_heads=2"]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from train.cli import CONFIG_DIR, to_typed

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        dcfg = compose("train", overrides=overrides)
    return to_typed(dcfg), dcfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-step run of SMALL and its export (fp32): (run dir, export dir)."""
    from checkpointing.cli import main as cli_main

    tmp = tmp_path_factory.mktemp("init_from")
    run_train(*SMALL, *FAST, "trainer.max_steps=3", "checkpoint.every_steps=3", f"output_dir={tmp}", "run_name=a")
    out = str(tmp / "hf")
    assert cli_main(["export", str(tmp / "a"), "--out", out, "--dtype", "float32"]) == 0
    return tmp / "a", out


def test_model_config_comes_from_config_json(exported):
    from train.init_from import resolve_init_from

    _, out = exported
    overrides = [f"model.init_from={out}", "model.attention.backend=eager"]
    cfg, dcfg = _compose(overrides)
    cfg = resolve_init_from(cfg, dcfg, overrides)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.vocab_size, m.attention.n_kv_heads, m.moe.n_experts) == (64, 2, 256, 2, 0)
    assert m.attention.backend == "eager" and m.init_from == out  # a run-time knob from the command line


def test_mismatches_are_named(exported):
    from moe.config import ConfigError
    from train.init_from import resolve_init_from

    _, out = exported
    for overrides, keys in (
        ([f"model.init_from={out}", "model=llama_1b"], ["model.d_model=2048 (config.json: 64)", "model.n_layers=16",
                                                        "model.vocab_size=32768"]),
        ([f"model.init_from={out}", "model.n_layers=3"], ["model.n_layers=3 (config.json: 2)"]),
    ):
        cfg, dcfg = _compose(overrides)
        with pytest.raises(ConfigError) as e:
            resolve_init_from(cfg, dcfg, overrides)
        for key in keys:
            assert key in str(e.value)


def test_cli_exits_2_naming_the_keys(exported, tmp_path):
    _, out = exported
    p = run_train("model=tiny", f"model.init_from={out}", f"output_dir={tmp_path}", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model.attention.layer_kinds=['mla', 'gqa', 'mla', 'gqa'] (config.json: ['gqa', 'gqa'])" in p.stderr


def test_continues_with_the_same_loss(exported, tmp_path):
    """The run from the export, at a learning rate too small to move the weights, evaluates to the
    exported run's final validation loss."""
    run_a, out = exported
    a = [r for r in read_jsonl(run_a / "metrics.jsonl") if "val_loss" in r][-1]
    run_train(*FAST, f"model.init_from={out}", "optim.lr=1e-12", "trainer.max_steps=1", "trainer.eval_every=1",
              f"output_dir={tmp_path}", "run_name=b")
    b = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "val_loss" in r][-1]
    assert a["step"] == 3 and b["step"] == 1
    assert abs(b["val_loss"] - a["val_loss"]) < 1e-5, (a["val_loss"], b["val_loss"])
