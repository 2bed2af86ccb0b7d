"""health/watchdog.py: a rank that stops making progress is dumped and exits 78."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from health.exit_codes import ExitCode
from health.watchdog import HangWatchdog, flight_recorder_env

REPO = Path(__file__).resolve().parents[2]

HANGING_RANK = textwrap.dedent("""
    import sys, threading, time
    from health.watchdog import HangWatchdog

    def stuck_in_collective():
        time.sleep(600)  # what a rank waiting on a dead peer looks like from Python

    def side_thread():
        time.sleep(600)

    wd = HangWatchdog(timeout_s=1.0, dump_dir=sys.argv[1], rank=3, poll_s=0.1, exit_record_dir=sys.argv[1]).start()
    threading.Thread(target=side_thread, name="data-loader", daemon=True).start()
    for step in range(1, 6):
        time.sleep(0.05)
        wd.beat(step)
    print("stuck", flush=True)
    stuck_in_collective()
    print("unreachable", flush=True)
""")


def test_hanging_rank_is_dumped_and_exits_78(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HANGING_RANK, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert p.returncode == ExitCode.HANG == 78, (p.returncode, p.stderr)
    assert "unreachable" not in p.stdout
    assert elapsed < 20  # 1 s timeout + interpreter start-up (slow on a loaded 2-core CI box)
    dump = (tmp_path / "hang_rank3.txt").read_text()
    assert "rank 3" in dump and "last completed step 5" in dump
    assert "in stuck_in_collective" in dump  # faulthandler's section
    assert "=== sys._current_frames ===" in dump and "data-loader" in dump
    assert dump.count("stuck_in_collective") >= 2  # both sections show the sleeping frame
    assert "made no progress" in p.stderr and "exiting 78" in p.stderr
    from health.exit_record import resolve_exit_code

    assert resolve_exit_code(str(tmp_path), 1)[0] == 78  # what a launcher behind torchrun reads


def test_beats_and_grace_keep_it_quiet(tmp_path):
    fired = []
    wd = HangWatchdog(timeout_s=0.3, dump_dir=str(tmp_path), poll_s=0.02, on_hang=fired.append).start()
    try:
        for step in range(10):
            time.sleep(0.05)
            wd.beat(step)
        with wd.grace(1.0):
            time.sleep(0.5)  # a long save: longer than the timeout, inside its grace
        assert not fired
        time.sleep(0.6)  # no beats: fires
        assert fired and fired[0].endswith("hang_rank0.txt")
    finally:
        wd.stop()


HANGING_IN_A_GROUP = textwrap.dedent("""
    import os, sys, time
    from health.watchdog import HangWatchdog, flight_recorder_env
    os.environ.update(flight_recorder_env(sys.argv[1]))  # before the process group, as the trainer must
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    wd = HangWatchdog(timeout_s=0.5, dump_dir=sys.argv[1], poll_s=0.05).start()
    dist.all_reduce(torch.ones(4))
    wd.beat(1)
    time.sleep(600)
""")


def test_flight_recorder_dumped_with_a_process_group(tmp_path):
    import pickle
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
    s.close()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", HANGING_IN_A_GROUP, str(tmp_path), port], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == ExitCode.HANG, p.stderr
    trace = pickle.loads((tmp_path / "flight_recorder_rank0.pkl").read_bytes())
    assert any("all_reduce" in e.get("profiling_name", "") for e in trace["entries"]), trace["entries"]
    assert (tmp_path / "hang_rank0.txt").exists()


def test_flight_recorder_env(tmp_path):
    env = flight_recorder_env(str(tmp_path))
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0
    assert env["TORCH_FR_DUMP_TEMP_FILE"].startswith(str(tmp_path))
