"""Helpers for the launch tests: run `python -m launch` / `python -m train` as a user would, and
drive the project's single-node Slurm (launch/slurm_localhost.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_SH = REPO / "launch" / "slurm_localhost.sh"
# The training program in a rendered job (launch/entry.py): the console script, or python -m moeforge.
PROGRAM_RE = r"(?:--no-python \S*moeforge train|-m moeforge train)"

# Tiny, bounded Slurm jobs: the tiny model, seq 64, batch 4 (2 shared CPU cores in CI).
TINY = ["trainer.seq_len=64", "trainer.global_batch_size=4", "trainer.log_every=1",
        "trainer.eval_every=0", "logging.progress=off", "optim.warmup_steps=2"]
# Long enough to signal mid-run: rank 0 sleeps 0.4 s per step (health.fault_inject_slow_s).
SLOW_STEPS = 10
SLOW = [f"trainer.max_steps={SLOW_STEPS}", "checkpoint.every_steps=3", "health.fault_inject_slow_s=0.4"]

# The commands docs/launch.md shows for driving a job by hand; the Slurm tests run exactly these.
REQUEUE_CMD = "scontrol requeue $JOBID"
PREEMPT_CMD = "scancel -b --signal=USR1 $JOBID"


def doc_commands() -> list[str]:
    """The commands in docs/launch.md's bash blocks, one per line."""
    text = (REPO / "docs" / "launch.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        out += [l.strip() for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
    return out


def run_doc_command(line: str, cwd, timeout: float = 240, **extra_env) -> subprocess.CompletedProcess:
    import shlex

    argv = shlex.split(line)
    if argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def env(**extra) -> dict:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["WANDB_MODE"] = e.get("WANDB_MODE", "offline")
    e.pop("RUN_DIR", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def launch(*args: str, cwd, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"launch exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def field(stdout: str, key: str) -> str:
    m = re.search(rf"^{re.escape(key)}=(.*)$", stdout, re.M)
    assert m, f"no {key}= in launcher output:\n{stdout}"
    return m.group(1).strip()


def slurm_cmd(cmd: str, job_id: str) -> list[str]:
    return cmd.replace("$JOBID", job_id).split()


def job_state(job_id: str) -> dict:
    p = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S+)", p.stdout))


def wait_job(job_id: str, timeout: float = 180) -> str:
    p = subprocess.run(["bash", str(SLURM_SH), "wait", job_id, str(int(timeout))], capture_output=True, text=True,
                       timeout=timeout + 30)
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "UNKNOWN"


def wait_for(path: Path, pattern: str, timeout: float = 120) -> None:
    rx = re.compile(pattern, re.M)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and rx.search(path.read_text(errors="replace")):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout}s:\n"
                         f"{path.read_text(errors='replace')[-3000:] if path.exists() else '(missing)'}")


def metric_steps(run_dir: Path) -> list[int]:
    import json

    p = run_dir / "metrics.jsonl"
    return [int(json.loads(l)["step"]) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def slurm_available() -> tuple[bool, str]:
    if shutil.which("scontrol") is None:
        return False, "scontrol not found"
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if p.returncode != 0 or "UP" not in p.stdout:
        return False, f"slurmctld not responding: {(p.stdout + p.stderr).strip()[:200]}"
    return True, ""
