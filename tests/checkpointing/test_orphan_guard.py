"""checkpointing.orphan_guard on its own: a process that unpickles our DCP writer watches the
process that built it and exits soon after that one is SIGKILLed, even while its main thread is
busy. (Through the trainer under torchrun: tests/dist/test_ckpt_orphans.py.)"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

from checkpointing import _dcp, orphan_guard
from tests.checkpointing.test_cli import REPO

# The parent builds a writer and hands its pickle to a child that unpickles it and then sleeps (a
# stand-in for a long write); the parent prints the child's pid and waits to be killed.
PARENT = r"""
import pickle, subprocess, sys, time
from checkpointing import _dcp
blob = pickle.dumps(_dcp.make_writer(sys.argv[1], True, {}))
child = subprocess.Popen([sys.executable, "-c",
    "import pickle, sys, time; w = pickle.loads(sys.stdin.buffer.read()); print('ready', flush=True); time.sleep(120)"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdin.write(blob); child.stdin.close()
assert child.stdout.readline().strip() == b"ready"
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_unpickled_writer_exits_when_its_builder_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent by 5 s"
    finally:
        parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_no_watch_in_the_process_that_built_the_writer(tmp_path):
    writer = pickle.loads(pickle.dumps(_dcp.make_writer(str(tmp_path), True, {})))
    assert writer._moeforge_parent_pid == os.getpid()
    assert orphan_guard.watch_parent(os.getpid()) is False
