"""docs/checkpointing.md does not drift: its commands run as written, its keys exist."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

import pytest

from tests.checkpointing.test_cli import REPO

DOC = open(os.path.join(REPO, "docs", "checkpointing.md")).read()


def _commands():
    blocks = re.findall(r"```bash\n(.*?)```", DOC, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_every_checkpoint_key_is_documented():
    from checkpointing.config import CheckpointConfig

    for f in dataclasses.fields(CheckpointConfig):
        assert f"checkpoint.{f.name}" in DOC or f"  {f.name}:" in DOC, \
            f"docs/checkpointing.md: document checkpoint.{f.name}"


def test_doc_commands_run(tmp_path, s3, monkeypatch):
    """In-process (the CLI's ``main`` with the command's argv): interpreter start-up is the cost of
    a subprocess, and tests/checkpointing/test_cli.py already runs ``python -m checkpointing``."""
    import boto3

    from checkpointing import AppState, CheckpointManager
    from tests.checkpointing.helpers import Cfg
    from tests.checkpointing.test_export import _dsv3_cfg, _run_with_checkpoint

    cmds = _commands()
    assert cmds and all(c.startswith("python -m checkpointing ") for c in cmds), cmds
    # the run the doc talks about: outputs/demo with config.yaml and step 5, and its S3 twin
    (tmp_path / "outputs").mkdir()
    model, _ = _run_with_checkpoint(tmp_path / "outputs", _dsv3_cfg(0))
    os.rename(tmp_path / "outputs" / "run", tmp_path / "outputs" / "demo")
    try:
        boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1").create_bucket(Bucket="my-bucket")
    except Exception as e:  # noqa: BLE001 - moto keeps buckets across servers in one process
        assert "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e), e
    opt = __import__("torch").optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(Cfg(root="s3://my-bucket/ckpt", storage_options=s3.storage_options()),
                            "/unused", "demo")
    assert mgr.save(5, {"app": AppState(model, opt)}).committed
    from checkpointing.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the doc's commands name no endpoint
    monkeypatch.chdir(tmp_path)
    for cmd in cmds:
        args = shlex.split(cmd)
        assert args[:3] == ["python", "-m", "checkpointing"]
        assert main(args[3:]) == 0, cmd
    assert (tmp_path / "hf" / "demo" / "config.json").exists()
