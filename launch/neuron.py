"""The Trainium part of a Slurm / HyperPod-on-Slurm job (``trainer.device=neuron``).

The sbatch script gets, before the training step:

- the Neuron variables of devices/neuron_env.py as ``export KEY=${KEY-value}`` lines: the values the
  trainer would set itself, exported here because ``neuron_parallel_compile`` (the outer process)
  reads ``NEURON_COMPILE_CACHE_URL`` to know where to put what it compiles;
- on the first attempt that finds no ``COMPILED`` marker, a ``neuron_parallel_compile`` trial run
  (``neuron.precompile_steps`` steps) that extracts every graph of a step and of an evaluation and
  compiles them in parallel into that cache. It runs with its own RUN_DIR
  (``<run dir>/neuron-precompile``), its own run name and checkpoint root there, and nothing saved
  or resumed, so the placeholder weights of graph extraction can never become a checkpoint of the
  run. If it fails the job goes on and the trainer compiles just in time (logged, not silent).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List

from launch.config import _has_key

if TYPE_CHECKING:
    from train.config import TrainConfig


@dataclass
class NeuronLaunch:
    exports: str  # export lines (devices.neuron_env.shell_exports)
    precompile_overrides: List[str] = field(default_factory=list)  # empty: no precompile
    precompile_run_dir: str = ""


def neuron_launch(cfg: TrainConfig, overrides: List[str], run_dir: str) -> NeuronLaunch:
    """What the script adds for a composed ``trainer.device=neuron`` config and its RUN_DIR."""
    from devices.neuron_env import (PRECOMPILE_SUBDIR, compile_cache_url, precompile_overrides,
                                  recommended_xla_env, shell_exports)

    settings = recommended_xla_env("neuron", cfg.neuron, run_dir, local_rank=None)
    steps = int(cfg.neuron.precompile_steps)
    if steps <= 0:
        return NeuronLaunch(shell_exports(settings))
    pre_dir = os.path.join(run_dir, PRECOMPILE_SUBDIR)
    ours = precompile_overrides(steps, compile_cache_url(cfg.neuron, run_dir), run_dir) + [
        f"run_name={PRECOMPILE_SUBDIR}", f"checkpoint.root={run_dir}"]
    if cfg.checkpoint.upload_root:
        ours.append("checkpoint.upload_root=")  # Hydra: empty string
    keep = [o for o in overrides if not any(_has_key([o], k.split("=", 1)[0]) for k in ours)]
    return NeuronLaunch(shell_exports(settings), keep + ours, pre_dir)


def render_block(neuron: NeuronLaunch, srun: str, torchrun: str, program: str = "-m moeforge train") -> str:
    """Bash for the script: exports, then the trial run: ``srun`` and ``torchrun`` are the training
    step's own command parts (each ending in `` \\\n``), with ``neuron_parallel_compile`` between them."""
    out = ["# Trainium (trainer.device=neuron): Neuron variables, the same as the trainer's own",
           "# (devices/neuron_env.py); a value already in the job's environment wins.", neuron.exports]
    if not neuron.precompile_overrides:
        return "\n".join(out + ["# neuron.precompile_steps=0: graphs compile just in time", ""])
    q = shlex.quote
    overrides = " ".join(q(o) for o in neuron.precompile_overrides)
    out += [
        'NEURON_PARALLEL_COMPILE=${NEURON_PARALLEL_COMPILE:-neuron_parallel_compile}',
        f"precompile_dir={q(neuron.precompile_run_dir)}",
        'if [ ! -e "$precompile_dir/COMPILED" ]; then',
        '  log "neuron_parallel_compile: trial run into $NEURON_COMPILE_CACHE_URL (RUN_DIR=$precompile_dir)"',
        '  mkdir -p "$precompile_dir"',
        "  pre_port=$(( (port + 8 - 20000) % 20000 + 20000 ))  # not the step's port: no TIME_WAIT clash",
        f'  RUN_DIR="$precompile_dir" {srun}  "$NEURON_PARALLEL_COMPILE" {torchrun.replace(":$port", ":$pre_port")}'
        f'  {program} {overrides} &',
        "  step_pid=$!",
        '  wait "$step_pid"; prc=$?',
        '  while [ "$prc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; prc=$?; done',
        '  step_pid=""',
        '  if [ -n "$signalled" ]; then log "signalled (SIG$signalled) during the precompile: requeue"; requeue; fi',
        '  if [ "$prc" -eq 0 ]; then touch "$precompile_dir/COMPILED"; log "precompiled into $NEURON_COMPILE_CACHE_URL"',
        '  else log "neuron_parallel_compile exited $prc: the run compiles its graphs just in time"; fi',
        "fi",
        "",
    ]
    return "\n".join(out)
