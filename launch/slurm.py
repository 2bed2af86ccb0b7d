"""Render the sbatch script for a run (plain Slurm and HyperPod on Slurm) and submit it.

The script (docs/launch.md walks through it):

- ``#SBATCH --requeue --open-mode=append --signal=B:USR1@<lead>``: requeue-able, one log across
  attempts, SIGUSR1 to the *batch shell* <lead> seconds before the time limit;
- traps USR1 and TERM in the batch shell and forwards them to the step; the step runs as
  ``srun ... & wait $!`` because bash runs a trap only after the foreground command returns;
- ``srun`` (``--auto-resume=1`` on HyperPod) → ``torchrun`` with a c10d rendezvous on the first
  node and ``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` so the workers see USR1;
- exports RUN_DIR (the same for every attempt, so ``checkpoint.resume=auto`` finds the commits);
  EFA/NCCL settings come from the trainer itself (parallelism/efa.py);
- after the step, the code to act on is ``python -m health exit-code --dir $RUN_DIR --rc $rc``
  and launch.policy's table decides (``ExitCode`` names): OK done, PREEMPTED requeue, UNHEALTHY
  exclude this node and requeue, BUDGET_EXHAUSTED and CONFIG_ERROR stop, anything else requeue while the job's failures are at most ``--max-retries``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional

from checkpointing.atomic import atomic_write_text
from health.exit_codes import ExitCode as E
from launch.entry import torchrun_program

SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
HYPERPOD_MARKER = "/opt/sagemaker_cluster"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class SlurmJob:
    run_name: str
    run_dir: str
    overrides: List[str]
    workdir: str
    nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 0  # 0 = leave to Slurm
    partition: str = ""
    time: str = ""
    signal_lead_s: int = 300
    max_retries: int = 3
    hyperpod: str = "auto"  # auto (detect /opt/sagemaker_cluster on the node) | on | off
    exclusive: bool = False
    python: str = sys.executable
    rdzv_port: int = 0  # 0 = derived from the job id
    local_addr: str = ""  # "" = 127.0.0.1 on one node, torchrun's own choice on several
    extra_sbatch: List[str] = field(default_factory=list)
    neuron: Optional[Any] = None  # launch.neuron.NeuronLaunch for trainer.device=neuron

    @property
    def script_path(self) -> str:
        return os.path.join(self.run_dir, "launch", "job.sbatch")


def _torchrun(python: str) -> List[str]:
    tr = os.path.join(os.path.dirname(python), "torchrun")
    return [tr] if os.path.exists(tr) else [python, "-m", "torch.distributed.run"]


def render(job: SlurmJob) -> str:
    q = shlex.quote
    sb = [f"--job-name={job.run_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.cpus_per_task:
        sb.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.gpus_per_node:
        sb.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.partition:
        sb.append(f"--partition={job.partition}")
    if job.time:
        sb.append(f"--time={job.time}")
    if job.exclusive:
        sb.append("--exclusive")
    sb += [f"--chdir={job.workdir}", f"--output={job.run_dir}/slurm-%j.out",
           "--requeue", "--open-mode=append", f"--signal=B:USR1@{job.signal_lead_s}"]
    sb += list(job.extra_sbatch)
    header = "\n".join(f"#SBATCH {s}" for s in sb)
    if job.local_addr:
        local_addr = f"--local-addr {q(job.local_addr)}"
    else:
        local_addr = "--local-addr 127.0.0.1" if job.nodes == 1 else ""
    port = str(job.rdzv_port) if job.rdzv_port else "$((20000 + (SLURM_JOB_ID * 16 + attempt) % 20000))"
    endpoint_host = "127.0.0.1" if job.nodes == 1 and not job.local_addr else "$head"
    hp = {"auto": "auto", "on": "1", "off": "0"}[job.hyperpod]
    torchrun = " ".join(q(a) for a in _torchrun(job.python))
    overrides = " ".join(q(o) for o in job.overrides)
    program = " ".join(q(a) for a in torchrun_program(job.python))  # launch/entry.py: cwd-immune
    # The step: one task per node holding all of the job's CPUs on it (torchrun's workers share them).
    srun = (f'srun --kill-on-bad-exit=1 --nodes={job.nodes} --ntasks-per-node=1 \\\n'
            f'  --cpus-per-task="${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-1}}}}" "${{srun_extra[@]}}" \\\n')
    torchrun_args = (f'{torchrun} --nnodes={job.nodes} --nproc-per-node={job.nproc_per_node} \\\n'
                     f'  --rdzv-backend=c10d --rdzv-endpoint="{endpoint_host}:$port" --rdzv-id="$SLURM_JOB_ID" '
                     f'{local_addr} \\\n  --max-restarts=0 --signals-to-handle={SIGNALS_TO_HANDLE} \\\n')
    neuron = ""
    if job.neuron is not None:
        from launch.neuron import render_block

        neuron = render_block(job.neuron, srun, torchrun_args, program)
    return f"""#!/bin/bash
{header}
# Rendered by `python -m launch slurm` for run {job.run_name}. Re-render rather than edit.
# Exit-code policy (docs/launch.md): {E.OK:d} done | {E.PREEMPTED:d} requeue | {E.UNHEALTHY:d} exclude node + requeue |
# {E.BUDGET_EXHAUSTED:d}, {E.CONFIG_ERROR:d} stop | {E.HANG:d}, {E.CRASH:d}, other: requeue while this job's failures <= MAX_RETRIES.
set -uo pipefail

