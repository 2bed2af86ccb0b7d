"""Rendering without a cluster: the sbatch script, the HyperPod EKS manifest (schema-checked),
the hyp command, config errors, and RUN_DIR derived exactly as the trainer derives it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.launch.common import PROGRAM_RE, TINY, field, launch


def test_slurm_dry_run_renders_the_resilience_contract(tmp_path):
    p = launch("slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
               "--signal-lead", "240", "--max-retries", "5", "--dry-run", "--", "cluster=p5.48xlarge",
               "trainer.max_steps=100", cwd=tmp_path)
    script_path = Path(field(p.stdout, "script"))
    script = script_path.read_text()
    assert script in p.stdout and "sbatch --parsable" in p.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=04:00:00", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --signal=B:USR1@240", "MAX_RETRIES=5", "--nproc-per-node=8", "--nnodes=2",
                 "--rdzv-backend=c10d", '--rdzv-endpoint="$head:$port"',
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "trap 'forward USR1' USR1",
                 "trap 'forward TERM' TERM", 'wait "$step_pid"', "-m health exit-code --dir \"$RUN_DIR\" --rc \"$rc\"",
                 'scontrol requeue "$SLURM_JOB_ID"', 'ExcNodeList="$node"', "/opt/sagemaker_cluster",
                 "SLURM_RESTART_COUNT"):
        assert line in script, line
    assert "--local-addr" not in script.split("srun --kill")[1]  # several nodes: torchrun picks its address
    # the working-directory-immune program (launch/entry.py), never `-m train`
    assert re.search(rf"^\s+{PROGRAM_RE} .*cluster=p5\.48xlarge", script, re.M)
    assert "-m train" not in script
    # the step runs in the background so the traps run while it does
    assert re.search(r"&\nstep_pid=\$!", script)
    subprocess.run(["bash", "-n", str(script_path)], check=True)
    # RUN_DIR = output_dir/run_name of the composed config, as train.run_dir derives it
    run_dir = Path(field(p.stdout, "run_dir"))
    assert run_dir == tmp_path / "outputs" / field(p.stdout, "run_name")
    assert f"export RUN_DIR={run_dir}" in script and script_path.parent.parent == run_dir


def test_run_dir_matches_train_run_dir_and_is_stable(tmp_path):
    from launch.config import compose
    from train.run_dir import run_dir, run_name

    a = compose(["trainer.seed=7", "trainer.max_steps=5"], cwd=str(tmp_path))
    b = compose(["trainer.max_steps=500", "trainer.seed=7"], cwd=str(tmp_path))  # max_steps: same run
    c = compose(["trainer.seed=8"], cwd=str(tmp_path))
    assert a.run_dir == b.run_dir != c.run_dir
    assert a.run_name == run_name(a.cfg) and a.run_dir == str(tmp_path / "outputs" / run_name(a.cfg))
    explicit = compose(["trainer.seed=7"], run_dir="runs/exp1", cwd=str(tmp_path))
    assert explicit.run_dir == str(tmp_path / "runs" / "exp1") and explicit.run_name == "exp1"
    # the job's own overrides make the trainer land in the same place (checkpoints included)
    assert f"output_dir={tmp_path / 'runs'}" in explicit.overrides and "run_name=exp1" in explicit.overrides
    import os
    os.environ.pop("RUN_DIR", None)
    assert os.path.join(tmp_path, run_dir(explicit.cfg)) == explicit.run_dir


def test_hyperpod_target_forces_auto_resume(tmp_path):
    p = launch("hyperpod", "--dry-run", "--", *TINY, cwd=tmp_path)
    assert "HYPERPOD=1" in p.stdout and "srun_extra+=(--auto-resume=1)" in p.stdout
    q = launch("slurm", "--dry-run", "--", *TINY, cwd=tmp_path)
    assert "HYPERPOD=auto" in q.stdout  # plain slurm: detected on the node (/opt/sagemaker_cluster)
    r = launch("slurm", "--hyperpod", "--dry-run", "--", *TINY, cwd=tmp_path)
    assert "HYPERPOD=1" in r.stdout


@pytest.mark.parametrize("target", ["slurm", "local", "hyperpod-eks"])
def test_config_error_is_exit_2_and_submits_nothing(tmp_path, target):
    p = launch(target, "--dry-run", "--", "trainer.no_such_key=1", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "config error" in p.stderr
    assert not (tmp_path / "outputs").exists()
    q = launch(target, "--time", "soon", "--dry-run", cwd=tmp_path, check=False)
    assert q.returncode == 2


def _eks(tmp_path, *extra):
    p = launch("hyperpod-eks", "--instance-type", "p5.48xlarge", "--nodes", "4", *extra, "--",
               "trainer.max_steps=1000", cwd=tmp_path)
    path = Path(field(p.stdout, "manifest"))
    return p, path, yaml.safe_load(path.read_text())


def test_hyperpod_eks_manifest_is_schema_valid_for_p5(tmp_path):
    from launch.eks import validate

    p, path, doc = _eks(tmp_path)
    validate(doc)
    assert doc["apiVersion"] == "sagemaker.amazonaws.com/v1" and doc["kind"] == "HyperPodPyTorchJob"
    spec = doc["spec"]
    assert spec["nprocPerNode"] == "8"
    rs = spec["replicaSpecs"][0]
    assert rs["replicas"] == 4
    pod = rs["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "ml.p5.48xlarge"}
    c = pod["containers"][0]
    assert c["command"][0] == "hyperpodrun" and "--nnodes=4" in c["command"] and "--nproc-per-node=8" in c["command"]
    assert {"trainer.max_steps=1000", "cluster=p5.48xlarge", "cluster.nodes=4"} <= set(c["command"])
    i = c["command"].index("--no-python")  # the image's console script: immune to the working directory
    assert c["command"][i + 1:i + 3] == ["moeforge", "train"] and "-m" not in c["command"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["RUN_DIR"] == field(p.stdout, "run_dir")
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["fsx"]["persistentVolumeClaim"]["claimName"] == "fsx-claim"
    assert vols["shm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    rp = spec["runPolicy"]
    assert rp["jobMaxRetryCount"] >= 1 and set(rp["restartPolicy"]) == {
        "numRestartBeforeFullJobRestart", "evalPeriodSeconds", "maxFullJobRestarts"}
    # what was printed: the manifest, kubectl apply and the hyp command
    assert f"kubectl apply -f {path}" in p.stdout and "hyp create hyp-pytorch-job" in p.stdout


def test_eks_run_dir_defaults_to_the_fsx_volume(tmp_path):
    p = launch("hyperpod-eks", "--dry-run", "--", *TINY, cwd=tmp_path)
    run_dir = field(p.stdout, "run_dir")
    assert run_dir == f"/fsx/runs/{field(p.stdout, 'run_name')}"
    assert f"value: {run_dir}" in p.stdout and not (tmp_path / "outputs").exists()  # dry-run writes nothing
    q = launch("hyperpod-eks", "--dry-run", "--", "output_dir=rel", *TINY, cwd=tmp_path)
    assert field(q.stdout, "run_dir").startswith("/workspace/moeforge/rel/")  # relative: the image's workdir


def test_log_monitoring_regexes_match_our_metric_line(tmp_path):
    from train.metrics import HYPERPOD_PROGRESS_PATTERN, format_metric_line

    _, _, doc = _eks(tmp_path)
    rules = {r["name"]: r for r in doc["spec"]["runPolicy"]["logMonitoringConfiguration"]}
    assert rules["JobStart"]["expectedStartCutOffInSeconds"] > 0
    assert rules["JobHangingDetection"]["expectedRecurringFrequencyInSeconds"] > 0
    line = format_metric_line({"step": 12, "loss": 3.25, "lr": 3e-4, "tok_s": 1000.0, "tok_s_gpu": 125.0,
                               "mfu": 0.41, "mem_gib": 60.2, "usd_per_mtok": 0.5, "spent_usd": 1.0, "eta_s": 60.0})
    for rule in rules.values():
        assert rule["logPattern"] == HYPERPOD_PROGRESS_PATTERN
        assert re.match(rule["logPattern"], f"[rank0]: {line}")  # whole-line regexes, prefix allowed
        assert not re.match(rule["logPattern"], "fresh start: no committed checkpoint")


def test_schema_rejects_what_we_must_not_emit(tmp_path):
    import copy

    import jsonschema

    from launch.eks import validate

    _, _, doc = _eks(tmp_path)
    for breaker in (
        lambda d: d.__setitem__("apiVersion", "kubeflow.org/v1"),
        lambda d: d["spec"].pop("runPolicy"),
        lambda d: d["spec"]["runPolicy"]["logMonitoringConfiguration"][0].__setitem__("expectedStartCutOffInSeconds", 0),
        lambda d: d["spec"]["replicaSpecs"][0]["template"]["spec"]["containers"][0].__setitem__("command", ["torchrun", "-m", "train"]),
        lambda d: d["spec"]["replicaSpecs"][0]["template"]["spec"]["volumes"].pop(),  # no /dev/shm emptyDir
        lambda d: d["spec"].__setitem__("nprocPerNode", 8),
    ):
        bad = copy.deepcopy(doc)
        breaker(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


def test_hyp_command_carries_the_same_job(tmp_path):
    from launch.eks import EksJob, hyp_command

    job = EksJob(run_name="tiny-abc", run_dir="/fsx/runs/tiny-abc", overrides=["trainer.max_steps=10"], nodes=2)
    cmd = hyp_command(job)
    assert cmd[:3] == ["hyp", "create", "hyp-pytorch-job"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args["--job-name"] == "tiny-abc" and args["--instance-type"] == "ml.p5.48xlarge"
    assert args["--node-count"] == "2" and args["--tasks-per-node"] == "8"
    assert "claim_name=fsx-claim" in args["--volume"] and '"RUN_DIR": "/fsx/runs/tiny-abc"' in args["--environment"]
    assert args["--command"] == '["hyperpodrun"]' and '"train"' in args["--args"]


def test_unknown_instance_type_for_eks_is_a_config_error(tmp_path):
    p = launch("hyperpod-eks", "--instance-type", "x9.huge", "--", *TINY, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "unknown instance type" in p.stderr
