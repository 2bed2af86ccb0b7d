"""Engine-format checkpoints (``checkpointing.engine_state``) through the real CheckpointManager and
``python -m checkpointing verify``, with a stand-in engine that writes files the way DeepSpeed does
(its own files under the step directory): commit, retention, verify, fallback to an older step when
a file is damaged, and the errors for a checkpoint of the other format. No DeepSpeed needed: the
DeepSpeed engine itself is exercised end to end in tests/dist/test_deepspeed.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from checkpointing import CheckpointError, CheckpointManager, layout
from checkpointing.cli import main as cli_main
from checkpointing.engine_state import EngineState
from tests.checkpointing.helpers import Cfg, make, state_of


class FakeEngineState(EngineState):
    """Writes ``engine/weights.pt`` and ``engine/rank0.pt``; loads them back into ``self.value``."""

    format = "fake"

    def __init__(self, value: float = 0.0):
        self.value = value
        self.loaded = None

    def expected_files(self, world_size):
        return ["engine/weights.pt"] + [f"engine/rank{r}.pt" for r in range(world_size)]

    def info(self):
        return {"tag": "engine"}

    def save(self, step_dir):
        os.makedirs(os.path.join(step_dir, "engine"), exist_ok=True)
        torch.save({"w": torch.full((64,), self.value)}, os.path.join(step_dir, "engine", "weights.pt"))
        torch.save({"r": 0}, os.path.join(step_dir, "engine", "rank0.pt"))

    def load(self, step_dir, meta):
        self.loaded = float(torch.load(os.path.join(step_dir, "engine", "weights.pt"))["w"][0])


def _manager(tmp_path, **kw):
    return CheckpointManager(Cfg(root=str(tmp_path), **kw), str(tmp_path), "run")


def _verify(path) -> int:
    return cli_main(["verify", str(path)])


def test_commit_meta_retention_and_resume(tmp_path, capsys):
    mgr = _manager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        res = mgr.save(step, FakeEngineState(float(step)), {"tokens": step * 10}, trainer_state={"step": step})
        assert res.committed and res.error is None
    run = tmp_path / "run"
    assert mgr.committed_steps() == [2, 3]  # retention works on engine step directories as on DCP ones
    meta = json.loads((run / "step_000000003" / layout.META_FILE).read_text())
    assert meta["engine"]["format"] == "fake" and meta["engine"]["world_size"] == 1
    assert set(meta["engine"]["files"]) == {"engine/weights.pt", "engine/rank0.pt"}
    assert _verify(run) == 0
    assert "OK   " in capsys.readouterr().out
    state = FakeEngineState()
    loaded = mgr.load_latest(state)
    assert loaded["step"] == 3 and loaded["trainer_state"] == {"step": 3} and state.loaded == 3.0


def test_damaged_file_fails_verify_and_resume_falls_back(tmp_path, capsys):
    mgr = _manager(tmp_path, keep_last=5)
    for step in (1, 2):
        mgr.save(step, FakeEngineState(float(step)), {})
    weights = tmp_path / "run" / "step_000000002" / "engine" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated after the commit
    assert _verify(tmp_path / "run") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "engine/weights.pt" in out and "lists" in out
    state = FakeEngineState()
    assert mgr.load_latest(state)["step"] == 1 and state.loaded == 1.0  # the older commit, said in a warning
    weights.unlink()
    with pytest.raises(CheckpointError, match="engine/weights.pt: missing"):
        mgr.load(str(tmp_path / "run" / "step_000000002"), FakeEngineState())


def test_a_missing_expected_file_is_never_committed(tmp_path):
    class Lazy(FakeEngineState):
        def save(self, step_dir):
            super().save(step_dir)
            os.remove(os.path.join(step_dir, "engine", "rank0.pt"))

    mgr = _manager(tmp_path, keep_last=5)
    with pytest.raises(CheckpointError, match="left no engine/rank0.pt"):
        mgr.save(1, Lazy(1.0), {})
    assert mgr.committed_steps() == []


def test_engine_and_dcp_checkpoints_refuse_each_other(tmp_path):
    mgr = _manager(tmp_path, keep_last=5)
    model, opt = make()
    mgr.save(1, state_of(model, opt), {})
    mgr.save(2, FakeEngineState(2.0), {})
    with pytest.raises(CheckpointError, match=r"holds DCP shards \(parallel.engine=fsdp2\)"):
        mgr.load(str(tmp_path / "run" / "step_000000001"), FakeEngineState())
    with pytest.raises(CheckpointError, match="was written by fake"):
        mgr.load(str(tmp_path / "run" / "step_000000002"), state_of(model, opt))


def test_engine_saves_are_synchronous_and_local(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.async_mode=off"):
        _manager(tmp_path, async_mode="thread").save(1, FakeEngineState(), {})
    mgr = CheckpointManager(Cfg(root="memory://engine-test"), str(tmp_path), "run")
    with pytest.raises(CheckpointError, match="local path or a POSIX mount"):
        mgr.save(1, FakeEngineState(), {})
