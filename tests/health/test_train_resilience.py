"""Resilience drills through the real `python -m train` (tiny model, embedded corpus, CPU, gloo).

Spot notices from the loopback IMDSv2 server, SIGTERM/SIGUSR1 through torchrun, a hung rank, a
straggler, non-finite steps (skip, rollback, stop), a spent budget, and randomized kill/resume
trials that must end bitwise equal to the uninterrupted run. Exit codes are read as a launcher
reads them: torchrun reports 1, `python -m health exit-code` recovers the real code.

Random moments are drawn from a seeded generator; the seed is in every failure message
(MOEFORGE_FAULT_SEED reproduces a run).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.dist.train_launch import (FAST, Launch, checkpoint_tensors, committed_steps, exit_code, first_metric_logged,
                                     losses, metric_rows, run, step_dir, torchrun_cmd, train_cmd, trainer_state,
                                     wait_until)
from tests.health.imds_server import ImdsServer

SEED = int(os.environ.get("MOEFORGE_FAULT_SEED", str(time.time_ns() % 2**31)))
RNG = random.Random(SEED)

MAX_STEPS = 30
# Rank 0 sleeps 0.1 s per step (fault injection; not part of the run's identity or its maths) so a
# signal sent after the first metric line lands mid-run.
COMMON = [*FAST, "trainer.eval_every=0", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_steps=10",
          "checkpoint.keep_last=20", "health.fault_inject_slow_s=0.1"]
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _random_pause(hi: float = 0.6) -> float:
    d = RNG.uniform(0.0, hi)
    time.sleep(d)
    return d


def _stop_steps(run_dir: Path, nranks: int, code: int) -> list[int]:
    """The step each rank's log says it stopped at with ``code``."""
    out = []
    for r in range(nranks):
        text = (run_dir / f"rank{r}.log").read_text()
        m = re.findall(rf"stopping at step (\d+): .*\(exit {code}\)", text)
        assert m, f"rank {r} never logged a stop with exit {code} (seed {SEED}):\n{text[-3000:]}"
        out.append(int(m[-1]))
    return out


def _assert_preempted_and_commit(run_dir: Path, rc: int, nranks: int) -> int:
    code, why = exit_code(run_dir, rc)
    assert code == 75, (rc, code, why, SEED)
    steps = _stop_steps(run_dir, nranks, 75)
    assert len(set(steps)) == 1, f"ranks stopped at different steps {steps} (seed {SEED})"
    stop = steps[0]
    assert 0 < stop < MAX_STEPS, (stop, SEED)
    assert (step_dir(run_dir, stop) / "COMMITTED").exists(), (stop, committed_steps(run_dir))
    assert trainer_state(step_dir(run_dir, stop))["samples_consumed"] == stop * 4
    # every rank logged metrics up to the same step: the shared metric line stops there too
    assert max(metric_rows(run_dir)) == stop
    return stop


def _resume_to_completion(cmd: list[str], run_dir: Path, log: Path, stop: int) -> str:
    rc, out = run(cmd, log, timeout=150)
    assert rc == 0, out[-6000:]
    assert exit_code(run_dir, rc)[0] == 0
    assert f"resumed from step {stop}" in out
    assert max(committed_steps(run_dir)) == MAX_STEPS
    assert trainer_state(step_dir(run_dir, MAX_STEPS))["step"] == MAX_STEPS
    assert sorted(metric_rows(run_dir)) == list(range(1, MAX_STEPS + 1))
    return out


def _log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


