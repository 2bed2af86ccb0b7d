"""Every command in docs/launch.md is run here: `python -m launch` lines render (--dry-run), the
tiny Slurm job and the sweeps run for real (on the local Slurm when it is up), the Slurm drills are
the ones tests/launch/test_slurm.py runs, and the EKS submit lines are what the launcher prints."""

from __future__ import annotations

import subprocess

import pytest

from tests.launch.common import PREEMPT_CMD, REPO, REQUEUE_CMD, SLURM_SH, doc_commands, metric_steps, run_doc_command

DOC = REPO / "docs" / "launch.md"


CMDS = doc_commands()
_run = run_doc_command


def _with_dry_run(line: str) -> str:
    head, sep, tail = line.partition(" -- ")
    return f"{head} --dry-run{sep}{tail}" if "--dry-run" not in head else line


def test_every_doc_command_is_known():
    known = ("python -m launch ", "python -m train --multirun ", "python -m health exit-code ",
             "launch/slurm_localhost.sh ", "kubectl apply -f ", "hyp create hyp-pytorch-job ")
    assert CMDS
    for c in CMDS:
        assert c.startswith(known) or c in (REQUEUE_CMD, PREEMPT_CMD), f"docs/launch.md: no test runs {c!r}"
    assert REQUEUE_CMD in CMDS and PREEMPT_CMD in CMDS  # test_slurm.py runs these two drills


def test_policy_table_in_docs_matches_launch_policy():
    from launch.policy import table_markdown

    assert table_markdown() in DOC.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("line", [c for c in CMDS if c.startswith("python -m launch ")])
def test_launch_commands_render(line, tmp_path):
    p = _run(_with_dry_run(line), tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "run_dir=" in p.stdout
    if " hyperpod-eks " in line:
        assert "kind: HyperPodPyTorchJob" in p.stdout
        printed = p.stdout.splitlines()
        for doc_line in (c for c in CMDS if c.startswith(("kubectl apply", "hyp create"))):
            prefix = doc_line.split(" ...")[0]
            assert any(l.startswith(prefix) for l in printed), (doc_line, p.stdout[-2000:])
    else:
        assert "#SBATCH --requeue" in p.stdout or "torchrun" in p.stdout


def test_exit_code_command(tmp_path):
    for line in (c for c in CMDS if c.startswith("python -m health exit-code ")):
        p = _run(line, tmp_path)
        assert p.returncode == 0 and p.stdout.strip() == "1", p.stdout + p.stderr  # no record: the rc


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_multirun_command(tmp_path):
    lines = [c for c in CMDS if c.startswith("python -m train --multirun ") and "hydra/launcher" not in c]
    assert lines
    for line in lines:
        p = _run(line, tmp_path)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs = [d for d in (tmp_path / "outputs").iterdir() if d.name.startswith("tiny-")]
        assert len(runs) == 2 and all(metric_steps(r)[-1] == 4 for r in runs)


def test_slurm_commands_run_on_the_local_slurm(slurm_cluster):
    """The tiny `python -m launch slurm` line and the submitit sweep line are run verbatim by
    test_slurm.py (test_slurm_runs_tiny_to_completion, test_sweep_through_submitit_...)."""
    for c in CMDS:
        if c.startswith("launch/slurm_localhost.sh "):
            assert c.split()[1] in ("up", "down", "status")  # up/down: .ci/run and the session fixture
            if c.split()[1] == "status":
                assert subprocess.run(["bash", str(SLURM_SH), "status"], capture_output=True).returncode == 0
    assert len([c for c in CMDS if c.startswith("python -m launch slurm ") and "--cpus-per-task 2" in c]) == 1
    assert len([c for c in CMDS if "hydra/launcher=moeforge_slurm" in c]) == 1
