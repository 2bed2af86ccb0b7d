"""HyperPod on EKS: a ``HyperPodPyTorchJob`` manifest and the equivalent ``hyp create`` command.

Nothing here talks to a cluster: ``python -m launch hyperpod-eks`` renders
``RUN_DIR/launch/hyperpodpytorchjob.yaml`` and prints ``kubectl apply -f <it>`` (and the ``hyp``
command) for you to run where kubectl/hyp are configured. launch/schema/ holds a JSON schema of
the fields we emit; tests validate every rendered manifest against it.

Recovery on EKS: the HyperPod training operator restarts pods (``runPolicy.restartPolicy``, at most
``jobMaxRetryCount`` times) when a process fails or when ``logMonitoringConfiguration`` sees no
job start / no recurring progress; the progress regex matches our metric line
(train.metrics.HYPERPOD_PROGRESS_PATTERN). Every restart runs the same command with the same
RUN_DIR on the FSx volume, so ``checkpoint.resume=auto`` continues from the newest commit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List

from launch.entry import image_program

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema", "hyperpodpytorchjob.schema.yaml")
API_VERSION = "sagemaker.amazonaws.com/v1"
KIND = "HyperPodPyTorchJob"
AGENT_PORT = 8080  # HyperPod's elastic agent listens here

# Accelerators and EFA interfaces per instance (AWS instance specs). Trainium uses the Neuron
# device plugin's resource name.
INSTANCE_RESOURCES: Dict[str, Dict[str, int]] = {
    "p4d.24xlarge": {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4},
    "p4de.24xlarge": {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4},
    "p5.48xlarge": {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32},
    "p5e.48xlarge": {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32},
    "p5en.48xlarge": {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 16},
    "g6.xlarge": {"nvidia.com/gpu": 1},
    "g6.12xlarge": {"nvidia.com/gpu": 4},
    "g6.48xlarge": {"nvidia.com/gpu": 8},
    "trn1.32xlarge": {"aws.amazon.com/neurondevice": 16, "vpc.amazonaws.com/efa": 8},
    "trn1n.32xlarge": {"aws.amazon.com/neurondevice": 16, "vpc.amazonaws.com/efa": 16},
    "trn2.48xlarge": {"aws.amazon.com/neurondevice": 16, "vpc.amazonaws.com/efa": 16},
}


@dataclass
class EksJob:
    run_name: str
    run_dir: str  # a path inside the container (on the FSx mount)
    overrides: List[str]
    instance_type: str = "p5.48xlarge"
    nodes: int = 1
    nproc_per_node: int = 0  # 0 = accelerators of the instance type
    image: str = "<account>.dkr.ecr.<region>.amazonaws.com/moeforge:latest"
    namespace: str = "default"
    workdir: str = "/workspace/moeforge"
    fsx_claim: str = "fsx-claim"
    fsx_mount: str = "/fsx"
    shm_size: str = "64Gi"
    max_retries: int = 10
    start_cutoff_s: int = 600
    hang_after_s: int = 1800
    extra_env: Dict[str, str] = field(default_factory=dict)
    # MOEFORGE_SECRET_<i> variables the overrides reference (train/redact.py): read from a Kubernetes
    # Secret named secret_name, never written into the manifest.
    secret_vars: List[str] = field(default_factory=list)

    @property
    def secret_name(self) -> str:
        return f"{self.job_name[:55]}-secrets"

    @property
    def job_name(self) -> str:
        name = re.sub(r"[^a-z0-9-]+", "-", self.run_name.lower()).strip("-")
        return (name or "moeforge")[:63].rstrip("-")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.run_dir_local or self.run_dir, "launch", "hyperpodpytorchjob.yaml")

    run_dir_local: str = ""  # where the launcher writes the manifest (this machine)


def resources(instance_type: str) -> Dict[str, int]:
    base = instance_type[3:] if instance_type.startswith("ml.") else instance_type
    if base not in INSTANCE_RESOURCES:
        raise ValueError(f"unknown instance type {instance_type!r}: one of {sorted(INSTANCE_RESOURCES)}")
    return dict(INSTANCE_RESOURCES[base])


def _accelerators(res: Dict[str, int]) -> int:
    return sum(v for k, v in res.items() if k != "vpc.amazonaws.com/efa")


def hyperpodrun_command(job: EksJob) -> List[str]:
    res = resources(job.instance_type)
    nproc = job.nproc_per_node or _accelerators(res)
    return ["hyperpodrun", f"--nnodes={job.nodes}", f"--nproc-per-node={nproc}",
            "--server-host=0.0.0.0", f"--server-port={AGENT_PORT}", "--tee=3",
            "--log_dir=/tmp/hyperpod", *image_program(), *job.overrides]


def manifest(job: EksJob) -> dict:
    from train.metrics import HYPERPOD_PROGRESS_PATTERN

    res = resources(job.instance_type)
    nproc = job.nproc_per_node or _accelerators(res)
    ml_type = job.instance_type if job.instance_type.startswith("ml.") else f"ml.{job.instance_type}"
    env = {"RUN_DIR": job.run_dir, "PYTHONPATH": job.workdir, "PYTHONUNBUFFERED": "1", **job.extra_env}
    limits = {k: v for k, v in res.items()}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.job_name, "namespace": job.namespace,
                     "labels": {"app.kubernetes.io/name": "moeforge", "moeforge/run-name": job.job_name}},
        "spec": {
            "nprocPerNode": str(nproc),
            "replicaSpecs": [{
                "name": "pods",
                "replicas": job.nodes,
                "template": {
                    "metadata": {"labels": {"job-name": job.job_name}},
                    "spec": {
                        "nodeSelector": {"node.kubernetes.io/instance-type": ml_type},
                        "containers": [{
                            "name": "trainer",
                            "image": job.image,
                            "imagePullPolicy": "Always",
                            "workingDir": job.workdir,
                            "command": hyperpodrun_command(job),
                            "env": [{"name": k, "value": v} for k, v in env.items()] + [
                                {"name": var, "valueFrom": {"secretKeyRef": {"name": job.secret_name, "key": var}}}
                                for var in job.secret_vars],
                            "ports": [{"containerPort": AGENT_PORT}],
                            "resources": {"requests": dict(limits), "limits": dict(limits)},
                            "volumeMounts": [{"name": "fsx", "mountPath": job.fsx_mount},
                                             {"name": "shm", "mountPath": "/dev/shm"}],
                        }],
                        "volumes": [
                            {"name": "fsx", "persistentVolumeClaim": {"claimName": job.fsx_claim}},
                            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}},
                        ],
                    },
                },
            }],
            "runPolicy": {
                "jobMaxRetryCount": job.max_retries,
                "restartPolicy": {"numRestartBeforeFullJobRestart": 3, "evalPeriodSeconds": 21600,
                                  "maxFullJobRestarts": 1},
                "cleanPodPolicy": "All",
                "logMonitoringConfiguration": [
                    {"name": "JobStart", "logPattern": HYPERPOD_PROGRESS_PATTERN,
                     "expectedStartCutOffInSeconds": job.start_cutoff_s},
                    {"name": "JobHangingDetection", "logPattern": HYPERPOD_PROGRESS_PATTERN,
                     "expectedRecurringFrequencyInSeconds": job.hang_after_s,
                     "expectedStartCutOffInSeconds": job.start_cutoff_s},
                ],
            },
        },
    }


def to_yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, width=120)


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError when ``doc`` breaks launch/schema (the fields we emit),
    or ValueError when a log pattern is not a valid regex."""
    import jsonschema
    import yaml

    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    jsonschema.validate(doc, schema)
    for rule in doc["spec"]["runPolicy"]["logMonitoringConfiguration"]:
        re.compile(rule["logPattern"])


