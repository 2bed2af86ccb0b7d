"""`python -m train` end to end, in subprocesses, on the real tiny model and embedded corpus."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train.runner import FAST, REPO, env, last_per_step, read_jsonl, run_train, train_cmd
from train.metrics import parse_metric_line


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The newest committed checkpoint's tensors, read back through DCP."""
    from tests.dist.train_launch import checkpoint_tensors

    steps = sorted(p for p in run.glob("step_*") if (p / "COMMITTED").exists())
    assert steps, f"no committed checkpoint in {run}"
    return checkpoint_tensors(steps[-1])


def test_metric_lines_parse_and_every_field_present(tmp_path):
    p = run_train(*FAST, "trainer.max_steps=6", f"output_dir={tmp_path}", "run_name=m")
    lines = [l for l in p.stdout.splitlines() if "step=" in l and "loss=" in l]
    assert len(lines) == 6, p.stdout
    for line in lines:
        m = parse_metric_line(line)
        for key in ("step", "loss", "lr", "tok_s", "tok_s_gpu", "mfu", "mem_gib", "usd_per_mtok",
                    "spent_usd", "eta_s"):
            assert key in m, (key, line)
    assert "val_loss=" in lines[4]  # eval_every=5
    rows = read_jsonl(tmp_path / "m" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert any(k.startswith("moe/") for k in rows[-1])
    assert (tmp_path / "m" / "config.yaml").exists() and (tmp_path / "m" / "rank0.log").exists()
    assert "run directory" in p.stdout and str(tmp_path / "m") in p.stdout
    assert "optim.master_weights=auto: fp32 parameters" in p.stdout  # auto: off on a CPU (train/master_weights.py)


# Soak only: tests/test_readme.py::test_the_main_command_trains_the_default trains the same default
# model for 200 steps in the default suite and asserts the same two falls (loss and val_loss).
@pytest.mark.soak
def test_loss_falls_on_the_default_model(tmp_path):
    p = run_train("trainer.max_steps=60", "trainer.log_every=10", "trainer.eval_every=30",
                  "trainer.eval_batches=2", f"output_dir={tmp_path}", "run_name=f")
    rows = last_per_step(read_jsonl(tmp_path / "f" / "metrics.jsonl"))
    assert rows[60]["loss"] < rows[10]["loss"] - 1.0, rows
    assert rows[60]["val_loss"] < rows[30]["val_loss"]


KILL_RESUME = [*FAST, "trainer.max_steps=24", "checkpoint.every_steps=4", "checkpoint.keep_last=10"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run both async modes are compared with: saving (how, or whether in the
    background) never changes the maths, so one straight run serves both."""
    out = tmp_path_factory.mktemp("straight")
    run_train(*KILL_RESUME, "checkpoint.async_mode=off", f"output_dir={out}", "run_name=straight")
    return out / "straight"


@pytest.mark.parametrize("async_mode", ["off", "thread"])
def test_kill_and_resume_is_bitwise_identical(tmp_path, async_mode, straight):
    """N steps in one go vs killed (SIGKILL) mid-run and resumed: same losses, same weights."""
    common = [*KILL_RESUME, f"checkpoint.async_mode={async_mode}", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(train_cmd(*common, "run_name=killed"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "step_000000008" / "COMMITTED").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    p = run_train(*common, "run_name=killed")
    assert "resumed from step" in p.stdout
    a = last_per_step(read_jsonl(straight / "metrics.jsonl"))
    b = last_per_step(read_jsonl(run / "metrics.jsonl"))
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    wa, wb = _final_weights(straight), _final_weights(run)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_rerunning_a_finished_run_says_so(tmp_path):
    args = [*FAST, "trainer.max_steps=3", f"output_dir={tmp_path}"]
    run_train(*args)
    p = run_train(*args)
    assert "already complete at step 3" in p.stdout
    runs = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(runs) == 1  # the derived run name is stable: same command, same run


def test_unreadable_checkpoints_are_an_error_not_a_fresh_start(tmp_path):
    args = [*FAST, "trainer.max_steps=4", "checkpoint.every_steps=2", f"output_dir={tmp_path}", "run_name=c"]
    run_train(*args)
    for shard in (tmp_path / "c").glob("step_*/*.distcp"):
        shard.write_bytes(b"garbage")
    p = run_train(*args[:-1], "trainer.max_steps=6", "run_name=c", check=False)
    assert p.returncode != 0
    assert "step_000000004" in p.stdout + p.stderr


def test_wandb_offline_values_read_back(tmp_path):
    from tests.train.wandb_reader import read_history, wait_until_complete

    pytest.importorskip("wandb")
    run_train(*FAST, "trainer.max_steps=3", "logging.wandb=true", f"output_dir={tmp_path}", "run_name=w",
              WANDB_DIR=str(tmp_path / "wandb"))
    files = list((tmp_path).rglob("*.wandb"))
    assert files, "no .wandb file written"
    wait_until_complete(files[0])
    history = read_history(files[0])
    jsonl = last_per_step(read_jsonl(tmp_path / "w" / "metrics.jsonl"))
    logged = {int(h["step"]): h for h in history if "loss" in h}
    assert sorted(logged) == [1, 2, 3]
    for s in (1, 2, 3):
        assert logged[s]["loss"] == pytest.approx(jsonl[s]["loss"], rel=1e-6)


def test_multirun_gives_one_run_per_point(tmp_path):
    p = run_train("--multirun", *FAST, "trainer.max_steps=2", "optim.lr=1e-3,2e-3", f"output_dir={tmp_path}")
    runs = sorted(d.name for d in tmp_path.iterdir() if d.is_dir() and d.name.startswith("tiny-"))
    assert len(runs) == 2, (runs, p.stdout)


def test_cfg_job_prints_the_resolved_config():
    p = run_train("--cfg", "job", "model=dsv3_mini")
    assert "kv_lora_rank: 512" in p.stdout and "n_experts: 64" in p.stdout
