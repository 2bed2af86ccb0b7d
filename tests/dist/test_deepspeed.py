"""``parallel.engine=deepspeed``: real 2-process gloo runs of `python -m train` under torchrun (CPU,
DeepSpeed's CPU accelerator), the tiny model on the embedded corpus, 8 steps of global batch 8 in
micro-batches of 2 (so DeepSpeed accumulates 2 micro-batches per rank and step).

1. ZeRO-2 against FSDP2 at the same config: the loss, validation-loss and gradient-norm sequences
   agree within fp32 noise (measured: |d loss| <= 5e-7, validation losses equal, grad norms within
   4e-6 relative; asserted 1e-5, 1e-5 and 1e-4 relative). Retention keeps the last 2 commits;
   ``python -m checkpointing verify`` passes.
2. SIGKILL of the whole torchrun tree after a commit, then resume: the run continues from the
   committed step with the same data cursor, and the losses and final weights equal the
   uninterrupted ZeRO-2 run bitwise (gloo on CPU is deterministic at a fixed world size).
3. ZeRO-3 with optimizer and parameter offload to CPU and activation checkpointing: runs, evaluates,
   commits per-rank model states, and matches FSDP2 within the same tolerances (measured: losses
   within 1e-6, grad norms within 2e-5 relative).
4. Bad configs name the key and the fix (no DeepSpeed needed for these).

The multi-process tests skip, saying so, where DeepSpeed is not installed (it is in the `test`
extra: a pure-Python install).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import signal

import pytest

from checkpointing.cli import main as checkpointing_cli
from moe.config import ConfigError
from tests.dist.train_launch import (FAST, REPO, Launch, committed_steps, losses, metric_rows, run_ok, step_dir,
                                     torchrun_cmd, trainer_state, wait_until)
from tests.train.runner import run_train
from train.validate import validate_train_config

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")

MAX_STEPS = 8
COMMON = [*FAST, "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.eval_every=4",
          "trainer.eval_batches=1", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_steps=2",
          "checkpoint.keep_last=2"]
ZERO2 = [*COMMON, "parallel=deepspeed"]  # configs/parallel/deepspeed.yaml: zero_stage 2
ZERO3_OFFLOAD = [*COMMON, "parallel=deepspeed", "parallel.deepspeed.zero_stage=3",
                 "parallel.deepspeed.offload_optimizer=true", "parallel.deepspeed.offload_param=true",
                 "trainer.activation_checkpointing=true"]
FP32_TOL = 1e-5


def _model_states(run, step: int, stage: int = 2):
    import torch

    name = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(step_dir(run, step) / "deepspeed" / name, map_location="cpu", weights_only=False)["module"]


def _verify(run) -> None:
    assert checkpointing_cli(["verify", str(run)]) == 0


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The same 8 steps under FSDP2 and under DeepSpeed ZeRO-2, both on 2 ranks."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: pip install -e '.[deepspeed]'")
    out = tmp_path_factory.mktemp("ds")
    run_ok(torchrun_cmd(2, *COMMON, f"output_dir={out}", "run_name=fsdp"), out / "fsdp.out", timeout=120)
    log = run_ok(torchrun_cmd(2, *ZERO2, f"output_dir={out}", "run_name=z2"), out / "z2.out", timeout=120)
    return out / "fsdp", out / "z2", log


def _assert_close_to(a_run, b_run):
    a, b = metric_rows(a_run), metric_rows(b_run)
    assert sorted(a) == sorted(b) == list(range(1, MAX_STEPS + 1))
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=FP32_TOL), (s, a[s]["loss"], b[s]["loss"])
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4), s
    for s in (4, 8):
        assert b[s]["val_loss"] == pytest.approx(a[s]["val_loss"], abs=FP32_TOL), s


@needs_deepspeed
def test_zero2_matches_fsdp2(ref):
    fsdp, z2, log = ref
    assert "ZeRO stage 2, fp32, accumulation 2 x micro batch 2" in log
    assert re.search(r"^step=8 loss=\S+ lr=\S+ tok/s=", log, re.M), log[-3000:]  # our metrics line
    _assert_close_to(fsdp, z2)
    assert committed_steps(z2) == [6, 8]  # checkpoint.keep_last=2
    meta = json.loads((step_dir(z2, 8) / "meta.json").read_text())
    assert meta["engine"]["format"] == "deepspeed" and meta["engine"]["zero_stage"] == 2
    assert {"deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(meta["engine"]["files"])
    assert trainer_state(step_dir(z2, 8))["samples_consumed"] == MAX_STEPS * 8
    _verify(z2)


@needs_deepspeed
def test_zero2_sigkill_and_resume_matches_uninterrupted(ref, tmp_path):
    _, z2, _ = ref
    args = [*ZERO2, f"output_dir={tmp_path}", "run_name=k"]
    run = tmp_path / "k"
    # Rank 0 sleeps 0.3 s a step (fault injection, not part of the maths) so the kill lands mid-run.
    launch = Launch(torchrun_cmd(2, *args, "health.fault_inject_slow_s=0.3"), tmp_path / "first.out")
    wait_until(lambda: (step_dir(run, 4) / "COMMITTED").exists(), 90, "the step-4 commit", launch)
    launch.signal(signal.SIGKILL, tree=True)  # torchrun and both workers, no chance to save
    assert launch.wait(30) == -signal.SIGKILL, launch.tail()
    killed_at = max(committed_steps(run))
    assert killed_at < MAX_STEPS, "the run finished before it could be killed"
    out = run_ok(torchrun_cmd(2, *args), tmp_path / "resume.out", timeout=120)
    assert (f"resumed from step {killed_at} ({killed_at * 8} samples consumed, saved at world size 2, now 2)"
            in out), out[-3000:]
    a, b = losses(z2), losses(run)
    assert sorted(b) == list(range(1, MAX_STEPS + 1))
    assert [b[s] for s in a] == [a[s] for s in a]  # bitwise
    wa, wb = _model_states(z2, MAX_STEPS), _model_states(run, MAX_STEPS)
    assert wa.keys() == wb.keys() and len(wa) > 10
    assert all(wa[k].equal(wb[k]) for k in wa)
    assert trainer_state(step_dir(run, MAX_STEPS))["samples_consumed"] == MAX_STEPS * 8
    assert committed_steps(run) == [6, 8]
    _verify(run)


@needs_deepspeed
def test_zero3_with_offload_runs_and_matches_fsdp2(ref, tmp_path):
    fsdp, _, _ = ref
    out = run_ok(torchrun_cmd(2, *ZERO3_OFFLOAD, f"output_dir={tmp_path}", "run_name=z3"), tmp_path / "z3.out",
                 timeout=120)
    assert "ZeRO stage 3, optimizer offloaded to CPU, parameters offloaded to CPU, fp32" in out
    run = tmp_path / "z3"
    _assert_close_to(fsdp, run)
    files = json.loads((step_dir(run, 8) / "meta.json").read_text())["engine"]["files"]
    assert {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= set(files)
    _verify(run)


# ------------------------------------------------------------------------------ configuration
def typed(*overrides: str):
    from hydra import compose, initialize_config_dir

    from train.cli import CONFIG_DIR, to_typed

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_typed(compose("train", overrides=list(overrides)))


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.engine=megatron"], 1, "parallel.engine='megatron' must be one of ('fsdp2', 'deepspeed')"),
    (["parallel=deepspeed", "parallel.ep=2"], 2,
     "parallel.ep=2 is not supported with parallel.engine=deepspeed: ZeRO shards the experts like every other "
     "parameter (no expert parallelism); set parallel.ep=1"),
    (["parallel=deepspeed", "parallel.deepspeed.zero_stage=4"], 1, "parallel.deepspeed.zero_stage=4 must be one of"),
    (["parallel=deepspeed", "parallel.deepspeed.offload_param=true"], 1,
     "parallel.deepspeed.offload_param=true needs parallel.deepspeed.zero_stage=3"),
    (["parallel=deepspeed", "parallel.dp_replicate=2", "parallel.dp_shard=1"], 2,
     "set parallel.dp_replicate=1 and parallel.dp_shard=-1"),
    (["parallel=deepspeed", "checkpoint.async_mode=thread"], 1, "set checkpoint.async_mode=off"),
    (["parallel=deepspeed", "checkpoint.root=s3://bucket/ckpt"], 1, "checkpoint.root=s3://bucket/ckpt is not a local"),
    (["parallel=deepspeed", "checkpoint.upload_root=s3://bucket/ckpt"], 1, "set checkpoint.upload_root=''"),
    (["parallel=deepspeed", "trainer.compile=true"], 1, "set trainer.compile=false"),
    (["parallel=deepspeed", "trainer.device=xla"], 1, "parallel.engine=fsdp2"),  # devices/neuron_env.py says it first
    (["parallel=deepspeed", "+parallel.deepspeed.extra.gradient_clipping=0.5"], 1,
     "parallel.deepspeed.extra sets gradient_clipping, which moeforge sets from trainer.grad_clip"),
    (["parallel=deepspeed", "+parallel.deepspeed.extra.zero_optimization={stage: 3}"], 1,
     "parallel.deepspeed.extra sets zero_optimization.stage, which moeforge sets from parallel.deepspeed.zero_stage"),
])
def test_bad_deepspeed_configs_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(typed(*overrides), world_size=world)


def test_deepspeed_accelerators_only():
    from parallelism.deepspeed_engine import deepspeed_errors

    cfg = typed("parallel=deepspeed")
    errors = deepspeed_errors(cfg.parallel.deepspeed, engine="deepspeed", world_size=1, dp_replicate=1,
                              dp_shard=-1, ep=1, compile=False, async_mode="off", checkpoint_root="",
                              upload_root="", device="neuron")
    assert errors == ["trainer.device=neuron is not supported with parallel.engine=deepspeed (its CPU and CUDA "
                      "accelerators only): set trainer.device=cuda or cpu, or use parallel.engine=fsdp2"]


def test_deepspeed_config_is_built_from_ours():
    from parallelism.deepspeed_engine import deepspeed_config

    cfg = typed("parallel=deepspeed", "parallel.deepspeed.zero_stage=3", "parallel.deepspeed.offload_optimizer=true",
                "+parallel.deepspeed.extra.zero_optimization={stage3_max_live_parameters: 1000}")
    ds = deepspeed_config(cfg.parallel.deepspeed, global_batch_size=32, micro_batch_size=2, grad_accum=4,
                          grad_clip=1.0, bf16=True)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (32, 2, 4)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"] == {"device": "cpu"} and "offload_param" not in z
    assert z["stage3_max_live_parameters"] == 1000  # extra merges into our sections
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: AdamW, LR set every step


def test_missing_deepspeed_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("pip install -e '.[deepspeed]'")):
        validate_train_config(typed("parallel=deepspeed"), world_size=1)


def test_command_line_rejects_ep_with_deepspeed(tmp_path):
    p = run_train("parallel=deepspeed", "parallel.ep=2", f"output_dir={tmp_path}", check=False)
    assert p.returncode == 2
    assert "config error: parallel.ep=2 is not supported with parallel.engine=deepspeed" in p.stderr
    assert "Traceback" not in p.stderr and not any(tmp_path.iterdir())


def _doc_section() -> str:
    text = (REPO / "docs" / "backends.md").read_text()
    m = re.search(r"^## DeepSpeed.*?(?=^## )", text, re.S | re.M)
    assert m, "docs/backends.md has no DeepSpeed section"
    return m.group(0)


@needs_deepspeed  # validation checks DeepSpeed is importable
def test_docs_commands_validate():
    """The DeepSpeed section's commands: the install names our extra; each torchrun command composes
    and validates at its world size (tests/test_docs.py's rule for multi-process commands)."""
    from tests.test_docs import _world_and_overrides

    cmds = [" ".join(c.split()) for block in re.findall(r"```bash\n(.*?)```", _doc_section(), re.S)
            for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert cmds
    extras = (REPO / "pyproject.toml").read_text()
    for cmd in cmds:
        args = shlex.split(cmd)
        if args[:2] == ["pip", "install"]:
            extra = re.search(r"\[(\w+)\]", cmd).group(1)
            assert re.search(rf"^{extra} = \[", extras, re.M), cmd
            continue
        assert args[0] == "torchrun", cmd
        world, overrides = _world_and_overrides(args)
        cfg = typed(*overrides)
        assert cfg.parallel.engine == "deepspeed", cmd
        validate_train_config(cfg, world_size=world)


def test_core_never_imports_deepspeed():
    """Only parallel.engine=deepspeed imports it: the trainer, the validation, the checkpointing and
    the engine shim itself import nothing of DeepSpeed's until ``initialize``."""
    import subprocess
    import sys

    from tests.train.runner import env

    code = ("import sys, train.main, train.trainer, train.validate, train.deepspeed_step, checkpointing.cli, "
            "parallelism.deepspeed_engine; print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
