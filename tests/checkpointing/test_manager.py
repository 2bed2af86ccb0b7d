import copy
import json
import logging
import os
import uuid

import fsspec
import pytest
import torch

from checkpointing import CheckpointError, CheckpointManager, ConfigError, RNGState, layout
from checkpointing import commit as commit_mod
from checkpointing.resume import resolve_resume
from checkpointing.storage import Storage
from tests.checkpointing.helpers import Cfg, assert_same, make, state_of, train_steps

TRAINER_STATE = {"samples_consumed": 96, "lr_schedule": {"last_epoch": 3}, "cost": {"usd": 0.25},
                 "wandb_run_id": "abc123"}


def _mgr(tmp_path, **kw):
    return CheckpointManager(Cfg(**kw), str(tmp_path), "run")


def _save_at(mgr, step, model, opt):
    return mgr.save(step, state_of(model, opt), meta={"tokens": step * 100, "samples_consumed": step * 4},
                    trainer_state=TRAINER_STATE)


def _corrupt(step_dir):
    shards = [f for f in os.listdir(step_dir) if f.endswith(".distcp")]
    assert shards
    for f in shards:
        with open(os.path.join(step_dir, f), "r+b") as fh:
            fh.truncate(os.path.getsize(os.path.join(step_dir, f)) // 3)


def test_round_trip_is_bitwise_exact(tmp_path):
    model, opt = make()
    train_steps(model, opt, 3)
    mgr = _mgr(tmp_path)
    res = _save_at(mgr, 3, model, opt)
    assert res.path == str(tmp_path / "run" / "step_000000003") and res.bytes > 0 and res.committed
    files = set(os.listdir(res.path))
    assert {layout.COMMIT_MARKER, layout.META_FILE, layout.TRAINER_STATE_FILE, ".metadata"} <= files

    model2, opt2 = make(seed=99)  # different init, optimizer without state
    meta = _mgr(tmp_path).load_latest(state_of(model2, opt2))
    assert meta["step"] == 3 and meta["tokens"] == 300 and meta["world_size"] == 1
    assert meta["trainer_state"] == TRAINER_STATE and meta["path"] == res.path
    assert_same(model, opt, model2, opt2)
    # and training continues identically
    train_steps(model, opt, 2, seed=5)
    train_steps(model2, opt2, 2, seed=5)
    assert_same(model, opt, model2, opt2)


def test_rng_state_round_trip(tmp_path):
    import random
    model, opt = make()
    mgr = _mgr(tmp_path)
    torch.manual_seed(7)
    random.seed(7)
    state = {**state_of(model, opt), "rng": RNGState(rank=0)}
    mgr.save(1, state)
    expect_t, expect_p = torch.rand(3), random.random()
    torch.manual_seed(0)
    random.seed(0)
    model2, opt2 = make()
    _mgr(tmp_path).load_latest({**state_of(model2, opt2), "rng": RNGState(rank=0)})
    assert torch.equal(torch.rand(3), expect_t) and random.random() == expect_p


def test_fresh_start_and_resume_none(tmp_path):
    model, opt = make()
    assert _mgr(tmp_path).load_latest(state_of(model, opt)) is None
    _save_at(_mgr(tmp_path), 1, model, opt)
    assert _mgr(tmp_path, resume="none").load_latest(state_of(model, opt)) is None


def test_newest_committed_wins_and_unmarked_dir_is_skipped(tmp_path, caplog):
    model, opt = make()
    mgr = _mgr(tmp_path)
    for step in (2, 4):
        train_steps(model, opt, 1)
        _save_at(mgr, step, model, opt)
    # a newer save that died before its marker
    train_steps(model, opt, 1)
    _save_at(mgr, 6, model, opt)
    os.remove(os.path.join(mgr.step_path(6), layout.COMMIT_MARKER))
    assert mgr.committed_steps() == [2, 4]
    assert commit_mod.list_uncommitted(mgr.storage, mgr.run_dir) == [6]
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", mgr.run_dir) == mgr.step_path(4)
    assert "step_000000006" in caplog.text
    model2, opt2 = make(seed=3)
    assert _mgr(tmp_path).load_latest(state_of(model2, opt2))["step"] == 4


def test_explicit_path(tmp_path):
    model, opt = make()
    mgr = _mgr(tmp_path)
    _save_at(mgr, 1, model, opt)
    train_steps(model, opt, 1)
    _save_at(mgr, 2, model, opt)
    mgr2 = _mgr(tmp_path, resume=mgr.step_path(1))
    assert mgr2.load_latest(state_of(*make(seed=4)))["step"] == 1
    with pytest.raises(CheckpointError, match="step_000000009"):
        _mgr(tmp_path, resume=mgr.step_path(9)).load_latest(state_of(*make()))
    with pytest.raises(CheckpointError, match="run directory"):
        _mgr(tmp_path, resume=mgr.run_dir).load_latest(state_of(*make()))


def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog):
    model, opt = make()
    mgr = _mgr(tmp_path)
    train_steps(model, opt, 2)
    _save_at(mgr, 2, model, opt)
    ref_model, ref_opt = make(seed=50)
    ref_model.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # "step" tensors would alias
    train_steps(model, opt, 2)
    _save_at(mgr, 4, model, opt)
    _corrupt(mgr.step_path(4))
    model2, opt2 = make(seed=8)
    with caplog.at_level(logging.WARNING):
        meta = _mgr(tmp_path).load_latest(state_of(model2, opt2))
    assert meta["step"] == 2
    assert "step_000000004" in caplog.text
    assert_same(ref_model, ref_opt, model2, opt2)


