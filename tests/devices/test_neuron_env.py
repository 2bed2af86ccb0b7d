"""trainer.device=neuron|xla without torch_xla: the environment plan (devices/neuron_env.py), the
config rules, the per-NeuronCore peak, where the step cuts XLA graphs, and that the core never
imports torch_xla for cpu/cuda. tests/xla/ runs the device itself where torch_xla is installed."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError
from devices.config import NeuronConfig
from train.config import TrainConfig
from devices.neuron_env import (apply_xla_env, compile_cache_url, extracting_graphs, precompile_overrides,
                              recommended_xla_env, shell_exports, xla_config_errors)

REPO = Path(__file__).resolve().parents[2]


def _env(settings):
    return {s.key: s.value for s in settings}


def test_neuron_plan_defaults(tmp_path):
    env = _env(recommended_xla_env("neuron", NeuronConfig(), str(tmp_path / "run"), local_rank=3))
    assert env == {
        "PJRT_DEVICE": "NEURON",
        "NEURON_CC_FLAGS": "--model-type=transformer --auto-cast=none",
        "NEURON_COMPILE_CACHE_URL": str(tmp_path / "run" / "neuron-compile-cache"),
        "NEURON_RT_VISIBLE_CORES": "3",
    }
    # the launcher's exports leave out the per-process core
    assert "NEURON_RT_VISIBLE_CORES" not in _env(recommended_xla_env("neuron", NeuronConfig(), "r", local_rank=None))
    for device in ("cpu", "cuda", "auto", "xla"):  # xla: PJRT_DEVICE is the user's choice
        assert recommended_xla_env(device, NeuronConfig(), "r") == []


def test_cache_and_flags_from_config(tmp_path):
    n = NeuronConfig(compile_cache="s3://bucket/neuron-cache", cc_flags="--auto-cast=matmult -O2")
    env = _env(recommended_xla_env("neuron", n, "run"))
    assert env["NEURON_COMPILE_CACHE_URL"] == "s3://bucket/neuron-cache"
    # a flag of ours that the user sets is theirs alone; the others stay
    assert env["NEURON_CC_FLAGS"] == "--model-type=transformer --auto-cast=matmult -O2"
    rel = NeuronConfig(compile_cache="cache")
    assert compile_cache_url(rel, "run") == os.path.abspath("cache")


def test_apply_keeps_what_is_set_and_says_why():
    settings = recommended_xla_env("neuron", NeuronConfig(), "/runs/a", local_rank=0)
    env = {"NEURON_CC_FLAGS": "-O1 --cache_dir=/var/tmp/mine", "NEURON_RT_VISIBLE_CORES": "5"}
    rep = apply_xla_env(settings, env)
    assert env["NEURON_CC_FLAGS"] == "-O1 --cache_dir=/var/tmp/mine" and env["NEURON_RT_VISIBLE_CORES"] == "5"
    assert env["NEURON_COMPILE_CACHE_URL"] == "/runs/a/neuron-compile-cache" and env["PJRT_DEVICE"] == "NEURON"
    assert set(rep["kept"]) == {"NEURON_CC_FLAGS", "NEURON_RT_VISIBLE_CORES"}
    assert {s.key for s in rep["set"]} == {"NEURON_COMPILE_CACHE_URL", "PJRT_DEVICE"}
    notes = " ".join(rep["notes"])
    assert "--cache_dir" in notes and "--auto-cast" in notes
    assert apply_xla_env([], {}) == {"set": [], "kept": {}, "notes": []}


def test_shell_exports_keep_the_jobs_environment(tmp_path):
    settings = recommended_xla_env("neuron", NeuronConfig(cc_flags="--verbose=info"), str(tmp_path / "r y"),
                                   local_rank=None)
    script = shell_exports(settings) + '\nprintf "%s|%s|%s" "$PJRT_DEVICE" "$NEURON_CC_FLAGS" "$NEURON_COMPILE_CACHE_URL"\n'
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NEURON", "PJRT"))}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=clean, check=True).stdout
    assert out == (f"NEURON|--model-type=transformer --auto-cast=none --verbose=info|"
                   f"{tmp_path / 'r y' / 'neuron-compile-cache'}")
    mine = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                          env={**clean, "NEURON_CC_FLAGS": "-O1", "PJRT_DEVICE": "CPU"}).stdout
    assert mine.startswith("CPU|-O1|")


def test_extraction_mode_and_precompile_overrides():
    assert not extracting_graphs({}) and not extracting_graphs({"NEURON_EXTRACT_GRAPHS_ONLY": "0"})
    assert extracting_graphs({"NEURON_EXTRACT_GRAPHS_ONLY": "1"})
    ov = precompile_overrides(7, "/c", "/runs/a")
    assert "trainer.max_steps=7" in ov and "checkpoint.resume=none" in ov and "checkpoint.save_final=false" in ov
    assert "checkpoint.every_steps=0" in ov and "neuron.compile_cache=/c" in ov


def _cfg(**sections) -> TrainConfig:
    cfg = TrainConfig()
    for name, values in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **values))
    return cfg


@pytest.mark.parametrize("device", ["neuron", "xla"])
def test_validation_accepts_one_process(device):
    from train.validate import validate_train_config

    validate_train_config(_cfg(trainer={"device": device}), world_size=1)


@pytest.mark.parametrize("sections, world, needle", [
    ({}, 2, "world size 2"),
    ({"trainer": {"compile": True}}, 1, "trainer.compile=false"),
    ({"checkpoint": {"async_mode": "thread"}}, 1, "checkpoint.async_mode=off"),
    ({"neuron": {"precompile_steps": -1}}, 1, "neuron.precompile_steps"),
    ({"neuron": {"cc_flags": "--cache_dir=/x"}}, 1, "neuron.compile_cache"),
    ({"parallel": {"engine": "deepspeed"}}, 1, "parallel.engine=fsdp2"),
])
def test_validation_refuses_what_xla_cannot_do(sections, world, needle):
    from train.validate import validate_train_config

    sections = {k: dict(v) for k, v in sections.items()}
    sections.setdefault("trainer", {})["device"] = "neuron"
    cfg = _cfg(**sections)
    errors = xla_config_errors(cfg, world)
    assert any(needle in e for e in errors), errors
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_train_config(cfg, world_size=world)
    sections["trainer"]["device"] = "cpu"  # the same keys are fine off XLA (or fail for other reasons)
    assert xla_config_errors(_cfg(**sections), world) == []


def test_model_keys_xla_cannot_run():
    cfg = _cfg(trainer={"device": "xla"})
    cfg.model = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, n_experts=8, experts_impl="grouped_mm"),
                                    attention=dataclasses.replace(cfg.model.attention, backend="flex"))
    errors = " ".join(xla_config_errors(cfg, 1))
    assert "experts_impl=auto" in errors and "attention.backend=auto" in errors


def test_run_name_ignores_device_and_neuron_keys():
    from train.run_dir import config_hash

    base = config_hash(TrainConfig())
    assert config_hash(_cfg(trainer={"device": "neuron"}, neuron={"compile_cache": "s3://b/c", "cc_flags": "-O1",
                                                                   "precompile_steps": 3})) == base


def test_neuroncore_peaks():
    from devices.peaks import neuroncore_peak_flops, peak_flops

    assert neuroncore_peak_flops("Trainium1") == pytest.approx(95e12)  # 190 per chip, 2 cores
    assert neuroncore_peak_flops("trn2") == pytest.approx(667e12 / 8 * 2)  # default LNC=2
    assert neuroncore_peak_flops("Trainium2", lnc=1) == pytest.approx(667e12 / 8)
    assert neuroncore_peak_flops("H100-SXM") == 0.0 and neuroncore_peak_flops("cpu") == 0.0
    assert peak_flops("Trainium1") == pytest.approx(190e12)  # the per-chip table is unchanged


class _CountingXla:
    def __init__(self):
        self.syncs = 0

    def sync(self):
        self.syncs += 1


def _tiny_model():
    from model.config import ModelConfig
    from model.transformer import Transformer

    m = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, ffn_dim=32, max_seq_len=16))
    m.init_weights(0)
    return m


def test_step_cuts_xla_graphs_per_micro_batch_and_after_the_update():
    from devices.runtime import Runtime
    from train.optim import build_optimizer
    from train.config import OptimConfig
    from train.step import StepInputs, evaluate, train_step

    xla = _CountingXla()
    runtime = Runtime(torch.device("cpu"), None, xla)  # the sync points, with CPU tensors
    model = _tiny_model()
    opt = build_optimizer(model, OptimConfig(), "cpu")
    batches = [(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))) for _ in range(3)]
    result = train_step(model, opt, StepInputs(iter(batches), 3), runtime, 1.0, 0.0)
    assert result.verdict == "ok" and xla.syncs == 3 + 1  # each micro-batch, then the update
    xla.syncs = 0
    train_step(model, opt, StepInputs(iter(batches), 3, guard=lambda norm: "skip"), runtime, 1.0, 0.0)
    assert xla.syncs == 3 + 1  # a skipped update still closes the step's graph
    xla.syncs = 0
    evaluate(model, batches, runtime)
    assert xla.syncs == 3
    assert runtime.init_device == torch.device("cpu")
    assert Runtime(torch.device("cpu"), None).peak_flops("auto") is None  # non-XLA: from the device


def test_neuron_device_without_torch_xla_names_the_aws_repository():
    import importlib.util

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here: tests/xla covers the device")
    from devices.runtime import resolve_runtime

    with pytest.raises(RuntimeError, match="pip.repos.neuron.amazonaws.com"):
        resolve_runtime("neuron", "auto")
    with pytest.raises(RuntimeError, match="torch-xla"):
        resolve_runtime("xla", "auto")


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch_xla", "torch_neuronx"):
            raise ImportError("imported " + name)
sys.meta_path.insert(0, Block())
from train.cli import main
sys.argv = ["train"] + sys.argv[1:]
main()
"""


def test_a_cpu_run_never_imports_torch_xla(tmp_path):
    overrides = ["trainer.device=cpu", "trainer.max_steps=1", "trainer.seq_len=32", "trainer.global_batch_size=2",
                 "trainer.eval_every=0", "logging.progress=off", "checkpoint.save_final=false",
                 f"output_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RUN_DIR", None)
    p = subprocess.run([sys.executable, "-c", BLOCKER, *overrides], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "step=1 " in p.stdout
