"""Crafted checkpoint pickles never run: a DCP ``.metadata`` and a DeepSpeed ``*.pt`` with an
``os.system`` / ``exec`` payload that would create a marker file. The payload's marker never
appears; the load stops with UnsafeCheckpointError naming the file and the refused global, and
``resume=auto`` does not fall back past it. (The same through ``python -m train``:
tests/checkpointing/test_safe_resume.py.)"""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from checkpointing import CheckpointError, CheckpointManager, layout
from checkpointing import commit as commit_mod
from checkpointing import safe_pickle
from checkpointing.cli import main as checkpointing_cli
from checkpointing.errors import UnsafeCheckpointError
from tests.checkpointing.helpers import Cfg, make, state_of, train_steps


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def craft_metadata(step_dir, payload) -> None:
    """Replace a real .metadata with one whose Metadata carries the payload inside it."""
    path = os.path.join(step_dir, layout.DCP_METADATA_FILE)
    with open(path, "rb") as f:
        md = pickle.load(f)  # our own fresh, trusted file
    md.planner_data = {"x": payload}
    with open(path, "wb") as f:
        pickle.dump(md, f)


def _saved(tmp_path, steps=(1, 2)):
    model, opt = make()
    mgr = CheckpointManager(Cfg(), str(tmp_path), "run")
    for step in steps:
        train_steps(model, opt, 1, seed=step)
        mgr.save(step, state_of(model, opt), meta={"tokens": step})
    return mgr


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
def test_crafted_metadata_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "PAYLOAD_RAN"
    mgr = _saved(tmp_path)
    craft_metadata(mgr.step_path(2), payload(marker))
    with pytest.raises(UnsafeCheckpointError) as e:
        mgr.load(mgr.step_path(2), state_of(*make(seed=3)))
    refused = "posix.system" if payload is SystemPayload else "builtins.exec"
    assert f"{mgr.step_path(2)}/.metadata references {refused}" in str(e.value)
    # resume=auto stops on it: no fallback to step 1, no fresh start
    with pytest.raises(UnsafeCheckpointError, match=r"step_000000002/\.metadata references"):
        mgr.load_latest(state_of(*make(seed=3)))
    assert not marker.exists()


