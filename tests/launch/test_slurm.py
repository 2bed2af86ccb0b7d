"""`python -m launch slurm|hyperpod` and Hydra sweeps through submitit, on the project's own
single-node Slurm: real sbatch, signals, `scontrol requeue`, SLURM_RESTART_COUNT, resume."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.common import (PREEMPT_CMD, REQUEUE_CMD, SLOW, SLOW_STEPS, TINY, field, job_state, launch,
                                 metric_steps, slurm_cmd, wait_for, wait_job, doc_commands, run_doc_command)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster"), pytest.mark.timeout(240)]

SLURM_ARGS = ["--nproc-per-node", "2", "--cpus-per-task", "2"]


def _submit(tmp_path: Path, *overrides: str, target: str = "slurm", extra=()) -> tuple[str, Path, Path, str]:
    p = launch(target, *SLURM_ARGS, *extra, "--", f"output_dir={tmp_path}", *TINY, *overrides, cwd=tmp_path)
    job_id, run_dir = field(p.stdout, "job_id"), Path(field(p.stdout, "run_dir"))
    return job_id, run_dir, run_dir / f"slurm-{job_id}.out", field(p.stdout, "run_name")


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _doc_line(pred) -> str:
    lines = [c for c in doc_commands() if pred(c)]
    assert len(lines) == 1, lines
    return lines[0]


def test_slurm_runs_tiny_to_completion(tmp_path):
    """docs/launch.md's tiny Slurm command, verbatim."""
    t0 = time.time()
    line = _doc_line(lambda c: c.startswith("python -m launch slurm ") and "--cpus-per-task 2" in c)
    p = run_doc_command(line, tmp_path)
    assert p.returncode == 0, p.stderr
    job, run_dir, name = field(p.stdout, "job_id"), Path(field(p.stdout, "run_dir")), field(p.stdout, "run_name")
    log = run_dir / f"slurm-{job}.out"
    assert wait_job(job, 150) == "COMPLETED", _log(log)
    text = _log(log)
    assert run_dir == tmp_path / "outputs" / name  # RUN_DIR derived as the trainer does: output_dir/run_name
    assert f"run {name}:" in text and f"run directory: {run_dir}" in text  # the trainer agrees
    assert "exit code to act on: 0" in text and "attempt 0" in text
    assert metric_steps(run_dir)[-1] == 6  # default log_every: the last step is always logged
    assert (run_dir / "step_000000006" / "COMMITTED").exists()
    script = (run_dir / "launch" / "job.sbatch").read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@"):
        assert directive in script
    print(f"slurm tiny run: {time.time() - t0:.1f}s")


def test_scontrol_requeue_restarts_and_resumes_from_commit(tmp_path):
    t0 = time.time()
    job, run_dir, log, _ = _submit(tmp_path, *SLOW)
    wait_for(log, r"^step=3 ", 120)
    subprocess.run(slurm_cmd(REQUEUE_CMD, job), check=True)
    assert wait_job(job, 200) == "COMPLETED", _log(log)
    text = _log(log)
    assert job_state(job).get("Restarts") == "1"
    assert "attempt 1: start" in text  # SLURM_RESTART_COUNT=1 on the second run; one log (append)
    assert "received SIGTERM" in text and "exit code to act on: 75" in text
    resumed = [l for l in text.splitlines() if l.startswith("resumed from step")]
    assert resumed, text
    step = int(resumed[0].split()[3])
    assert 3 <= step < SLOW_STEPS
    steps = metric_steps(run_dir)
    assert steps[-1] == SLOW_STEPS and set(range(1, SLOW_STEPS + 1)) <= set(steps)
    print(f"requeue drill: {time.time() - t0:.1f}s (resumed from step {step})")


