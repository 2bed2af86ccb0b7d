"""checkpointing/atomic.py: write-then-rename for local paths and fsspec URLs."""

from __future__ import annotations

import os
import stat
import uuid

import fsspec
import pytest

from checkpointing.atomic import atomic_write_bytes, atomic_write_text, publish_dir


def test_local_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    atomic_write_text(str(target), "old")
    atomic_write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(os.listdir(target.parent)) == ["meta.json"]  # no temp file left behind
    atomic_write_text("file://" + str(target), "via url")
    assert target.read_text() == "via url"


def test_local_mode_is_set_before_the_file_appears(tmp_path):
    target = tmp_path / "job.sbatch"
    atomic_write_text(str(target), "#!/bin/bash\n", mode=0o755)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_failing_write_keeps_the_old_target_and_no_partial(tmp_path):
    target = tmp_path / "marker"
    atomic_write_text(str(target), "committed")
    with pytest.raises(TypeError):  # fails after the temp file exists, before the rename
        atomic_write_bytes(str(target), ["not", "bytes"])  # type: ignore[arg-type]
    assert target.read_text() == "committed"
    assert os.listdir(tmp_path) == ["marker"]


def test_failing_first_write_leaves_no_target(tmp_path):
    target = tmp_path / "never"
    with pytest.raises(TypeError):
        atomic_write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_memory_url_write_and_overwrite():
    url = f"memory://atomic-{uuid.uuid4().hex}/a/b.json"
    atomic_write_text(url, "one")
    atomic_write_bytes(url, b"two")
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(url) == b"two"
    assert fs.ls(url.rsplit("/", 1)[0], detail=False) == [fs._strip_protocol(url)]


def test_failing_memory_write_leaves_no_target():
    url = f"memory://atomic-{uuid.uuid4().hex}/never.json"
    with pytest.raises(TypeError):
        atomic_write_bytes(url, 12345)  # type: ignore[arg-type]
    assert not fsspec.filesystem("memory").exists(url)


def test_publish_dir_first_wins(tmp_path):
    final = tmp_path / "built"
    for i in range(2):
        tmp = tmp_path / f".tmp{i}"
        tmp.mkdir()
        (tmp / "index.json").write_text(str(i))
        assert publish_dir(str(tmp), str(final), marker="index.json") is (i == 0)
        assert not tmp.exists()
    assert (final / "index.json").read_text() == "0"
