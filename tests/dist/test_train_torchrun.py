"""`python -m train` under torchrun, end to end on the tiny model and the embedded corpus (CPU, gloo).

1. dp x ep = 2 x 2 (4 ranks, parallel.ep=2): SIGKILL of the whole torchrun process group after a
   commit, then resume: the loss sequence and the final weights equal the uninterrupted 4-rank run
   bitwise (measured: gloo on CPU is deterministic at a fixed world size).
2. A checkpoint saved on 4 ranks resumes on 2 ranks and on 1 process: the data cursor is exact
   (samples_consumed, step) and the next losses match the 4-rank run within fp32 noise (measured
   differences ~1e-6; asserted 1e-5).
3. FSDP2 on 2 ranks vs one process: the same loss and validation-loss sequences within fp32
   tolerance (the evaluation set is split over ranks and the means averaged).
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

from tests.dist.train_launch import (FAST, Launch, checkpoint_tensors, committed_steps, losses, metric_rows, run_ok,
                                     step_dir, torchrun_cmd, train_cmd, trainer_state, wait_until)

MAX_STEPS = 16
COMMON = [*FAST, "trainer.eval_every=0", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_steps=4",
          "checkpoint.keep_last=10"]
EP4 = [*COMMON, "parallel.ep=2"]  # 4 ranks: dp_shard=4 (dp_shard=-1), ep=2 -> efsdp=2
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def ref4(tmp_path_factory):
    """The uninterrupted 4-rank dp x ep run (shared by tests 1 and 2)."""
    out = tmp_path_factory.mktemp("ref4")
    run_ok(torchrun_cmd(4, *EP4, f"output_dir={out}", "run_name=ref"), out / "ref.out", timeout=150)
    run = out / "ref"
    assert committed_steps(run) == [4, 8, 12, 16]
    return run


def _final(run):
    return checkpoint_tensors(step_dir(run, committed_steps(run)[-1]))


def test_ep2x2_sigkill_and_resume_matches_uninterrupted(ref4, tmp_path):
    args = [*EP4, f"output_dir={tmp_path}", "run_name=k"]
    run = tmp_path / "k"
    # Rank 0 sleeps 0.15 s a step (fault injection; not part of the run's identity or its maths) so
    # the kill lands mid-run, well before step 16.
    launch = Launch(torchrun_cmd(4, *args, "health.fault_inject_slow_s=0.15"), tmp_path / "first.out")
    wait_until(lambda: (step_dir(run, 4) / "COMMITTED").exists(), 90, "the step-4 commit", launch)
    launch.signal(signal.SIGKILL, tree=True)  # torchrun and every worker, no chance to save
    rc = launch.wait(30)
    assert rc == -signal.SIGKILL, launch.tail()
    assert MAX_STEPS not in committed_steps(run), "the run finished before it could be killed"
    logged = max(losses(run), default=0)
    time.sleep(1.0)
    assert max(losses(run), default=0) == logged, "a worker outlived the kill and kept training"
    killed_at = max(committed_steps(run))
    out = run_ok(torchrun_cmd(4, *args), tmp_path / "resume.out", timeout=150)
    assert f"resumed from step {killed_at} ({killed_at * 4} samples consumed, saved at world size 4, now 4)" in out

    a, b = losses(ref4), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, MAX_STEPS + 1))
    assert [b[s] for s in a] == [a[s] for s in a]  # bitwise: gloo on CPU is deterministic
    wa, wb = _final(ref4), _final(run)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert trainer_state(step_dir(run, MAX_STEPS))["samples_consumed"] == MAX_STEPS * 4


@pytest.mark.parametrize("nproc", [2, 1])
def test_saved_on_4_ranks_resumes_on_fewer(ref4, tmp_path, nproc):
    ckpt = step_dir(ref4, 8)
    args = [*COMMON, f"output_dir={tmp_path}", "run_name=w", f"checkpoint.resume={ckpt}"]
    cmd = torchrun_cmd(2, *args, "parallel.ep=2") if nproc == 2 else train_cmd(*args)
    out = run_ok(cmd, tmp_path / "resume.out", timeout=150)
    assert f"resumed from step 8 (32 samples consumed, saved at world size 4, now {nproc})" in out
    run = tmp_path / "w"
    got, ref = losses(run), losses(ref4)
    assert sorted(got) == list(range(9, MAX_STEPS + 1))  # the step continues: nothing replayed or skipped
    for s in got:
        assert got[s] == pytest.approx(ref[s], abs=FP32_TOL), (s, got[s], ref[s])
    for s in (12, 16):
        ts = trainer_state(step_dir(run, s))
        assert ts["step"] == s and ts["samples_consumed"] == s * 4 and ts["world_size"] == nproc
    wa, wb = _final(ref4), _final(run)
    for k in wa:
        if "exp_avg" in k or "step" in k.rsplit(".", 1)[-1]:
            continue
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same 8 steps (evaluated at 4 and 8) in one process and under FSDP2 on 2 ranks."""
    out = tmp_path_factory.mktemp("fsdp")
    args = [*FAST, "trainer.eval_every=4", "trainer.max_steps=8", "checkpoint.every_steps=0", f"output_dir={out}"]
    run_ok(train_cmd(*args, "run_name=one"), out / "one.out", timeout=90)
    run_ok(torchrun_cmd(2, *args, "run_name=two"), out / "two.out", timeout=120)
    return out / "one", out / "two"


def test_fsdp2_two_ranks_matches_one_process(one_and_two):
    a, b = (losses(r) for r in one_and_two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=FP32_TOL), (s, a[s], b[s])


def test_val_loss_does_not_depend_on_world_size(one_and_two):
    a, b = (metric_rows(r) for r in one_and_two)
    for s in (4, 8):
        assert b[s]["val_loss"] == pytest.approx(a[s]["val_loss"], abs=FP32_TOL), (s, a[s]["val_loss"],
                                                                                   b[s]["val_loss"])