def test_usr1_preemption_exits_75_requeues_and_completes(tmp_path):
    t0 = time.time()
    job, run_dir, log, _ = _submit(tmp_path, *SLOW)
    wait_for(log, r"^step=3 ", 120)
    subprocess.run(slurm_cmd(PREEMPT_CMD, job), check=True)  # to the batch shell, as --signal=B:USR1 would
    assert wait_job(job, 200) == "COMPLETED", _log(log)
    text = _log(log)
    assert "got SIGUSR1; forwarding to the step" in text
    assert "received SIGUSR1" in text  # the workers saw it (torchrun --signals-to-handle)
    assert "exit code to act on: 75" in text and "attempt 0: requeued" in text  # the script requeued itself
    assert "attempt 1: start" in text and job_state(job).get("Restarts") == "1"
    assert any(l.startswith("resumed from step") for l in text.splitlines())
    assert metric_steps(run_dir)[-1] == SLOW_STEPS
    print(f"USR1 preemption drill: {time.time() - t0:.1f}s")


def test_hyperpod_slurm_path_runs_with_auto_resume(tmp_path):
    stub = Path("/etc/slurm/plugstack.conf.d/auto_resume_stub.conf")
    if not stub.exists():
        pytest.skip("no SPANK stub for srun --auto-resume (launch/slurm_localhost.sh builds it when gcc and spank.h exist)")
    job, run_dir, log, _ = _submit(tmp_path, "trainer.max_steps=4", target="hyperpod")
    assert wait_job(job, 150) == "COMPLETED", _log(log)
    assert "--auto-resume=1" in (run_dir / "launch" / "job.sbatch").read_text()
    text = _log(log)
    assert "--auto-resume=1" in text.split("start on", 1)[1].splitlines()[0]  # srun got the option
    assert "exit code to act on: 0" in text and metric_steps(run_dir)[-1] == 4


def _sweep(tmp_path: Path) -> subprocess.CompletedProcess:
    """docs/launch.md's submitit sweep command, verbatim, with a RUN_DIR inherited from the shell."""
    line = _doc_line(lambda c: "hydra/launcher=moeforge_slurm" in c)
    p = run_doc_command(line, tmp_path, timeout=200, RUN_DIR="/nonexistent/shared")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_sweep_through_submitit_completes_both_points(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    t0 = time.time()
    _sweep(tmp_path)
    out = tmp_path / "outputs"
    runs = sorted(p for p in out.iterdir() if p.name.startswith("tiny-"))
    assert len(runs) == 2, list(out.iterdir())  # distinct run per point (names from config hashes)
    for r in runs:
        assert metric_steps(r)[-1] == 4 and (r / "step_000000004" / "COMMITTED").exists()
    # Stable: the same sweep again maps each point to the same run, which is already complete.
    _sweep(tmp_path)
    assert sorted(p for p in out.iterdir() if p.name.startswith("tiny-")) == runs
    for r in runs:
        assert metric_steps(r)[-1] == 4 and not (r / "step_000000005").exists()
    print(f"2-point submitit sweep, twice: {time.time() - t0:.1f}s")


def test_hang_gets_bounded_retries_and_budget_stops(tmp_path):
    """78 (hang watchdog) → requeued while failures <= --max-retries, then the job ends 78;
    77 (budget) → no requeue, the job ends 77. Both jobs run at once."""
    t0 = time.time()
    hang, hang_dir, hang_log, _ = _submit(tmp_path, "trainer.max_steps=6", "health.fault_inject_hang_step=3",
                                          "health.hang_timeout_s=3", extra=("--max-retries", "1"))
    budget, _, budget_log, _ = _submit(tmp_path, "trainer.max_steps=6", "trainer.seed=5",
                                       "cost.price_per_hour=3600", "cost.budget_usd=1")
    assert wait_job(budget, 150) == "FAILED"
    st = job_state(budget)
    assert st.get("ExitCode") == "77:0" and st.get("Restarts") == "0", _log(budget_log)
    assert "exit code to act on: 77" in _log(budget_log)
    assert wait_job(hang, 200) == "FAILED"
    st = job_state(hang)
    text = _log(hang_log)
    assert st.get("ExitCode") == "78:0" and st.get("Restarts") == "1", text
    assert "failure 1 of at most 1 retries (code 78): requeue" in text and "after 2 failures: giving up" in text
    assert list(hang_dir.rglob("hang_rank*.txt"))  # the watchdog's stack dump is there to read
    print(f"78 retry + 77 stop: {time.time() - t0:.1f}s")
