"""health/flags.py and health/signals.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path


from health.exit_codes import ExitCode


from health.flags import StopFlags, priority
from health.signals import install_signal_handlers

REPO = Path(__file__).resolve().parents[2]


def test_no_request_is_none():
    assert StopFlags().pending() is None


def test_priority_unhealthy_over_budget_over_preempted():
    f = StopFlags()
    f.request(ExitCode.PREEMPTED, "spot")
    assert f.pending().code == ExitCode.PREEMPTED
    f.request(ExitCode.BUDGET_EXHAUSTED, "budget")
    assert f.pending().code == ExitCode.BUDGET_EXHAUSTED
    f.request(ExitCode.UNHEALTHY, "ecc")
    f.request(ExitCode.PREEMPTED, "sigterm")
    code, reason, t_notice = f.pending()  # unpacks as (code, reason, t_notice)
    assert (code, reason) == (ExitCode.UNHEALTHY, "ecc")
    assert abs(t_notice - time.time()) < 5
    assert priority(ExitCode.UNHEALTHY) > priority(ExitCode.BUDGET_EXHAUSTED) > priority(ExitCode.PREEMPTED) > priority(0)


def test_earliest_wins_among_equals_and_notice_time_kept():
    f = StopFlags()
    f.request(ExitCode.PREEMPTED, "first", t_notice=100.0)
    f.request(ExitCode.PREEMPTED, "second", t_notice=200.0)
    assert f.pending() == (ExitCode.PREEMPTED, "first", 100.0)


def test_bounded_and_high_priority_still_lands():
    f = StopFlags()
    for i in range(1000):
        f.request(ExitCode.PREEMPTED, f"r{i}")
    f.request(ExitCode.UNHEALTHY, "late but important")
    assert len(f.all()) <= 257
    assert f.pending().code == ExitCode.UNHEALTHY


def test_signal_sets_flag_and_uninstall_restores():
    f = StopFlags()
    before = signal.getsignal(signal.SIGUSR1)
    h = install_signal_handlers(f)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while f.pending() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        req = f.pending()
        assert req.code == ExitCode.PREEMPTED and "SIGUSR1" in req.reason
        os.kill(os.getpid(), signal.SIGTERM)  # must not kill the test process
        time.sleep(0.05)
        assert any("SIGTERM" in r.reason for r in f.all())
    finally:
        h.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_signals_while_a_thread_hammers_request():
    """A handler interrupting the main thread mid-request must neither deadlock nor lose requests."""
    f = StopFlags()
    h = install_signal_handlers(f, (signal.SIGUSR1,))
    stop = threading.Event()

    def hammer():
        for i in range(200):
            if stop.is_set():
                return
            f.request(ExitCode.BUDGET_EXHAUSTED, f"budget {i}")

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(20):
            os.kill(os.getpid(), signal.SIGUSR1)
            f.request(ExitCode.PREEMPTED, "main")
            f.pending()
    finally:
        stop.set()
        t.join(5)
        h.uninstall()
    assert not t.is_alive()
    assert sum("SIGUSR1" in r.reason for r in f.all()) >= 1
    assert f.pending().code == ExitCode.BUDGET_EXHAUSTED


CHILD = textwrap.dedent("""
    import sys, time
    from health.flags import StopFlags
    from health.signals import install_signal_handlers
    f = StopFlags()
    install_signal_handlers(f)
    print("ready", flush=True)
    t_end = time.monotonic() + 20
    seen = False
    while time.monotonic() < t_end:
        if f.pending() and not seen:
            seen = True
            print("flag", f.pending().code, f.pending().reason, flush=True)
        time.sleep(0.02)
    print("timeout", flush=True)
""")


def test_ctrl_c_twice_quits():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        line = p.stdout.readline()
        assert line.startswith("flag 75") and "SIGINT" in line, line
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert "timeout" not in out
    assert p.returncode != 0 and "KeyboardInterrupt" in err
