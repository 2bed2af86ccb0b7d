"""``python -m launch local``: torchrun on this machine, with the Slurm script's exit-code policy.

Each attempt clears the exit records, runs torchrun (``--signals-to-handle`` includes SIGUSR1),
and reads the code to act on from ``python -m health exit-code`` semantics
(health.exit_record.resolve_exit_code). In ``ExitCode`` names: PREEMPTED restarts (the next attempt
resumes from the commit) unless the launcher itself was signalled, in which case it stops with
PREEMPTED so whoever signalled it decides; UNHEALTHY stops (there is no other node here);
BUDGET_EXHAUSTED and CONFIG_ERROR stop; HANG, CRASH and other codes restart
while this launch's failures are at most ``--max-retries``. SIGTERM/SIGINT/SIGUSR1/SIGHUP sent to
the launcher are forwarded to torchrun, which forwards them to the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional

from launch import policy
from launch.entry import torchrun_program
from train.redact import redact_command
from launch.slurm import SIGNALS_TO_HANDLE, REPO, _torchrun


def torchrun_command(nproc_per_node: int, overrides: List[str], python: str = sys.executable,
                     port: int = 0) -> List[str]:
    endpoint = f"127.0.0.1:{port}" if port else "127.0.0.1:0"
    return [*_torchrun(python), "--nnodes=1", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--local-addr=127.0.0.1",
            "--max-restarts=0", f"--signals-to-handle={SIGNALS_TO_HANDLE}", *torchrun_program(python), *overrides]


def run_local(run_dir: str, cmd: List[str], max_retries: int, max_restarts: int = 100, log=print,
              extra_env: Optional[Dict[str, str]] = None) -> int:
    from health.exit_record import clear_exit_records, resolve_exit_code

    env = dict(os.environ)
    env["RUN_DIR"] = run_dir
    env.update(extra_env or {})  # secret overrides' values (train/redact.py): never on the command line
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    os.makedirs(run_dir, exist_ok=True)
    state = {"child": None, "signalled": False}

    def forward(signum, _frame):
        state["signalled"] = True
        child = state["child"]
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)}
    failures = 0
    try:
        for attempt in range(max_restarts + 1):
            clear_exit_records(run_dir)
            log(f"[launch] attempt {attempt}: {' '.join(redact_command(cmd))}")
            state["child"] = subprocess.Popen(cmd, env=env)
            rc = state["child"].wait()
            state["child"] = None
            code, reason = resolve_exit_code(run_dir, rc)
            act = policy.action(code)
            log(f"[launch] torchrun exited {rc}; exit code to act on: {code} ({reason}) -> {act}")
            if act == policy.DONE:
                return 0
            if act == policy.REQUEUE and not state["signalled"]:
                continue
            if act == policy.RETRY:
                failures += 1
                if failures <= max_retries and not state["signalled"]:
                    continue
            return code
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