# ---------------------------------------------------------------------------------------- spot notice
def test_spot_notice_two_ranks_stop_together_commit_exit_75_and_resume(tmp_path):
    deadline_s = 30.0
    args = [*COMMON, f"output_dir={tmp_path}", "run_name=spot", f"health.preemption_deadline_s={deadline_s}",
            "health.imds_interval_s=0.2"]
    run_dir = tmp_path / "spot"
    with ImdsServer(life_cycle="spot") as srv:
        cmd = torchrun_cmd(2, *args, f"health.imds_endpoint={srv.endpoint}")
        launch = Launch(cmd, tmp_path / "first.out")
        wait_until(lambda: first_metric_logged(run_dir), 90, "the first metrics line", launch)
        pause = _random_pause()
        srv.arm_spot_notice(in_s=120)
        t_arm = time.time()
        rc = launch.wait(90)
        assert srv.count("/latest/api/token", 200) >= 1  # the watcher really spoke IMDSv2
    assert rc != 0, launch.tail()  # torchrun reports 1 for a worker's 75
    stop = _assert_preempted_and_commit(run_dir, rc, 2)
    rank0 = (run_dir / "rank0.log").read_text()
    assert "spot interruption notice: terminate at" in rank0
    m = re.search(rf"^(.*) emergency checkpoint at step {stop} committed ([\d.]+) s after the notice", rank0, re.M)
    assert m, (pause, SEED, rank0[-3000:])
    took = float(m.group(2))
    assert took <= deadline_s, (took, SEED)
    # the logged interval is the watcher's: notice seen (<= one poll after arming) -> commit
    assert _log_time(m.group(1)) - t_arm <= deadline_s + 1
    # a second attempt, with nothing armed (a fresh server would say the same), resumes and finishes
    with ImdsServer(life_cycle="spot") as srv2:
        _resume_to_completion(torchrun_cmd(2, *args, f"health.imds_endpoint={srv2.endpoint}"), run_dir,
                              tmp_path / "resume.out", stop)


# ---------------------------------------------------------------------------------------- signals
# torchrun-SIGTERM is soak only: in the default suite tests/launch/test_local.py::
# test_local_restarts_after_75_and_completes sends SIGTERM to torchrun's agent (forwarded to both
# workers: exit 75, resume, completion), torchrun-SIGUSR1 below takes the same forwarding path with
# these assertions, and the spot-notice test above asserts two ranks stopping together at one commit.
@pytest.mark.parametrize("how", [pytest.param("torchrun-SIGTERM", marks=pytest.mark.soak), "torchrun-SIGUSR1",
                                 "single-SIGTERM"])
def test_signal_checkpoints_exits_75_and_resumes(tmp_path, how):
    launcher, signame = how.split("-")
    sig = getattr(signal, signame)
    args = [*COMMON, f"output_dir={tmp_path}", "run_name=sig"]
    run_dir = tmp_path / "sig"
    nranks = 2 if launcher == "torchrun" else 1

    def cmd():
        if launcher == "torchrun":
            return torchrun_cmd(2, *args, signals=TORCHRUN_SIGNALS if sig == signal.SIGUSR1 else None)
        return train_cmd(*args)

    launch = Launch(cmd(), tmp_path / "first.out")
    wait_until(lambda: first_metric_logged(run_dir), 90, "the first metrics line", launch)
    _random_pause()
    launch.signal(sig)  # to torchrun (which forwards it) or to the single process
    rc = launch.wait(90)
    if launcher == "single":
        assert rc == 75, launch.tail()
    else:
        assert rc != 0, launch.tail()
    stop = _assert_preempted_and_commit(run_dir, rc, nranks)
    assert f"received {signame}" in (run_dir / "rank0.log").read_text()
    _resume_to_completion(cmd(), run_dir, tmp_path / "resume.out", stop)


