"""health/background.py: the watchers' thread shape (start once, stop via the event, bounded join)."""

from __future__ import annotations

import threading
import time

import pytest

from health.background import BackgroundThread


def test_loop_runs_until_stop_and_joins():
    ticks = []
    unstarted = BackgroundThread("moeforge-test", lambda: None)
    assert not unstarted.started and not unstarted.is_alive() and unstarted.stop()  # a no-op, not an error

    def loop():
        while not bg.stop_event.wait(0.01):
            ticks.append(threading.current_thread().name)
            if len(ticks) > 10_000:  # bounded even if stop never came
                return

    bg = BackgroundThread("moeforge-test", loop)
    bg.start()
    deadline = time.monotonic() + 5
    while len(ticks) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bg.is_alive() and bg._thread.daemon
    assert bg.stop(timeout=2.0) is True and not bg.is_alive()
    assert len(ticks) >= 3 and set(ticks) == {"moeforge-test"}
    with pytest.raises(RuntimeError, match="already started"):
        bg.start()


def test_stop_is_bounded_when_the_loop_ignores_the_event():
    release = threading.Event()
    bg = BackgroundThread("moeforge-stuck", lambda: release.wait(10)).start()
    t0 = time.monotonic()
    assert bg.stop(timeout=0.1) is False  # still running: the caller learns it, shutdown is not held
    assert time.monotonic() - t0 < 2
    release.set()
    assert bg.join(timeout=5) is True


def test_a_loop_that_ends_by_itself_is_joined():
    bg = BackgroundThread("moeforge-once", lambda: None).start()
    assert bg.join(timeout=5) and not bg.is_alive()
