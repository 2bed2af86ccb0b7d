"""checkpoint.upload_root: commit locally, upload to S3 (moto) in the background, marker last;
resume takes the newest complete commit of either tier."""

from __future__ import annotations

import logging
import shutil

from checkpointing import CheckpointManager, layout
from checkpointing.storage import Storage
from tests.checkpointing.helpers import Cfg, assert_same, make, state_of, train_steps


def _mgr(tmp_path, s3, **kw):
    cfg = Cfg(root=str(tmp_path / "local"), upload_root=f"s3://{s3.bucket}/up",
              storage_options=s3.storage_options(), **kw)
    return CheckpointManager(cfg, "/unused", "run")


def test_upload_then_resume_from_remote_after_local_loss(tmp_path, s3):
    model, opt = make()
    mgr = _mgr(tmp_path, s3, keep_last=2)
    for step in (1, 2, 3):
        train_steps(model, opt, 1, seed=step)
        assert mgr.save(step, state_of(model, opt), meta={"tokens": step}).committed
    mgr.close()  # waits for the last upload
    remote = Storage(mgr.uploader.remote_run_dir, s3.storage_options())
    assert mgr.uploader.committed_steps() == [2, 3]  # retention applies on the remote tier too
    local_files = mgr.storage.files(mgr.step_path(3))
    assert remote.files(layout.step_dir(mgr.uploader.remote_run_dir, 3)) == local_files
    stats = mgr.last_save_stats()
    assert stats["ckpt_upload_ok"] == 1 and stats["ckpt_upload_step"] == 3 and stats["ckpt_upload_bytes"] > 0
    # the node is replaced: the local tier is gone
    shutil.rmtree(tmp_path / "local")
    model2, opt2 = make(seed=8)
    meta = _mgr(tmp_path, s3).load_latest(state_of(model2, opt2))
    assert meta["step"] == 3 and meta["path"].startswith("s3://")
    assert_same(model, opt, model2, opt2)
    del remote


def test_local_newer_than_remote_wins_and_failed_upload_is_logged(tmp_path, s3, caplog):
    model, opt = make()
    mgr = _mgr(tmp_path, s3)
    train_steps(model, opt, 1)
    mgr.save(1, state_of(model, opt))
    mgr.uploader.wait()
    s3.stop()  # the store goes away: step 2 commits locally, its upload fails
    train_steps(model, opt, 1)
    with caplog.at_level(logging.ERROR):
        assert mgr.save(2, state_of(model, opt)).committed
        mgr.uploader.wait()
    assert "checkpoint upload of step 2" in caplog.text and "FAILED" in caplog.text
    assert mgr.last_save_stats()["ckpt_upload_ok"] == 0
    s3.start()
    assert mgr.uploader.committed_steps() == [1]
    model2, opt2 = make(seed=8)
    meta = _mgr(tmp_path, s3).load_latest(state_of(model2, opt2))
    assert meta["step"] == 2 and not meta["path"].startswith("s3://")
    assert_same(model, opt, model2, opt2)
    # a remote step without its marker (upload died before it) is not a candidate
    train_steps(model, opt, 1)
    mgr.save(3, state_of(model, opt))
    mgr.close()
    remote = Storage(mgr.uploader.remote_run_dir, s3.storage_options())
    remote.rm_file(layout.join(layout.step_dir(mgr.uploader.remote_run_dir, 3), layout.COMMIT_MARKER))
    shutil.rmtree(tmp_path / "local")
    meta = _mgr(tmp_path, s3).load_latest(state_of(*make(seed=9)))
    assert meta["step"] == 1 and meta["path"].startswith("s3://")