export RUN_DIR={q(job.run_dir)}
export PYTHONPATH={q(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}
PY={q(job.python)}
MAX_RETRIES={int(job.max_retries)}
HYPERPOD={hp}
attempt=${{SLURM_RESTART_COUNT:-0}}
node=${{SLURMD_NODENAME:-$(hostname)}}
mkdir -p "$RUN_DIR/launch"
log() {{ echo "[launch $(date -u +%FT%TZ)] job $SLURM_JOB_ID attempt $attempt: $*"; }}

srun_extra=()
if [ "$HYPERPOD" = 1 ] || {{ [ "$HYPERPOD" = auto ] && [ -d {HYPERPOD_MARKER} ]; }}; then
  srun_extra+=(--auto-resume=1)   # HyperPod: re-run the step on replacement nodes
fi
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port={port}

step_pid=""
signalled=""
forward() {{  # to every step task (the torchrun agents on each node), which relay it to the workers
  signalled=$1
  log "got SIG$1; forwarding to the step${{step_pid:+ (srun pid $step_pid)}}"
  if [ -n "$step_pid" ]; then
    # in the background: scancel can block while slurmctld is busy requeueing this very job
    {{ timeout 10 scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || kill -s "$1" "$step_pid" 2>/dev/null; }} &
  fi
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

requeue() {{
  if scontrol requeue "$SLURM_JOB_ID"; then log "requeued"; else log "scontrol requeue failed (already requeued by Slurm?)"; fi
  exit 0
}}

{neuron}rm -f "$RUN_DIR"/exit_code.rank*.json
log "start on $node (nodes: $SLURM_JOB_NODELIST) RUN_DIR=$RUN_DIR rdzv={endpoint_host}:$port ${{srun_extra[*]:-}}"
# one task per node holding all of the job's CPUs on it (torchrun's workers share them)
{srun}  {torchrun_args}  {program} {overrides} &
step_pid=$!
wait "$step_pid"; rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; rc=$?; done
step_pid=""
code=$("$PY" -m health exit-code --dir "$RUN_DIR" --rc "$rc" 2>/dev/null) || code=$rc
[[ "$code" =~ ^[0-9]+$ ]] || code=$rc
log "step exited rc=$rc; exit code to act on: $code"
case "$code" in
  {E.OK:d})  log "done"; exit {E.OK:d} ;;
  {E.PREEMPTED:d}) log "preempted with a committed checkpoint: requeue"; requeue ;;
  {E.UNHEALTHY:d}) log "unhealthy node $node: exclude it and requeue"
      scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$node" || log "could not exclude $node"
      requeue ;;
  {E.BUDGET_EXHAUSTED:d}) log "budget spent: stop"; exit {E.BUDGET_EXHAUSTED:d} ;;
  {E.CONFIG_ERROR:d})  log "config error: stop"; exit {E.CONFIG_ERROR:d} ;;
  *)  echo "$SLURM_JOB_ID $attempt $code" >> "$RUN_DIR/launch/failures"
      failures=$(grep -c "^$SLURM_JOB_ID " "$RUN_DIR/launch/failures")
      if [ "$failures" -le "$MAX_RETRIES" ]; then
        log "failure $failures of at most $MAX_RETRIES retries (code $code): requeue"; requeue
      fi
      log "code $code after $failures failures: giving up"; exit "$code" ;;
esac
"""


def write(job: SlurmJob) -> str:
    path = job.script_path
    atomic_write_text(path, render(job), mode=0o755)
    return path


def submit_command(job: SlurmJob) -> List[str]:
    return ["sbatch", "--parsable", job.script_path]


def submit(job: SlurmJob, secret_env: Optional[dict] = None) -> str:
    """sbatch the rendered script; returns the job id. ``secret_env``: the secret overrides' values,
    which the job inherits (sbatch passes the submitter's environment on; the script holds only
    references to them, train/redact.py)."""
    env = {**os.environ, **(secret_env or {})}
    p = subprocess.run(submit_command(job), capture_output=True, text=True, cwd=job.workdir, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"sbatch failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]
