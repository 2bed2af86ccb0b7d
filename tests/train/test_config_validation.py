"""Bad configs are rejected before anything is allocated, naming the key and the fix."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from moe.config import ConfigError
from tests.train.runner import run_train
from train.cli import CONFIG_DIR, to_typed
from train.run_dir import run_name
from train.validate import validate_train_config


def typed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_typed(compose("train", overrides=list(overrides)))


def test_defaults_validate():
    validate_train_config(typed(), world_size=1)


@pytest.mark.parametrize("overrides,world,message", [
    (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], 1, "trainer.global_batch_size=10 must be divisible"),
    (["trainer.global_batch_size=6"], 4, "data-parallel ranks (4)"),
    (["trainer.seq_len=1024"], 1, "trainer.seq_len=1024 exceeds model.max_seq_len=512"),
    (["optim.lr=0"], 1, "optim.lr=0.0 must be > 0"),
    (["optim.schedule=exp"], 1, "optim.schedule='exp' must be one of"),
    (["trainer.max_steps=0"], 1, "trainer.max_steps=0 must be >= 1"),
    (["trainer.precision=fp16"], 1, "trainer.precision='fp16' must be one of"),
    (["checkpoint.keep_last=0"], 1, "checkpoint.keep_last=0 must be >= 1"),
    (["checkpoint.async_mode=always"], 1, "checkpoint.async_mode='always'"),
    (["parallel.dp_replicate=2", "parallel.dp_shard=2"], 2, "must equal the world size (2)"),
    (["parallel.ep=3"], 1, "parallel.ep=3 must divide parallel.dp_shard=1"),
    (["model.attention.n_kv_heads=3"], 1, "model.attention.n_kv_heads=3 must divide"),
    (["model.moe.top_k=9"], 1, "model.moe.top_k=9"),
    (["model.moe.n_groups=3"], 1, "model.moe.n_groups=3 must divide model.moe.n_experts=8"),
    (["optim.min_lr_ratio=1.5"], 1, "optim.min_lr_ratio=1.5"),
    (["trainer.grad_clip=-1"], 1, "trainer.grad_clip=-1.0"),
    (["cost.budget_usd=-5"], 1, "cost.budget_usd"),
    (["data=shards", "data.path="], 1, "data.path"),
    (["optim.fused=maybe"], 1, "optim.fused='maybe' must be auto, true or false"),
    (["optim.master_weights=maybe"], 1, "optim.master_weights='maybe' must be auto, true or false"),
])
def test_bad_values_name_the_key(overrides, world, message):
    cfg = typed(*overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(cfg, world_size=world)


@pytest.mark.parametrize("key", ["optim.fused", "optim.master_weights"])
@pytest.mark.parametrize("value, expect", [("true", "true"), ("false", "false"), ("auto", "auto")])
def test_switch_keys_take_true_and_false_from_the_command_line(key, value, expect):
    """Hydra hands ``key=true`` to a string-typed key as "True": it is accepted and means true."""
    from train.config import switch

    cfg = typed(f"{key}={value}")
    validate_train_config(cfg, world_size=1)
    section, name = key.split(".")
    assert switch(getattr(getattr(cfg, section), name)) == expect


def test_unknown_keys_and_wrong_types_are_rejected_by_hydra():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        typed("trainer.max_stepz=3")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        typed("trainer.max_steps=many")


def test_command_line_error_is_clean_and_fails_before_training(tmp_path):
    p = run_train("optim.lr=-1", f"output_dir={tmp_path}", check=False)
    assert p.returncode == 2
    assert "config error: optim.lr=-1.0 must be > 0" in p.stderr
    assert "Traceback" not in p.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


def _fp8_capable() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def test_fp8_on_a_machine_without_fp8_fails_at_validation_with_exit_2(tmp_path):
    """trainer.precision=fp8 on a CPU (or a GPU below SM89): exit 2 before anything is created,
    naming the key and the requirement."""
    if _fp8_capable():
        pytest.skip("this machine has an fp8 GPU: the refusal is for CPUs and GPUs below SM89")
    p = run_train("trainer.precision=fp8", "trainer.compile=true", f"output_dir={tmp_path}", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config error: trainer.precision=fp8 needs a CUDA GPU with compute capability >= 8.9" in p.stderr
    assert "Traceback" not in p.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides,message", [
    (["trainer.fp8.recipe=blockwise"], "trainer.fp8.recipe='blockwise' must be one of ('tensorwise', 'rowwise')"),
    (["trainer.compile=false"], "trainer.precision=fp8 needs trainer.compile=true"),
])
def test_fp8_keys_are_validated(overrides, message):
    cfg = typed("trainer.precision=fp8", "trainer.compile=true", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(cfg, world_size=1)


def test_run_name_is_stable_and_ignores_how_long_and_how_often():
    a = typed()
    b = typed("trainer.max_steps=999", "trainer.log_every=3", "logging.wandb=true")
    c = typed("optim.lr=1e-4")
    assert run_name(a) == run_name(b)
    assert run_name(a) != run_name(c)
    assert run_name(typed("run_name=mine")) == "mine"


def test_every_user_facing_key_of_the_design_exists():
    cfg = OmegaConf.structured(typed())
    for key in ["run_name", "output_dir", "trainer.max_steps", "trainer.seed", "trainer.log_every",
                "trainer.eval_every", "trainer.global_batch_size", "trainer.seq_len", "trainer.compile",
                "checkpoint.root", "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume",
                "checkpoint.async_mode", "parallel.dp_shard", "parallel.dp_replicate", "parallel.ep",
                "cost.budget_usd", "cost.price_per_hour", "health.imds_endpoint",
                "health.preemption_deadline_s", "logging.wandb", "logging.tensorboard"]:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key == "run_name", key


def test_run_dir_from_a_launcher_holds_the_checkpoints_too(tmp_path, monkeypatch):
    import os

    from train.run_dir import run_dir

    monkeypatch.setenv("RUN_DIR", str(tmp_path / "job42"))
    cfg = typed()
    assert run_dir(cfg) == str(tmp_path / "job42")
    assert run_name(cfg) == "job42"
    # The trainer's checkpoint base is the run directory's parent: <base>/<run_name> == RUN_DIR.
    assert os.path.join(os.path.dirname(run_dir(cfg)), run_name(cfg)) == run_dir(cfg)
