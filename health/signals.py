"""Signal handlers that only set a stop flag (``ExitCode.PREEMPTED``); the loop checkpoints at the next boundary.

Which signals arrive, and when: torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers by
default and SIGUSR1 only with ``--signals-to-handle``; Slurm's ``--signal=B:USR1@N`` signals the
batch shell, without ``B:`` only the step tasks (docs/resilience.md, "Signals").

A second SIGINT gets Python's default behaviour back (KeyboardInterrupt), so Ctrl-C twice quits.
"""

from __future__ import annotations

import signal
import threading

from health.exit_codes import ExitCode
from health.flags import StopFlags

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class SignalHandlers:
    def __init__(self, flags: StopFlags, signals=DEFAULT_SIGNALS) -> None:
        self.flags = flags
        self.signals = tuple(signals)
        self._previous: dict[int, object] = {}

    def install(self) -> "SignalHandlers":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # runs in the main thread, between bytecodes
        name = signal.Signals(signum).name
        self.flags.request(ExitCode.PREEMPTED, f"received {name}: checkpoint and exit {ExitCode.PREEMPTED}")
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()


def install_signal_handlers(flags: StopFlags, signals=DEFAULT_SIGNALS) -> SignalHandlers:
    """Install handlers for ``signals``; call ``.uninstall()`` on the result to restore the old ones."""
    return SignalHandlers(flags, signals).install()


_installed: list[SignalHandlers] = []


def install(flags: StopFlags, signals=DEFAULT_SIGNALS) -> SignalHandlers:
    """``install_signal_handlers`` that also remembers the handlers for the module-level ``uninstall``."""
    h = install_signal_handlers(flags, signals)
    _installed.append(h)
    return h


def uninstall() -> None:
    """Restore the handlers that were in place before the most recent ``install``."""
    while _installed:
        _installed.pop().uninstall()
