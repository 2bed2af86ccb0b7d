"""checkpoint.root=s3://... against moto's S3 server on loopback, through s3fs."""

from __future__ import annotations

import logging

import pytest

from checkpointing import CheckpointError, CheckpointManager, layout
from checkpointing.state import AppState
from checkpointing.storage import Storage, fsspec_options, is_transient, retry
from tests.checkpointing.helpers import Cfg, assert_same, make, state_of, train_steps


def _mgr(s3, **kw):
    cfg = Cfg(root=f"s3://{s3.bucket}/ckpts", storage_options=s3.storage_options(), **kw)
    return CheckpointManager(cfg, "/unused", "run")


def test_fsspec_options_mapping(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    opts = fsspec_options("s3://b/p", {"region": "eu-west-1", "profile": "p", "retries": 2})
    assert opts == {"endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "eu-west-1"},
                    "profile": "p"}
    assert fsspec_options("s3://b/p", {"endpoint_url": "http://x"})["endpoint_url"] == "http://x"
    assert fsspec_options("/local/dir", {"endpoint_url": "http://x"}) == {}


def test_retry_transient_only(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert retry(flaky, "list(s3://b/p)", retries=3, backoff_s=0.001) == "ok"
    assert len(calls) == 3 and "retry 2/3" in caplog.text and "list(s3://b/p)" in caplog.text

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/p/COMMITTED")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry(missing, "exists", retries=3, backoff_s=0.001)
    assert len(calls) == 1  # an answer, not a glitch: no retry
    with pytest.raises(ConnectionError):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("down")), "x", retries=1, backoff_s=0.001)
    assert not is_transient(PermissionError("denied")) and is_transient(TimeoutError())


def test_s3_round_trip_and_resume_newest_committed(s3):
    model, opt = make()
    mgr = _mgr(s3)
    for step in (1, 2, 3):
        train_steps(model, opt, 1, seed=step)
        res = mgr.save(step, state_of(model, opt), meta={"tokens": step}, trainer_state={"s": step})
        assert res.committed and res.bytes > 0 and res.path.startswith("s3://")
    # a newer step directory whose save died before its marker: resume must skip it
    st = Storage(mgr.run_dir, s3.storage_options())
    st.rm_file(layout.join(mgr.step_path(3), layout.COMMIT_MARKER))
    assert mgr.committed_steps() == [1, 2]
    model2, opt2 = make(seed=9)
    meta = _mgr(s3).load_latest(state_of(model2, opt2))
    assert meta["step"] == 2 and meta["trainer_state"] == {"s": 2}
    # bitwise: reload step 2 into a third model and compare with the second
    model3, opt3 = make(seed=11)
    _mgr(s3).load(mgr.step_path(2), state_of(model3, opt3))
    assert_same(model2, opt2, model3, opt3)
    # and the same bytes as the live model had at step 2? Save it again under a new step: equal.
    model4, opt4 = make(seed=1)
    _mgr(s3, resume=mgr.step_path(1)).load_latest(state_of(model4, opt4))
    train_steps(model4, opt4, 1, seed=2)
    assert_same(model2, opt2, model4, opt4)


def test_s3_thread_async_round_trip(s3):
    model, opt = make()
    mgr = _mgr(s3, async_mode="thread")
    train_steps(model, opt, 2)
    mgr.save(2, state_of(model, opt))
    mgr.wait()
    done = mgr.wait_committed()
    assert done.committed and done.bytes > 0 and done.commit_s >= done.staging_s
    mgr.close()
    model2, opt2 = make(seed=5)
    assert _mgr(s3).load_latest(state_of(model2, opt2))["step"] == 2
    assert_same(model, opt, model2, opt2)


class _StopServerWhenRead(AppState):
    """Stops the S3 server while the save is under way: after the step directory was prepared,
    before DCP writes a byte."""

    def __init__(self, model, opt, server):
        super().__init__(model, opt)
        self.server = server

    def state_dict(self):
        self.server.stop()
        return super().state_dict()


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_s3_outage_during_save_leaves_no_marker_and_next_save_succeeds(s3, caplog, policy):
    model, opt = make()
    mgr = _mgr(s3, on_save_error=policy)
    train_steps(model, opt, 1)
    assert mgr.save(1, state_of(model, opt)).committed
    train_steps(model, opt, 1)
    state = {**state_of(model, opt), "app": _StopServerWhenRead(model, opt, s3)}
    with caplog.at_level(logging.ERROR):
        if policy == "stop":
            with pytest.raises(CheckpointError, match="step_000000002"):
                mgr.save(2, state)
        else:
            res = mgr.save(2, state)
            assert not res.committed and "step_000000002" in res.error
            assert mgr.last_save_stats()["ckpt_ok"] == 0
    assert not s3.running
    assert any("checkpoint save of step 2 FAILED" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)
    s3.start()
    assert mgr.committed_steps() == [1]  # no marker for step 2
    res = mgr.save(3, state_of(model, opt))  # the server is back: this one commits
    assert res.committed and mgr.committed_steps() == [1, 3]
    model2, opt2 = make(seed=4)
    assert _mgr(s3).load_latest(state_of(model2, opt2))["step"] == 3
    assert_same(model, opt, model2, opt2)


def test_s3_listing_error_is_reported_not_read_as_empty(s3):
    """Server down at resume: an error naming the store, never a silent fresh start."""
    model, opt = make()
    _mgr(s3).save(1, state_of(model, opt))
    mgr = _mgr(s3)
    s3.stop()
    with pytest.raises(Exception) as info:
        mgr.load_latest(state_of(*make()))
    assert "Could not connect" in str(info.value) or "connect" in str(info.value).lower()


def test_s3_outage_during_async_write_fails_that_save_only(s3, caplog):
    model, opt = make()
    mgr = _mgr(s3, async_mode="thread", on_save_error="continue")
    mgr.save(1, state_of(model, opt))
    assert mgr.wait_committed().committed
    state = {**state_of(model, opt), "app": _StopServerWhenRead(model, opt, s3)}
    started = mgr.save(2, state)  # staged to host memory; the write fails in the background
    assert not started.committed and started.error is None
    with caplog.at_level(logging.ERROR):
        done = mgr.wait_committed()
    assert not done.committed and "step_000000002" in caplog.text and done.error
    assert mgr.last_save_stats()["ckpt_ok"] == 0
    s3.start()
    assert mgr.committed_steps() == [1]
    mgr.save(3, state_of(model, opt))
    assert mgr.wait_committed().committed
    mgr.close()
    assert mgr.committed_steps() == [1, 3]