def test_all_corrupt_raises(tmp_path):
    model, opt = make()
    mgr = _mgr(tmp_path)
    for step in (1, 2):
        train_steps(model, opt, 1)
        _save_at(mgr, step, model, opt)
        _corrupt(mgr.step_path(step))
    with pytest.raises(CheckpointError, match="all 2 committed checkpoints") as ei:
        _mgr(tmp_path).load_latest(state_of(*make()))
    assert "step_000000001" in str(ei.value) and "step_000000002" in str(ei.value)


def test_missing_meta_counts_as_failed_load(tmp_path):
    model, opt = make()
    mgr = _mgr(tmp_path)
    _save_at(mgr, 1, model, opt)
    os.remove(os.path.join(mgr.step_path(1), layout.META_FILE))
    with pytest.raises(CheckpointError, match="meta.json"):
        _mgr(tmp_path).load_latest(state_of(*make()))


def test_failure_between_shards_and_marker_leaves_no_marker(tmp_path, monkeypatch):
    model, opt = make()
    mgr = _mgr(tmp_path)
    _save_at(mgr, 1, model, opt)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(commit_mod, "write_marker", boom)
    with pytest.raises(CheckpointError, match="step_000000002.*disk full"):
        _save_at(mgr, 2, model, opt)
    d = mgr.step_path(2)
    assert any(f.endswith(".distcp") for f in os.listdir(d))  # shards are there ...
    assert os.path.exists(os.path.join(d, layout.META_FILE))
    assert not os.path.exists(os.path.join(d, layout.COMMIT_MARKER))  # ... but no commit
    assert mgr.committed_steps() == [1]
    monkeypatch.undo()
    # the next save at that step cleans the leftovers and commits
    assert _save_at(mgr, 2, model, opt).committed and mgr.committed_steps() == [1, 2]


def test_failure_in_shard_write_leaves_no_meta_or_marker(tmp_path, monkeypatch):
    from checkpointing import _dcp

    def boom(*a, **k):
        raise OSError("EIO")

    monkeypatch.setattr(_dcp.dcp, "save", boom)
    mgr = _mgr(tmp_path)
    with pytest.raises(CheckpointError, match="EIO"):
        _save_at(mgr, 1, *make())
    d = mgr.step_path(1)
    assert not os.path.exists(os.path.join(d, layout.COMMIT_MARKER))
    assert not os.path.exists(os.path.join(d, layout.META_FILE))


def test_retention_applied_after_commit(tmp_path):
    model, opt = make()
    mgr = _mgr(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 7):
        _save_at(mgr, step, model, opt)
    assert mgr.committed_steps() == [4, 5, 6]
    assert sorted(os.listdir(mgr.run_dir)) == [layout.step_dir_name(s) for s in (4, 5, 6)]


def test_resaving_a_committed_step_is_a_no_op(tmp_path):
    model, opt = make()
    mgr = _mgr(tmp_path)
    _save_at(mgr, 3, model, opt)
    marker = os.path.join(mgr.step_path(3), layout.COMMIT_MARKER)
    before = os.stat(marker).st_mtime_ns
    res = _save_at(mgr, 3, model, opt)
    assert res.committed and os.stat(marker).st_mtime_ns == before


def test_non_tensor_objects_are_refused(tmp_path):
    model, opt = make()
    with pytest.raises(CheckpointError, match="extra.when"):
        _mgr(tmp_path).save(1, {**state_of(model, opt), "extra": {"when": object()}})


def test_meta_and_trainer_state_are_json(tmp_path):
    model, opt = make()
    res = _save_at(_mgr(tmp_path), 1, model, opt)
    meta = json.load(open(os.path.join(res.path, layout.META_FILE)))
    assert meta["samples_consumed"] == 4 and meta["versions"]["torch"] == torch.__version__
    assert json.load(open(os.path.join(res.path, layout.TRAINER_STATE_FILE))) == TRAINER_STATE