# ---------------------------------------------------------------------------------------- hang, straggler
def test_hung_rank_is_detected_dumped_and_exits_78(tmp_path):
    timeout_s = 5.0
    args = [*FAST, "trainer.eval_every=0", "trainer.max_steps=20", "checkpoint.every_steps=0",
            f"output_dir={tmp_path}", "run_name=hang", "health.fault_inject_hang_step=5",
            "health.fault_inject_rank=1", f"health.hang_timeout_s={timeout_s}"]
    run_dir = tmp_path / "hang"
    launch = Launch(torchrun_cmd(2, *args), tmp_path / "hang.out")
    rc = launch.wait(120)
    t_end = time.time()
    assert rc != 0, launch.tail()
    code, why = exit_code(run_dir, rc)
    assert code == 78, (rc, code, why)
    rank1 = (run_dir / "rank1.log").read_text()
    m = re.search(r"^(.*) WARNING .*fault injection: rank 1 hangs before step 5", rank1, re.M)
    assert m, rank1[-3000:]
    t_hang = _log_time(m.group(1))
    dumps = sorted((run_dir / "hang").glob("hang_rank*.txt"))
    assert run_dir / "hang" / "hang_rank1.txt" in dumps, dumps
    stack = (run_dir / "hang" / "hang_rank1.txt").read_text()
    assert "_inject_delay" in stack  # the dump names the frame the rank is stuck in
    assert (run_dir / "hang" / "flight_recorder_rank1.pkl").exists()
    assert "hang: no progress" in why
    # detected within the timeout plus the watchdog's poll and torchrun's teardown
    t_dump = (run_dir / "hang" / "hang_rank1.txt").stat().st_mtime
    assert timeout_s - 0.5 <= t_dump - t_hang <= timeout_s + 5, (t_dump - t_hang)
    assert t_end - t_hang <= timeout_s + 30


def test_straggler_is_named(tmp_path):
    args = [*FAST, "trainer.eval_every=0", "trainer.max_steps=12", "checkpoint.every_steps=0",
            f"output_dir={tmp_path}", "run_name=strag", "health.fault_inject_slow_s=0.3",
            "health.fault_inject_rank=1", "health.straggler_every=2", "health.straggler_min_slow=2",
            "health.straggler_windows=3"]
    rc, out = run(torchrun_cmd(2, *args), tmp_path / "strag.out", timeout=120)
    assert rc == 0, out[-4000:]
    text = (tmp_path / "strag" / "rank0.log").read_text()
    assert re.search(r"straggler: rank 1 on \S+ is [\d.]+x the median step time", text), text[-3000:]


# ---------------------------------------------------------------------------------------- NaN guard
NAN = [*FAST, "trainer.eval_every=0", "trainer.max_steps=14", "checkpoint.every_steps=4", "checkpoint.keep_last=20"]


def _all_checkpoints_finite(run_dir: Path) -> int:
    steps = committed_steps(run_dir)
    for s in steps:
        for k, t in checkpoint_tensors(step_dir(run_dir, s)).items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), (s, k)
    return len(steps)


def test_nan_steps_are_skipped_and_training_finishes(tmp_path):
    rc, out = run(train_cmd(*NAN, f"output_dir={tmp_path}", "run_name=n", "health.fault_inject_nan_steps=[6,7]",
                            "health.nan_max_skips=3"), tmp_path / "n.out", timeout=90)
    assert rc == 0, out[-4000:]
    for s, k in ((6, 1), (7, 2)):
        assert f"step {s}: non-finite loss or gradient norm, update skipped ({k} in a row" in out
    rows = metric_rows(tmp_path / "n")
    assert max(rows) == 14 and rows[14]["skipped_steps"] == 2
    assert _all_checkpoints_finite(tmp_path / "n") >= 3


def test_nan_exhausted_rolls_back_to_last_commit(tmp_path):
    rc, out = run(train_cmd(*NAN, f"output_dir={tmp_path}", "run_name=r", "health.fault_inject_nan_steps=[6,7,8,9]",
                            "health.nan_max_skips=3", "health.nan_on_exhausted=rollback"), tmp_path / "r.out",
                  timeout=90)
    assert rc == 0, out[-4000:]
    m = re.search(r"step 9: non-finite 4 times in a row; rolled back to the commit at step (\d+)", out)
    assert m, out[-4000:]
    assert int(m.group(1)) in committed_steps(tmp_path / "r")
    assert max(committed_steps(tmp_path / "r")) == 14
    assert _all_checkpoints_finite(tmp_path / "r") >= 3


