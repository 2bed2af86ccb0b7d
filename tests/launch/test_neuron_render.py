"""The Trainium job (trainer.device=neuron): rendered and checked without Trainium or Slurm.

neuron_parallel_compile and the Neuron runtime do not exist on a CPU machine, so nothing here
trains: the sbatch script is rendered, syntax-checked, its trial-run overrides composed and
validated as the trainer would, and its control flow (exports, the precompile once, the marker,
the requeue when signalled) executed by bash with stand-ins for srun/scontrol/neuron_parallel_compile
that record what they were given.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from tests.launch.common import PROGRAM_RE, TINY, field, launch

NEURON = ["cluster=trn1.32xlarge", "trainer.device=neuron", *TINY]


def _render(tmp_path, *extra, target="hyperpod"):
    p = launch(target, "--dry-run", "--", *NEURON, *extra, cwd=tmp_path)
    path = Path(field(p.stdout, "script"))
    return path, path.read_text(), Path(field(p.stdout, "run_dir"))


def _precompile_overrides(script: str) -> list[str]:
    """The trainer overrides of the neuron_parallel_compile trial run."""
    block = script.split('"$NEURON_PARALLEL_COMPILE"', 1)[1]
    m = re.search(rf"{PROGRAM_RE} (.*) &\n", block)
    assert m, block[:2000]
    return shlex.split(m.group(1))


def test_neuron_script_renders_exports_and_precompile(tmp_path):
    from devices.config import NeuronConfig
    from devices.neuron_env import recommended_xla_env

    path, script, run_dir = _render(tmp_path)
    subprocess.run(["bash", "-n", str(path)], check=True)
    for s in recommended_xla_env("neuron", NeuronConfig(), str(run_dir), local_rank=None):
        assert f"export {s.key}=${{{s.key}-{shlex.quote(s.value)}}}" in script
    assert "NEURON_RT_VISIBLE_CORES" not in script  # per process: the trainer sets it from LOCAL_RANK
    assert "#SBATCH --exclusive" in script and "--gpus-per-node" not in script  # NeuronCores are not GRES GPUs
    assert script.count("--nproc-per-node=1") == 2  # the trial run and the step: one process
    # order: exports, then the trial run, then the step
    assert script.index("export NEURON_COMPILE_CACHE_URL") < script.index('"$NEURON_PARALLEL_COMPILE"') < \
        script.index('rm -f "$RUN_DIR"/exit_code')
    assert f"precompile_dir={run_dir / 'neuron-precompile'}" in script
    assert 'RUN_DIR="$precompile_dir" srun' in script and "srun_extra+=(--auto-resume=1)" in script


def test_trial_run_overrides_compose_and_cannot_touch_the_run(tmp_path):
    from launch.config import compose
    from train.run_dir import run_name

    _, script, run_dir = _render(tmp_path, f"checkpoint.root={tmp_path / 'fsx'}", "checkpoint.upload_root=s3://b/up")
    ov = _precompile_overrides(script)
    assert "trainer.max_steps=10" in ov and "checkpoint.resume=none" in ov and "checkpoint.save_final=false" in ov
    c = compose(ov, cwd=str(tmp_path))  # composes and validates exactly as the trainer will
    cfg = c.cfg
    assert cfg.trainer.device == "neuron" and cfg.trainer.max_steps == 10
    assert cfg.checkpoint.every_steps == 0 and cfg.checkpoint.resume == "none"
    # its checkpoints (an emergency save, say) would land under the run's own directory, never in
    # the run's checkpoint root: the placeholder weights of graph extraction are not a checkpoint
    assert cfg.checkpoint.root == str(run_dir) and cfg.checkpoint.upload_root == ""
    assert run_name(cfg) == "neuron-precompile"
    assert cfg.neuron.compile_cache == str(run_dir / "neuron-compile-cache")
    assert cfg.model == compose(NEURON, cwd=str(tmp_path)).cfg.model  # the same graphs as the run


def test_precompile_off_and_bad_world_size(tmp_path):
    _, script, _ = _render(tmp_path, "neuron.precompile_steps=0")
    assert "NEURON_PARALLEL_COMPILE" not in script and "export NEURON_CC_FLAGS" in script
    p = launch("slurm", "--nproc-per-node", "32", "--dry-run", "--", *NEURON, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "world size 32" in p.stderr
    q = launch("slurm", "--dry-run", "--", *NEURON, "trainer.compile=true", cwd=tmp_path, check=False)
    assert q.returncode == 2 and "trainer.compile=false" in q.stderr


def test_eks_manifest_for_neuron_is_schema_valid(tmp_path):
    from launch.eks import validate

    p = launch("hyperpod-eks", "--instance-type", "trn1.32xlarge", "--", *NEURON, cwd=tmp_path)
    doc = yaml.safe_load(Path(field(p.stdout, "manifest")).read_text())
    validate(doc)
    c = doc["spec"]["replicaSpecs"][0]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PJRT_DEVICE"] == "NEURON" and "--auto-cast=none" in env["NEURON_CC_FLAGS"]
    assert env["NEURON_COMPILE_CACHE_URL"] == env["RUN_DIR"] + "/neuron-compile-cache"
    assert doc["spec"]["nprocPerNode"] == "1" and "--nproc-per-node=1" in c["command"]
    assert c["resources"]["limits"]["aws.amazon.com/neurondevice"] == 16


STUB_SRUN = """#!/bin/bash
# srun stand-in: drop srun's own options, record the command and the variables it would run with
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
echo "RUN_DIR=$RUN_DIR CACHE=$NEURON_COMPILE_CACHE_URL CC=$NEURON_CC_FLAGS PJRT=$PJRT_DEVICE :: $*" >> "$STUB_LOG"
if [ "$1" = "$STUB_NPC" ] && [ -n "$STUB_SIGNAL_IN_PRECOMPILE" ]; then kill -USR1 "$PPID"; sleep 1; fi
exit "${STUB_RC:-0}"
"""


def _run_script(tmp_path, path: Path, **extra) -> tuple[subprocess.CompletedProcess, list[str]]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in {"srun": STUB_SRUN, "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$STUB_LOG"\n'
                       '[ "$1" = show ] && echo localhost\nexit 0\n', "scancel": "#!/bin/bash\nexit 0\n"}.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEURON", "PJRT", "SLURM"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", STUB_LOG=str(log), STUB_NPC="neuron_parallel_compile",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", **extra)
    p = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)
    return p, log.read_text().splitlines() if log.exists() else []


def test_script_control_flow_with_stand_ins(tmp_path):
    path, _, run_dir = _render(tmp_path)
    pre = run_dir / "neuron-precompile"
    p, calls = _run_script(tmp_path, path)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [c for c in calls if " :: " in c]
    assert len(steps) == 2, calls
    trial, step = steps
    cache = run_dir / "neuron-compile-cache"
    assert trial.startswith(f"RUN_DIR={pre} CACHE={cache} CC=--model-type=transformer --auto-cast=none PJRT=NEURON :: ")
    assert " :: neuron_parallel_compile " in trial and "trainer.max_steps=10" in trial
    assert step.startswith(f"RUN_DIR={run_dir} CACHE={cache} ") and "neuron_parallel_compile" not in step
    assert (pre / "COMPILED").exists() and "precompiled into" in p.stdout
    # a requeued attempt finds the marker: no second trial run
    p2, calls2 = _run_script(tmp_path, path, SLURM_RESTART_COUNT="1")
    assert p2.returncode == 0 and len([c for c in calls2 if " :: " in c]) == 1
    # a failed trial run is logged and the job trains anyway (graphs compile just in time)
    (pre / "COMPILED").unlink()
    p3, calls3 = _run_script(tmp_path, path, STUB_RC="1")
    assert "neuron_parallel_compile exited 1: the run compiles its graphs just in time" in p3.stdout
    assert not (pre / "COMPILED").exists()


def test_signal_during_precompile_requeues(tmp_path):
    path, _, run_dir = _render(tmp_path)
    p, calls = _run_script(tmp_path, path, STUB_SIGNAL_IN_PRECOMPILE="1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "signalled (SIGUSR1) during the precompile: requeue" in p.stdout
    assert "scontrol requeue 4242" in calls
    assert len([c for c in calls if " :: " in c]) == 1  # the step itself never started
    assert not (run_dir / "neuron-precompile" / "COMPILED").exists()


def trainium_doc_commands() -> list[str]:
    """The bash commands of docs/backends.md's Trainium section, one per line."""
    from tests.launch.common import REPO

    text = (REPO / "docs" / "backends.md").read_text().split("## Trainium", 1)[1]
    return [" ".join(c.split()) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_trainium_doc_commands(tmp_path):
    """What a CPU machine can do with each: the launcher renders its job (--dry-run); a trainer
    command on Neuron composes and validates; the XLA:CPU one runs in tests/xla."""
    from launch.config import compose

    cmds = trainium_doc_commands()
    assert len(cmds) == 3, cmds
    for cmd in cmds:
        args = shlex.split(cmd)
        if args[:3] == ["python", "-m", "launch"]:
            p = launch(args[3], "--dry-run", *args[4:], cwd=tmp_path)
            assert '"$NEURON_PARALLEL_COMPILE"' in Path(field(p.stdout, "script")).read_text()
        elif args[:3] == ["python", "-m", "train"]:
            assert compose(args[3:], cwd=str(tmp_path)).cfg.trainer.device == "neuron"
        else:
            assert args[0] == "PJRT_DEVICE=CPU" and "trainer.device=xla" in args, cmd
