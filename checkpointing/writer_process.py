"""A persistent writer process for a single-process run's async saves (``async_mode=process``).

The trainer's interpreter only snapshots; serialising and writing the shards (``torch.save`` per
tensor, CRC, file writes, fsync, S3 multipart parts) runs in this process, so the training loop
never competes with the writer for the GIL. DCP's own process daemon needs an initialised process
group; a one-GPU ``python -m train`` has none, so this is its process mode (multi-rank runs use
DCP's daemon, which coordinates the ranks' plans).

Protocol over one pipe: ``bind`` sends the shared-memory host buffers once per layout (the child
maps them; later saves reuse the mapping), ``write`` sends the state's structure with each tensor
replaced by its buffer index plus the primitives of this save (learning rates, step counts), and
the child answers ``ok`` with its write seconds or ``error`` with one line. The child exits when
the trainer dies, even by SIGKILL: Linux parent-death signal, and a watchdog on its parent pid.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, List, Mapping, Tuple

import torch

from checkpointing.snapshot import rebuild, tensor_leaves

log = logging.getLogger(__name__)

class _Ref:
    """A tensor's place in the bound buffer list."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _fill(obj: Any, bufs: List[torch.Tensor]) -> Any:
    if isinstance(obj, _Ref):
        return bufs[obj.i]
    if isinstance(obj, Mapping):
        return {k: _fill(v, bufs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, bufs) for v in obj)
    return obj


def _watch_parent(parent_pid: int) -> None:
    """Besides the parent-death signal (armed before anything is imported, see ``_BOOT``): exit
    when the parent pid changes, e.g. where prctl is not available."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# The child's first statements: arm SIGKILL-on-parent-death before importing torch (seconds), so a
# trainer killed meanwhile leaves nothing behind; then serve.
_BOOT = ("import ctypes, os, signal, sys\n"
         "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)\nexcept (OSError, AttributeError):\n    pass\n"
         "ppid = int(sys.argv[2])\n"
         "if os.getppid() != ppid:\n    os._exit(0)\n"
         "from checkpointing.writer_process import child_main\n"
         "child_main(int(sys.argv[1]), ppid)\n")


def child_main(fd: int, parent_pid: int) -> None:
    import multiprocessing
    from multiprocessing.connection import Connection

    _watch_parent(parent_pid)
    # Shared-memory tensors arrive as file descriptors fetched from the parent's resource sharer,
    # which only answers processes holding its auth key.
    multiprocessing.current_process().authkey = bytes.fromhex(os.environ.pop("MOEFORGE_WRITER_AUTHKEY"))
    _serve(Connection(fd), parent_pid)


def _serve(conn, parent_pid: int) -> None:
    import torch.multiprocessing  # noqa: F401 - registers the shared-memory tensor reductions

    from checkpointing import _dcp, disk_space

    bufs: List[torch.Tensor] = []
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "bind":
            bufs = msg[1]
            conn.send(("ok", 0.0))
            continue
        _, path, skeleton, is_local, options, threads, delay_s = msg
        try:
            t0 = time.perf_counter()
            _dcp.save(_fill(skeleton, bufs), _dcp.make_writer(path, is_local, options, threads, delay_s))
            conn.send(("ok", time.perf_counter() - t0))
        except BaseException as e:  # noqa: BLE001 - reported to the trainer, which decides
            msg = _dcp.describe(e)
            if disk_space.is_out_of_space(e) and not disk_space.is_out_of_space(msg):
                msg = f"No space left on device: {msg}"  # the ENOSPC was deeper in the chain
            conn.send(("error", msg))


class WriterProcess:
    """Start it early (the child imports torch in the background); ``write`` blocks its calling
    thread (the manager's background thread) until the child has written the shards."""

    def __init__(self) -> None:
        import multiprocessing as mp
        import subprocess
        import sys

        import torch.multiprocessing  # noqa: F401 - shared-memory tensors pickle by handle

        # A plain child process rather than multiprocessing's spawn, which would first re-import
        # the trainer's __main__ (and torch) before the child could arm its parent-death signal.
        self._conn, child = mp.Pipe()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, MOEFORGE_WRITER_AUTHKEY=mp.current_process().authkey.hex(),
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(child.fileno()), str(os.getpid())],
                                      pass_fds=(child.fileno(),), env=env, close_fds=True)
        child.close()
        self._bound: Tuple = ()
        self._ready = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _died(self) -> RuntimeError:
        return RuntimeError(f"checkpoint writer process {self._proc.pid} died (exit code {self._proc.poll()})")

    def _recv(self) -> Tuple[str, Any]:
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise self._died()
        try:
            return self._conn.recv()
        except EOFError:
            raise self._died() from None

    def write(self, path: str, host_state: Any, is_local: bool, options: Dict[str, Any],
              threads: int, delay_s: float = 0.0) -> float:
        """Write ``host_state`` (tensors in shared memory) as DCP shards at ``path``; returns the
        child's write seconds. Raises RuntimeError with the child's one-line error."""
        with self._lock:
            if not self._ready:
                kind, _ = self._recv()  # "ready": the child has imported torch
                self._ready = True
            leaves = tensor_leaves(host_state)
            key = tuple(t.data_ptr() for t in leaves)
            if key != self._bound:
                self._conn.send(("bind", leaves))
                kind, detail = self._recv()
                self._bound = key
            skeleton = rebuild(host_state, [_Ref(i) for i in range(len(leaves))], as_plain=True)
            self._conn.send(("write", path, skeleton, is_local, dict(options), threads, delay_s))
            kind, detail = self._recv()
        if kind != "ok":
            raise RuntimeError(f"checkpoint writer process: {detail}")
        return float(detail)

    def close(self) -> None:
        import subprocess

        if self._proc.poll() is None:
            try:
                self._conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._conn.close()