def test_nan_exhausted_stop_exits_1(tmp_path):
    run_dir = tmp_path / "s"
    rc, out = run(train_cmd(*NAN, f"output_dir={tmp_path}", "run_name=s", "health.fault_inject_nan_steps=[6,7,8,9]",
                            "health.nan_max_skips=3", "health.nan_on_exhausted=stop"), tmp_path / "s.out", timeout=90)
    assert rc == 1, out[-4000:]
    assert exit_code(run_dir, rc)[0] == 1
    assert "non-finite loss or gradients at step 9, 4 times in a row" in out
    assert "health.nan_on_exhausted=stop): stopping without a checkpoint" in out
    assert max(committed_steps(run_dir)) < 9
    _all_checkpoints_finite(run_dir)


def test_nan_rollbacks_are_bounded(tmp_path):
    """A fault that recurs after every rollback (the injection is tied to the step number, which a
    rollback rewinds) stops after health.nan_max_rollbacks rollbacks instead of looping forever."""
    run_dir = tmp_path / "b"
    rc, out = run(train_cmd(*NAN, f"output_dir={tmp_path}", "run_name=b", "health.fault_inject_nan_steps=[6]",
                            "health.nan_max_skips=0", "health.nan_max_rollbacks=2"), tmp_path / "b.out", timeout=90)
    assert rc == 1, out[-4000:]
    assert out.count("step 6: non-finite 1 times in a row; rolled back") == 2, out[-4000:]
    assert "still non-finite after 2 rollbacks, health.nan_max_rollbacks=2): stopping without a checkpoint" in out
    assert exit_code(run_dir, rc)[0] == 1
    _all_checkpoints_finite(run_dir)


# ---------------------------------------------------------------------------------------- budget
BUDGET_USD = 20.0


def test_budget_runs_out_mid_run_exit_77_after_commit_and_stays_out(tmp_path):
    # $1 per second of the attempt, start-up included: ~4 s on an idle 2-core machine, over 10 s on
    # a loaded one, so the budget leaves room for a start-up of up to ~15 s and still stops mid-run.
    # The steps are slowed to >= 0.1 s, so the 300 steps cannot finish within the budget on any
    # machine. The stop comes when the projection to the next checkpoint (every 5 steps) would pass
    # the budget. (Also the e2e budget test of tests/cost: a commit, exit 77, a refusing re-run.)
    args = [*FAST, "trainer.eval_every=0", "trainer.max_steps=300", "checkpoint.every_steps=5",
            "health.fault_inject_slow_s=0.1", "cost.price_per_hour=3600", f"cost.budget_usd={BUDGET_USD:g}",
            f"output_dir={tmp_path}", "run_name=b"]
    run_dir = tmp_path / "b"
    rc, out = run(train_cmd(*args), tmp_path / "b.out", timeout=120)
    assert rc == 77, out[-4000:]
    assert exit_code(run_dir, rc)[0] == 77
    stop = _stop_steps(run_dir, 1, 77)[0]
    assert 0 < stop < 300, (stop, out[-3000:])
    assert (step_dir(run_dir, stop) / "COMMITTED").exists()
    assert max(committed_steps(run_dir)) == stop and max(metric_rows(run_dir)) == stop  # nothing after the stop
    assert trainer_state(step_dir(run_dir, stop))["budget"]["stopped_at"] is not None
    m = re.search(r"stopping at step \d+: budget exhausted at step \d+: spent \$([\d.]+)", out)
    assert m and float(m.group(1)) <= BUDGET_USD, out[-3000:]
    rows_before, commits_before = metric_rows(run_dir), committed_steps(run_dir)

    rc2, out2 = run(train_cmd(*args), tmp_path / "b2.out", timeout=90)
    assert rc2 == 77, out2[-4000:]
    assert exit_code(run_dir, rc2)[0] == 77
    assert f"not training: this run stopped on its budget at step {stop}" in out2, out2[-3000:]
    assert metric_rows(run_dir) == rows_before and committed_steps(run_dir) == commits_before  # no training


