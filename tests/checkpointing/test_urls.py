"""An unsupported storage scheme fails at validation, naming the key and the supported schemes
(``ftp://`` used to reach fsspec and crash with ``socket.gaierror``)."""

from __future__ import annotations

import pytest

from checkpointing import ConfigError, validate_checkpoint_config
from checkpointing.urls import scheme
from tests.checkpointing.helpers import Cfg
from tests.train.runner import run_train

SUPPORTED = "use a local path (or an FSx/POSIX mount), file://, s3:// or memory://"


@pytest.mark.parametrize("key, value, supported", [
    ("root", "ftp://x/y", SUPPORTED),
    ("root", "gs://bucket/ckpt", SUPPORTED),
    ("resume", "ftp://x/y/step_000000010", SUPPORTED),
    ("upload_root", "ftp://x/y", "use s3:// or memory://"),
])
def test_unsupported_scheme_names_key_and_schemes(key, value, supported):
    with pytest.raises(ConfigError) as e:
        validate_checkpoint_config(Cfg(**{key: value}))
    scheme_name = value.split("://")[0]
    assert str(e.value) == f"checkpoint.{key}={value!r}: the {scheme_name}:// scheme is not supported; {supported}"


@pytest.mark.parametrize("cfg", [Cfg(root=""), Cfg(root="/fsx/ckpt"), Cfg(root="relative/dir"),
                                 Cfg(root="file:///tmp/x"), Cfg(root="s3://b/p"), Cfg(root="memory://t"),
                                 Cfg(root="/local", upload_root="s3://b/up"),
                                 Cfg(resume="s3://b/p/run/step_000000010"), Cfg(resume="/x/step_000000010")])
def test_supported_roots_pass(cfg):
    validate_checkpoint_config(cfg)


def test_upload_root_must_be_remote():
    with pytest.raises(ConfigError, match=r"checkpoint.upload_root='file:///x' must be a URL such as s3://"):
        validate_checkpoint_config(Cfg(root="/local", upload_root="file:///x"))


def test_scheme():
    assert scheme("S3://b/p") == "s3" and scheme("/a/b") is None and scheme("") is None


def test_trainer_exits_2_before_building_anything(tmp_path):
    p = run_train("checkpoint.root=ftp://x/y", f"output_dir={tmp_path}", "run_name=r", check=False, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert f"checkpoint.root='ftp://x/y': the ftp:// scheme is not supported; {SUPPORTED}" in out
    assert "gaierror" not in out and not (tmp_path / "r").exists()