def write(job: EksJob) -> str:
    doc = manifest(job)
    try:
        validate(doc)
    except ImportError:  # jsonschema is a test dependency; the tests validate every manifest
        pass
    path = job.manifest_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# Rendered by `python -m launch hyperpod-eks` for run {job.run_name}.\n")
        f.write(f"# Submit: kubectl apply -f {os.path.basename(path)}\n")
        f.write(to_yaml(doc))
    return path


def secret_command(job: EksJob) -> List[str]:
    """``kubectl create secret`` for the secret overrides' values (placeholders: fill them in)."""
    return ["kubectl", "create", "secret", "generic", job.secret_name, "--namespace", job.namespace,
            *(f"--from-literal={var}=<value>" for var in job.secret_vars)]


def kubectl_command(job: EksJob) -> List[str]:
    return ["kubectl", "apply", "-f", job.manifest_path]


def hyp_command(job: EksJob) -> List[str]:
    """The same job through the HyperPod CLI (``hyp``, sagemaker-hyperpod CLI v3)."""
    res = resources(job.instance_type)
    nproc = job.nproc_per_node or _accelerators(res)
    ml_type = job.instance_type if job.instance_type.startswith("ml.") else f"ml.{job.instance_type}"
    cmd = hyperpodrun_command(job)
    env = {"RUN_DIR": job.run_dir, "PYTHONPATH": job.workdir, "PYTHONUNBUFFERED": "1", **job.extra_env}
    return ["hyp", "create", "hyp-pytorch-job",
            "--job-name", job.job_name, "--image", job.image,
            "--instance-type", ml_type, "--node-count", str(job.nodes), "--tasks-per-node", str(nproc),
            "--namespace", job.namespace, "--pull-policy", "Always",
            "--command", json.dumps(cmd[:1]), "--args", json.dumps(cmd[1:]),
            "--environment", json.dumps(env),
            "--max-retry", str(job.max_retries),
            "--volume", f"name=fsx,type=pvc,mount_path={job.fsx_mount},claim_name={job.fsx_claim},read_only=false"]


def shell(cmd: List[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