def test_memory_filesystem(tmp_path):
    """memory:// stands in for an object store: no rename, no fsync, no real directories."""
    root = f"memory://ckpt-{uuid.uuid4().hex[:8]}"
    model, opt = make()
    train_steps(model, opt, 2)
    mgr = CheckpointManager(Cfg(root=root, keep_last=2), str(tmp_path), "run")
    assert not mgr.storage.is_local
    for step in (1, 2, 3):
        _save_at(mgr, step, model, opt)
    assert mgr.committed_steps() == [2, 3]
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{root}/run/step_000000003/{layout.COMMIT_MARKER}")
    assert not fs.exists(f"{root}/run/step_000000001")
    # an unmarked step is skipped here too
    fs.rm(f"{root}/run/step_000000003/{layout.COMMIT_MARKER}")
    model2, opt2 = make(seed=11)
    meta = CheckpointManager(Cfg(root=root), str(tmp_path), "run").load_latest(state_of(model2, opt2))
    assert meta["step"] == 2
    assert_same(model, opt, model2, opt2)


def test_storage_write_atomic_local(tmp_path):
    st = Storage(str(tmp_path))
    target = str(tmp_path / "a" / "f.json")
    st.write_atomic(target, b"one")
    st.write_atomic(target, b"two")
    assert open(target, "rb").read() == b"two"
    assert os.listdir(tmp_path / "a") == ["f.json"]  # no temp files left behind


def test_config_errors(tmp_path, caplog):
    # no process group here: DCP's daemon needs one, so a single process writes from moeforge's own
    # writer process (checkpointing/writer_process.py) rather than falling back to a thread
    mgr = _mgr(tmp_path, async_mode="process")
    try:
        assert mgr._async_mode == "process" and mgr._writer_proc is not None
    finally:
        mgr.close()
    with pytest.raises(ConfigError, match="checkpoint.on_save_error='maybe'"):
        _mgr(tmp_path, on_save_error="maybe")
    with pytest.raises(ConfigError, match="checkpoint.upload_root"):
        _mgr(tmp_path, upload_root="/not/a/url")
    with pytest.raises(ConfigError, match="checkpoint.async_mode='bogus'"):
        _mgr(tmp_path, async_mode="bogus")
    with pytest.raises(ConfigError, match="checkpoint.keep_last=-1"):
        _mgr(tmp_path, keep_last=-1)


def test_three_consecutive_thread_async_saves(tmp_path):
    model, opt = make()
    mgr = _mgr(tmp_path, async_mode="thread", keep_last=2)
    snapshots = {}
    for step in (1, 2, 3):
        train_steps(model, opt, 1, seed=step)
        res = _save_at(mgr, step, model, opt)
        assert not res.committed
        mgr.wait()  # staged: the optimizer may now change the parameters
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        train_steps(model, opt, 1, seed=10 + step)  # mutate while the upload may still run
    done = mgr.wait_committed()
    assert done.step == 3 and done.bytes > 0
    mgr.close()
    assert mgr.committed_steps() == [2, 3]
    model2, opt2 = make(seed=12)
    meta = _mgr(tmp_path).load_latest(state_of(model2, opt2))
    assert meta["step"] == 3 and meta["trainer_state"] == TRAINER_STATE
    for k, v in model2.state_dict().items():
        assert torch.equal(v, snapshots[3][k]), k


class NotATensor:
    pass


def test_pickled_objects_in_a_checkpoint_are_refused_on_load(tmp_path):
    """A checkpoint written by someone else with a pickled object must not run code on load."""
    import torch.distributed.checkpoint as dcp
    mgr = _mgr(tmp_path)
    path = mgr.step_path(1)
    dcp.save({"x": {"obj": NotATensor(), "t": torch.ones(2)}}, checkpoint_id=path, no_dist=True)
    commit_mod.write_commit(mgr.storage, path, layout.build_meta(1, 1, {}))
    expected = r"step_000000001.*x\.obj holds a pickled object \(tests.checkpointing.test_manager.NotATensor\)"
    with pytest.raises(CheckpointError, match=expected):
        mgr.load(path, {"x": {"obj": None, "t": torch.zeros(2)}})


def test_file_url_and_relative_root(tmp_path, monkeypatch):
    model, opt = make()
    mgr = CheckpointManager(Cfg(root=f"file://{tmp_path}/ck"), str(tmp_path), "run")
    _save_at(mgr, 1, model, opt)
    assert os.path.exists(tmp_path / "ck" / "run" / "step_000000001" / layout.COMMIT_MARKER)
    monkeypatch.chdir(tmp_path)
    rel = CheckpointManager(Cfg(), "outputs", "run")
    _save_at(rel, 1, model, opt)
    assert rel.committed_steps() == [1]
    assert _mgr(tmp_path / "outputs").load_latest(state_of(*make(seed=2)))["step"] == 1


def test_app_state_shape_used_by_the_trainer(tmp_path):
    from checkpointing import AppState
    model, opt = make()
    train_steps(model, opt, 2)
    _mgr(tmp_path).save(2, {"app": AppState(model, opt)}, meta={"tokens": 1}, trainer_state={"step": 2})
    model2, opt2 = make(seed=6)
    meta = _mgr(tmp_path).load_latest({"app": AppState(model2, opt2)})
    assert meta["trainer_state"] == {"step": 2}
    assert_same(model, opt, model2, opt2)
