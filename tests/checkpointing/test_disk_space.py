"""A full disk, said plainly, on a real full disk: a small tmpfs mounted by the test (root only;
skipped, saying why, where mounting is not permitted).

- A write that runs out of space mid-way (a state of many tiny tensors: the estimate, 8 KB of
  tensor data, fits; DCP's per-tensor overhead, ~3.5 MB, does not) fails with "no space left on
  <path>: need ~X GB, Y GB free" instead of torch's zip-writer error, leaves no partial step
  directory, and the previous commit stays loadable. Sync and thread-async.
- A save whose estimate does not fit is refused before a byte is written, in the same words.
- The start-up warning when keep_last + 1 checkpoints cannot fit.
- Through ``python -m train``: the second save cannot fit; the run exits 1 saying so, the first
  checkpoint survives and verifies.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess

import pytest
import torch

from checkpointing import CheckpointError, CheckpointManager, disk_space
from checkpointing.cli import main as checkpointing_cli
from tests.checkpointing.helpers import Cfg
from tests.train.runner import FAST, run_train

GB_RE = r"[0-9.]+"


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size_mb)`` -> a directory with a fresh tmpfs of that size mounted on it."""
    mounted = []

    def mount(size_mb: int):
        d = tmp_path / f"tmpfs_{size_mb}m_{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(d)],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for a real full disk (needs root with CAP_SYS_ADMIN): "
                        f"{(r.stderr or r.stdout).strip()}")
        mounted.append(d)
        return d

    try:
        yield mount
    finally:
        for d in mounted:
            if subprocess.run(["umount", str(d)], capture_output=True, timeout=30).returncode:
                # still busy (a child of the run holding a file open): detach it now, freed when closed
                subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


def _many_tiny():
    return {"x": {f"t{i}": torch.ones(1) for i in range(2000)}}


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_write_that_runs_out_of_space_says_so(tmpfs, mode):
    root = tmpfs(2)
    mgr = CheckpointManager(Cfg(root=str(root), async_mode=mode), str(root), "run")
    first = {"x": {"w": torch.arange(10.0)}}
    mgr.save(1, first)
    mgr.wait_committed()
    with pytest.raises(CheckpointError) as e:
        mgr.save(2, _many_tiny())
        mgr.wait_committed()
    step2 = mgr.step_path(2)
    assert f"no space left on {step2}: need ~0.00000800 GB, " in str(e.value)
    assert "GB free (the write failed: " in str(e.value)
    assert not os.path.exists(step2)  # the partial step is gone, its space free again
    assert mgr.committed_steps() == [1]
    back = {"x": {"w": torch.zeros(10)}}
    mgr.load(mgr.step_path(1), back)
    assert torch.equal(back["x"]["w"], first["x"]["w"])
    mgr.close()


def test_save_that_cannot_fit_is_refused_before_writing(tmpfs):
    root = tmpfs(2)
    mgr = CheckpointManager(Cfg(root=str(root)), str(root), "run")
    mgr.save(1, {"x": {"w": torch.arange(10.0)}})
    with pytest.raises(CheckpointError, match=rf"failed before writing: no space left on {mgr.step_path(2)}: "
                                              rf"need ~0\.00400 GB, {GB_RE} GB free$"):
        mgr.save(2, {"x": {"w": torch.zeros(1_000_000)}})
    assert not os.path.exists(mgr.step_path(2)) and mgr.committed_steps() == [1]


def test_startup_warning_names_both_numbers(tmpfs, caplog):
    root = tmpfs(8)
    mgr = CheckpointManager(Cfg(root=str(root), keep_last=2), str(root), "run")
    state = {"x": {"w": torch.zeros(1_000_000)}}  # 4 MB: 3 of them do not fit in 8 MB
    with caplog.at_level(logging.WARNING, logger="checkpointing"):
        assert mgr.load_latest(state) is None
    assert (f"checkpoints may not fit on {mgr.run_dir}: checkpoint.keep_last=2 keeps 2 plus the one being "
            "written, need ~0.0120 GB (3 x ~0.00400 GB), ") in caplog.text
    assert "room for 2" in caplog.text


def test_capacity_warning_and_detection():
    assert disk_space.capacity_warning("/c", each=10, keep_last=3, free=40, held=0) is None
    assert disk_space.capacity_warning("/c", each=10, keep_last=3, free=25, held=15) is None
    msg = disk_space.capacity_warning("/c", each=10**9, keep_last=3, free=2 * 10**9, held=10**9)
    assert "need ~4.00 GB (4 x ~1.00 GB), 2.00 GB free (plus 1.00 GB in this run's checkpoints); room for 3" in msg
    assert disk_space.is_out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_space.is_out_of_space(wrapped)
    assert disk_space.is_out_of_space("rank 1: OSError: [Errno 28] No space left on device")
    assert not disk_space.is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert disk_space.gb(23.6e9) == "23.6" and disk_space.gb(17.8e6) == "0.0178"


def test_trainer_stops_plainly_when_the_second_save_cannot_fit(tmpfs, tmp_path):
    """A tiny-model checkpoint is ~17.8 MB: a 26 MB disk holds one, not two (keep_last=1 keeps
    the old one until the new one is committed)."""
    root = tmpfs(26)
    p = run_train(*FAST, "trainer.eval_every=0", "trainer.max_steps=3", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=1", f"checkpoint.root={root}", f"output_dir={tmp_path / 'out'}",
                  "run_name=full", check=False, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert f"checkpoints may not fit on {root}/full: checkpoint.keep_last=1 keeps 1 plus the one being written" in out
    step2 = f"{root}/full/step_000000002"
    assert f"no space left on {step2}: need ~" in out and "GB free" in out
    assert "unexpected pos" not in out
    assert sorted(os.listdir(root / "full")) == ["step_000000001"]  # no partial step left behind
    assert checkpointing_cli(["verify", str(root / "full")]) == 0
