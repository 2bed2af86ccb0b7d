"""The persistent stager and the writer process, on CPU: buffers reused across saves, each save
the values at its call, a non-tensor leaf kept as it was then; the writer process writes what was
staged and exits when its parent is SIGKILLed."""

import os
import signal
import subprocess
import sys
import time

import torch

from checkpointing import _dcp
from checkpointing.snapshot import SnapshotStager, state_bytes, tensor_leaves
from tests.train.runner import REPO, env


def _state():
    return {"w": torch.arange(12.0).reshape(3, 4), "opt": {"step": torch.tensor(1.0), "groups": [{"lr": 0.5}]}}


def test_stage_copies_now_and_reuses_its_buffers():
    st = SnapshotStager(device=True)
    s = _state()
    first = st.stage(s).result()
    ptrs = [t.data_ptr() for t in tensor_leaves(first)]
    s["w"].add_(100.0)
    s["opt"]["groups"][0]["lr"] = 0.25
    assert torch.equal(first["w"], torch.arange(12.0).reshape(3, 4))  # the copy, not the live tensor
    assert first["opt"]["groups"][0]["lr"] == 0.5
    second = st.stage(s).result()
    assert [t.data_ptr() for t in tensor_leaves(second)] == ptrs  # same buffers, no new allocation
    assert torch.equal(second["w"], s["w"]) and second["opt"]["groups"][0]["lr"] == 0.25
    assert state_bytes(s) == 12 * 4 + 4
    st.close()


def test_writer_process_writes_the_staged_state(tmp_path):
    from checkpointing.writer_process import WriterProcess

    st = SnapshotStager(device=True, shared=True)
    st.as_plain = True
    w = WriterProcess()
    try:
        s = _state()
        for i in range(2):  # the second save reuses the bound buffers
            secs = w.write(str(tmp_path / f"s{i}"), st.stage(s).result(), True, {}, 2)
            assert secs >= 0
            s["w"].add_(1.0)
        back = {"w": torch.zeros(3, 4), "opt": {"step": torch.tensor(0.0), "groups": [{"lr": 0.0}]}}
        _dcp.load(back, _dcp.make_reader(str(tmp_path / "s1"), True, {}))
        assert torch.equal(back["w"], torch.arange(12.0).reshape(3, 4) + 1.0)
        assert back["opt"]["groups"][0]["lr"] == 0.5
    finally:
        w.close()
        st.close()


CHILD = """
import sys, time
from checkpointing.writer_process import WriterProcess
w = WriterProcess()
print(w.pid, flush=True)
time.sleep(600)
"""


def test_writer_process_exits_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper has exited too
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
            time.sleep(0.2)
        raise AssertionError(f"writer process {pid} outlived its SIGKILLed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
