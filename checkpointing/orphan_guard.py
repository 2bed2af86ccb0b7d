"""No orphaned checkpoint processes: DCP's process-mode writer exits when its trainer dies.

``async_mode=process`` writes through a daemon process DCP spawns once per trainer. A daemon
flag only helps on a clean exit: after a SIGKILL of the trainer (OOM killer, a torchrun agent's
kill, a node agent) the writer was re-parented to init and lived on, on a GPU node keeping its
pinned host memory and a CUDA context.

The usual tool, ``prctl(PR_SET_PDEATHSIG)``, is wrong here: Linux sends that signal when the
*thread* that forked the child exits, and DCP spawns the daemon from a one-shot thread pool it
shuts down after the first save, so the daemon would be killed after every first save. Instead
the daemon watches its parent process: a thread polls ``getppid()`` (which changes the moment the
parent dies and the child is re-parented) and ends the process at once.

The watcher is started from inside the daemon by the storage writer we hand DCP: it is pickled
to the daemon with every save request, carrying the trainer's pid, and unpickling it there calls
:func:`watch_parent` (a no-op in the trainer itself, and after the first call).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

POLL_S = 0.5
EXIT_CODE = 86  # only seen by nobody: the parent that would read it is gone

_watched: Optional[int] = None
_lock = threading.Lock()


def parent_alive(parent_pid: int) -> bool:
    """Whether ``parent_pid`` is still this process's parent (a dead parent re-parents us)."""
    return os.getppid() == parent_pid


def _watch(parent_pid: int, poll_s: float) -> None:
    while parent_alive(parent_pid):
        time.sleep(poll_s)
    try:
        sys.stderr.write(f"moeforge: checkpoint writer process {os.getpid()}: its trainer (pid {parent_pid}) "
                         "died; exiting (the step being written stays uncommitted)\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE)  # no cleanup: nothing here may block on a peer that is gone


def watch_parent(parent_pid: int, poll_s: float = POLL_S) -> bool:
    """In a process whose parent is ``parent_pid``: end this process soon after that parent dies.
    Returns True when a watcher was started by this call. A no-op in ``parent_pid`` itself and
    after the first call; when the parent is already gone, exits at once."""
    global _watched
    if os.getpid() == parent_pid:
        return False
    with _lock:
        if _watched is not None:
            return False
        _watched = parent_pid
    threading.Thread(target=_watch, args=(parent_pid, poll_s), name="moeforge-parent-watch",
                     daemon=True).start()
    return True


class ParentWatchingMixin:
    """For a DCP storage writer: records the pid of the process that built it, and when it is
    unpickled in another process (DCP's checkpoint daemon), starts :func:`watch_parent` there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._moeforge_parent_pid = os.getpid()

    def __setstate__(self, state):
        parent = super().__setstate__ if hasattr(super(), "__setstate__") else None
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)
        pid = state.get("_moeforge_parent_pid") if isinstance(state, dict) else None
        if pid is not None:
            watch_parent(int(pid))
