"""The one background-thread shape the watchers share (NVML monitor, hang watchdog, IMDS watcher):
a named daemon thread running a loop that checks a stop ``Event``, started once, stopped by setting
the event and joining with a bound.

Daemon: a watcher must never keep a finished (or crashed) training process alive. Bounded join: a
watcher stuck in a slow call (an NVML read, an IMDS request) must not hold up shutdown either;
``stop`` says whether the thread really ended.
"""

from __future__ import annotations

import threading
from typing import Callable


class BackgroundThread:
    """``target()`` on a daemon thread named ``name``; the loop in ``target`` watches ``stop_event``
    (``while not stop_event.wait(period)`` or ``while not stop_event.is_set()``)."""

    def __init__(self, name: str, target: Callable[[], None]):
        self.name = name
        self.stop_event = threading.Event()
        self._target = target
        self._thread: threading.Thread | None = None

    def start(self) -> "BackgroundThread":
        if self._thread is not None:
            raise RuntimeError(f"background thread {self.name} was already started")
        self._thread = threading.Thread(target=self._target, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the loop to end and wait up to ``timeout`` s; True when the thread has ended (or
        never started)."""
        self.stop_event.set()
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end by itself; True when it has ended (or never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.is_alive()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread is not None
