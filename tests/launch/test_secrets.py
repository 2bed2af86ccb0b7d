"""Secrets stay out of files (train/redact.py): secrets planted in overrides (by key, and by value:
an AWS key id, user:pass@ in a URL, a bearer token) and in the environment appear in no file
under the run directory and in no log, whether the run is launched (local, Slurm script, EKS
manifest) or started directly; the launched job still gets the real values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.common import REPO, TINY, env, field, launch
from tests.webhook_server import RecordingServer
from train.redact import protect_overrides, redact_command, redact_secrets, redact_text

SECRET_OVERRIDES = [
    "+data.storage_options.aws_secret_access_key=plantedKeySecret0001",  # a secret key
    "+data.storage_options.profile=AKIAPLANTED000000002",  # an AWS key id under a plain key
    "+data.storage_options.endpoint_url=https://planteduser:plantedPass0003@s3.example.com",  # user:pass@
    "+data.storage_options.headers.x_auth='Bearer plantedBearer0004'",  # a bearer token
]
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": "plantedEnvSecret0007", "HF_TOKEN": "plantedEnvToken0008",
              "MY_SERVICE_PASSWORD": "plantedEnvPass0009"}
PLANTED = ["plantedKeySecret0001", "AKIAPLANTED000000002", "plantedPass0003", "plantedBearer0004",
           "plantedWebhook0005", *SECRET_ENV.values()]


def _leaks(root: Path, *texts: str) -> list:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {p}" for p in PLANTED if p.encode() in data]
    for i, text in enumerate(texts):
        found += [f"output {i}: {p}" for p in PLANTED if p in text]
    return found


def test_redaction_by_key_and_by_value():
    assert redact_text("s3 key AKIAIOSFODNN7EXAMPLE and ASIAIOSFODNN7EXAMPLE") == "s3 key <redacted> and <redacted>"
    assert redact_text("https://me:pw@host/x") == "https://<redacted>@host/x"
    assert redact_text("Authorization: Bearer abc.def-123") == "Authorization: Bearer <redacted>"
    tree = redact_secrets({"HF_TOKEN": "t", "db_password": "p", "Authorization": "a", "alert_webhook": "https://h",
                           "url": "https://u:p@h", "tokenizer": "byte", "keep_last": 3, "empty_key": ""})
    assert tree == {"HF_TOKEN": "<redacted>", "db_password": "<redacted>", "Authorization": "<redacted>",
                    "alert_webhook": "<redacted>", "url": "https://<redacted>@h", "tokenizer": "byte",
                    "keep_last": 3, "empty_key": ""}
    assert redact_command(["torchrun", "+x.api_key=abc", "y=https://u:p@h"]) == [
        "torchrun", "+x.api_key=<redacted>", "y=https://<redacted>@h"]
    safe, values = protect_overrides(["a=1", "+x.secret='s p'", "u=https://u:p@h", "+y.token={k: v}"])
    assert safe == ["a=1", "+x.secret=${oc.env:MOEFORGE_SECRET_0}", "u=${oc.env:MOEFORGE_SECRET_1}",
                    "+y.token='${oc.decode:${oc.env:MOEFORGE_SECRET_2}}'"]
    assert values == {"MOEFORGE_SECRET_0": "s p", "MOEFORGE_SECRET_1": "https://u:p@h",
                      "MOEFORGE_SECRET_2": "{k: v}"}


def test_protected_overrides_compose_to_the_real_values(monkeypatch):
    from launch.config import compose

    safe, values = protect_overrides([*SECRET_OVERRIDES, "logging.alert_webhook='http://h/x?token=plantedWebhook0005'",
                                      "+data.storage_options.client_kwargs={region_name: AKIAPLANTED000000002}"])
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    cfg = compose(safe).cfg
    so = cfg.data.storage_options
    assert so["headers"]["x_auth"] == "Bearer plantedBearer0004" and so["profile"] == "AKIAPLANTED000000002"
    assert cfg.logging.alert_webhook == "http://h/x?token=plantedWebhook0005"
    assert so["client_kwargs"] == {"region_name": "AKIAPLANTED000000002"}


@pytest.mark.parametrize("target", ["slurm", "hyperpod-eks"])
def test_rendered_jobs_hold_no_secret(tmp_path, target):
    overrides = [*SECRET_OVERRIDES, "logging.alert_webhook='http://h/x?token=plantedWebhook0005'", *TINY]
    extra = ["--run-dir", str(tmp_path / "run")] if target == "hyperpod-eks" else []
    p = launch(target, *extra, "--dry-run", "--", *overrides, cwd=tmp_path)
    assert not _leaks(tmp_path, p.stdout, p.stderr), _leaks(tmp_path, p.stdout, p.stderr)
    assert "${oc.env:MOEFORGE_SECRET_0}" in p.stdout and "MOEFORGE_SECRET_4" in p.stdout
    if target == "slurm":
        script = Path(field(p.stdout, "script")).read_text()
        assert "MOEFORGE_SECRET_3" in script
    else:
        assert "secretKeyRef" in p.stdout and "kubectl create secret generic" in p.stdout


@pytest.mark.slow
def test_launched_and_direct_runs_leave_no_secret_anywhere(tmp_path):
    """`python -m launch local` (torchrun), then `python -m train` directly, both with W&B offline:
    the run directory (config.yaml, logs, metrics, W&B files, checkpoints) and both outputs are
    clean, and the launched job got the real webhook URL (its token reached the server)."""
    with RecordingServer() as srv:
        hook = f"logging.alert_webhook='{srv.url}?token=plantedWebhook0005'"  # quoted: '=' in the value
        common = [*SECRET_OVERRIDES, hook, *TINY, "trainer.max_steps=3", "cost.price_per_hour=36",
                  "cost.budget_usd=100", "cost.alert_fractions=[0.00001]", "logging.wandb=true"]
        e = env(WANDB_MODE="offline", WANDB_SILENT="true", **SECRET_ENV)
        p = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc-per-node", "1", "--",
                            *common, f"output_dir={tmp_path / 'launched'}"], cwd=tmp_path, env=e,
                           capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        q = subprocess.run([sys.executable, "-m", "train", *common, f"output_dir={tmp_path / 'direct'}"],
                           cwd=tmp_path, env=e, capture_output=True, text=True, timeout=400)
        assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
        paths = list(srv.paths)
    assert len(paths) >= 2 and all(x.endswith("?token=plantedWebhook0005") for x in paths), paths
    leaks = _leaks(tmp_path, p.stdout, p.stderr, q.stdout, q.stderr)
    assert not leaks, leaks
    configs = list(tmp_path.rglob("config.yaml"))
    assert len(configs) == 2 and all("<redacted>" in c.read_text() for c in configs)
    assert list(tmp_path.rglob("*.wandb"))  # W&B ran, and its files were searched too


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_job_gets_its_secrets_through_the_environment(tmp_path, slurm_cluster):
    """A real sbatch on the project's local Slurm: the script holds only references, the job still
    posts to the secret webhook URL (sbatch passed the launcher's environment on), and nothing under
    the run directory, the Slurm log included, holds a planted value."""
    from tests.launch.common import wait_job

    with RecordingServer() as srv:
        hook = f"logging.alert_webhook='{srv.url}?token=plantedWebhook0005'"
        p = launch("slurm", "--nproc-per-node", "1", "--cpus-per-task", "1", "--", *SECRET_OVERRIDES, hook, *TINY,
                   "trainer.max_steps=2", "cost.price_per_hour=36", "cost.budget_usd=100",
                   "cost.alert_fractions=[0.00001]", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
        job, run_dir = field(p.stdout, "job_id"), Path(field(p.stdout, "run_dir"))
        state = wait_job(job, 240)
        paths = list(srv.paths)
    log = run_dir / f"slurm-{job}.out"
    assert state == "COMPLETED", log.read_text(errors="replace")[-3000:] if log.exists() else state
    assert paths and all(x.endswith("?token=plantedWebhook0005") for x in paths), paths
    leaks = _leaks(tmp_path, p.stdout, p.stderr)
    assert not leaks, leaks