# ---------------------------------------------------------------------------------------- randomized trials
SOAK = [*FAST, "trainer.eval_every=0", "trainer.max_steps=20", "checkpoint.every_steps=5", "checkpoint.keep_last=2",
        "health.fault_inject_slow_s=0.05", "health.imds_interval_s=0.2", "health.preemption_deadline_s=60"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    rc, text = run(train_cmd(*SOAK, f"output_dir={out}", "run_name=ref"), out / "ref.out", timeout=90)
    assert rc == 0, text[-4000:]
    return checkpoint_tensors(step_dir(out / "ref", 20)), losses(out / "ref")


def _trial(tmp: Path, i: int, rng: random.Random, ref) -> str:
    fault = rng.choice(["SIGKILL", "SIGTERM", "spot"])
    name = f"t{i}"
    run_dir = tmp / name
    with ImdsServer(life_cycle="spot") as srv:
        args = [*SOAK, f"output_dir={tmp}", f"run_name={name}", f"health.imds_endpoint={srv.endpoint}"]
        launch = Launch(train_cmd(*args), tmp / f"{name}.first.out")
        wait_until(lambda: first_metric_logged(run_dir), 90, "the first metrics line", launch)
        time.sleep(rng.uniform(0.0, 0.8))  # the 20 steps take >= 1 s after the first metric line
        if fault == "spot":
            srv.arm_spot_notice(in_s=120)
        else:
            launch.signal(getattr(signal, fault), tree=True)
        rc = launch.wait(90)
    if fault == "SIGKILL":
        assert rc == -signal.SIGKILL or rc == 0, (rc, launch.tail())
    else:
        assert rc in (75, 0), (fault, rc, launch.tail())  # 0: the run finished before the fault landed
        if rc == 75:
            assert (step_dir(run_dir, _stop_steps(run_dir, 1, 75)[0]) / "COMMITTED").exists()
    rc2, out = run(train_cmd(*SOAK, f"output_dir={tmp}", f"run_name={name}"), tmp / f"{name}.resume.out", timeout=90)
    assert rc2 == 0, (fault, out[-4000:])
    weights, loss = ref
    got = checkpoint_tensors(step_dir(run_dir, 20))
    assert got.keys() == weights.keys()
    for k in weights:
        assert torch.equal(got[k], weights[k]), (fault, k)
    assert losses(run_dir) == loss, fault
    return f"{fault}->{rc}"


def _trials(tmp: Path, n: int, ref) -> list[str]:
    """``n`` trials; returns each as "<fault>-><first attempt's rc>" (0: it finished before the fault)."""
    rng = random.Random(SEED)
    done = []
    for i in range(n):
        try:
            done.append(_trial(tmp, i, rng, ref))
        except AssertionError as e:
            raise AssertionError(f"trial {i} (seed {SEED}, earlier: {done}): {e}") from e
        shutil.rmtree(tmp / f"t{i}", ignore_errors=True)  # keep the disk bounded over many trials
    print(f"fault trials (seed {SEED}): {done}")
    return done


def test_randomized_fault_trials_end_bitwise_equal(tmp_path, straight):
    # A bounded sample: one trial (a seeded random fault of the three); -m soak runs SOAK_TRIALS.
    _trials(tmp_path, 1, straight)


SOAK_TRIALS = int(os.environ.get("MOEFORGE_SOAK_TRIALS", "50"))


@pytest.mark.soak
@pytest.mark.timeout(120 + 40 * SOAK_TRIALS)  # ~10 s a trial on 2 shared cores
def test_soak_randomized_fault_trials(tmp_path, straight):
    done = _trials(tmp_path, SOAK_TRIALS, straight)
    landed = [d for d in done if not d.endswith("->0")]
    assert len(landed) >= SOAK_TRIALS // 2, f"most faults came after the run finished: {done} (seed {SEED})"