def test_crafted_metadata_on_an_object_store(tmp_path):
    """The fsspec reader (s3:// in production) goes through the same restricted unpickler."""
    import uuid

    import fsspec

    marker = tmp_path / "PAYLOAD_RAN"
    root = f"memory://safe-{uuid.uuid4().hex[:8]}"
    model, opt = make()
    mgr = CheckpointManager(Cfg(root=root), str(tmp_path), "run")
    mgr.save(1, state_of(model, opt), meta={"tokens": 1})
    fs = fsspec.filesystem("memory")
    md_path = mgr.step_path(1) + "/.metadata"
    md = pickle.loads(fs.cat_file(md_path))
    md.planner_data = {"x": SystemPayload(marker)}
    fs.pipe_file(md_path, pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata references posix\.system"):
        mgr.load_latest(state_of(*make(seed=3)))
    assert not marker.exists()


def test_verify_and_export_refuse_a_crafted_metadata(tmp_path, capsys):
    """``verify`` reads .metadata through the safe reader; ``export`` reads it the same way
    (``_dcp.read_metadata``, then ``_dcp.load``)."""
    from checkpointing import _dcp

    marker = tmp_path / "PAYLOAD_RAN"
    mgr = _saved(tmp_path, steps=(1,))
    craft_metadata(mgr.step_path(1), SystemPayload(marker))
    assert checkpointing_cli(["verify", mgr.run_dir]) == 1
    out = capsys.readouterr().out
    assert "UnsafeCheckpointError" in out and "references posix.system" in out
    with pytest.raises(UnsafeCheckpointError, match="references posix.system"):
        _dcp.read_metadata(mgr.step_path(1), True, {})
    reader = _dcp.make_reader(mgr.step_path(1), True, {})
    with pytest.raises(UnsafeCheckpointError, match="references posix.system"):
        _dcp.load({"model": {}}, reader)
    assert not marker.exists()


def test_real_metadata_loads_and_garbage_is_a_damaged_checkpoint(tmp_path):
    mgr = _saved(tmp_path)
    assert mgr.load_latest(state_of(*make(seed=3)))["step"] == 2
    with open(os.path.join(mgr.step_path(2), layout.DCP_METADATA_FILE), "wb") as f:
        f.write(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match=r"step_000000002/\.metadata is not a readable DCP") as e:
        safe_pickle.load_dcp_metadata(io.BytesIO(b"\x80\x04not a pickle"),
                                      f"{mgr.step_path(2)}/.metadata")
    assert not isinstance(e.value, UnsafeCheckpointError)
    # damaged (not crafted): resume=auto falls back to the older checkpoint, as before
    assert mgr.load_latest(state_of(*make(seed=3)))["step"] == 1


def test_metadata_of_another_type_is_refused():
    with pytest.raises(UnsafeCheckpointError, match="holds a dict, not DCP Metadata"):
        safe_pickle.load_dcp_metadata(io.BytesIO(pickle.dumps({"a": 1})), "x/.metadata")


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
def test_crafted_torch_file_is_refused(tmp_path, payload):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": payload(marker)}, path)
    refused = r"posix\.system" if payload is SystemPayload else r"(builtins\.)?exec"  # torch's wording
    with pytest.raises(UnsafeCheckpointError, match=f"{path} references {refused},"):
        safe_pickle.check_torch_file(str(path), str(path), safe_pickle.DEEPSPEED_GLOBALS)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8", "step": 3}, good)
    safe_pickle.check_torch_file(str(good), str(good), safe_pickle.DEEPSPEED_GLOBALS)


def test_engine_load_checks_files_before_the_engine_reads_them(tmp_path):
    """The manager asks the engine state to vet its files (on every rank) before ``load``."""
    from checkpointing.engine_state import EngineState

    marker = tmp_path / "PAYLOAD_RAN"

    class Engine(EngineState):
        format = "toy"
        loaded = False

        def save(self, step_dir):
            os.makedirs(os.path.join(step_dir, "engine"), exist_ok=True)
            torch.save({"w": torch.ones(2), "x": SystemPayload(marker)}, os.path.join(step_dir, "engine", "w.pt"))

        def check_safe(self, step_dir):
            safe_pickle.check_torch_file(os.path.join(step_dir, "engine", "w.pt"), "engine/w.pt")

        def load(self, step_dir, meta):
            type(self).loaded = True

    mgr = CheckpointManager(Cfg(), str(tmp_path), "run")
    mgr.save(1, Engine())
    assert commit_mod.is_committed(mgr.storage, mgr.step_path(1))
    with pytest.raises(UnsafeCheckpointError, match=r"toy checkpoint .* refused: engine/w.pt references posix"):
        mgr.load_latest(Engine())
    assert not Engine.loaded and not marker.exists()


def test_a_class_that_cannot_be_imported_here_is_not_called_crafted(tmp_path, monkeypatch):
    """``verify`` of a DeepSpeed checkpoint on a machine without DeepSpeed: the file cannot be
    vetted (CheckpointError saying what to install), which is not the same as crafted."""
    import importlib
    import sys

    pkg = tmp_path / "gone_pkg_f17"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scaler.py").write_text("class Scaler:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scaler = importlib.import_module("gone_pkg_f17.scaler").Scaler
    path = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": scaler(), "w": torch.ones(2)}, path)
    monkeypatch.delitem(sys.modules, "gone_pkg_f17.scaler")
    monkeypatch.delitem(sys.modules, "gone_pkg_f17")
    (pkg / "scaler.py").unlink()
    with pytest.raises(CheckpointError, match="holds gone_pkg_f17.scaler.Scaler, which cannot be imported here") as e:
        safe_pickle.check_torch_file(str(path), "optim_states.pt", ["gone_pkg_f17.scaler.Scaler"])
    assert not isinstance(e.value, UnsafeCheckpointError)
