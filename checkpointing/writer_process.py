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

_PR_SET_PDEATHSIG = 1


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


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the trainer is gone: a writer must not outlive it holding shared memory."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the watchdog below still applies
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(0)


def _serve(conn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    import torch.multiprocessing  # noqa: F401 - registers the shared-memory tensor reductions

    from checkpointing import _dcp

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
            conn.send(("error", _dcp.describe(e)))


class WriterProcess:
    """Start it early (the child imports torch in the background); ``write`` blocks its calling
    thread (the manager's background thread) until the child has written the shards."""

    def __init__(self) -> None:
        import multiprocessing as mp

        import torch.multiprocessing  # noqa: F401 - shared-memory tensors pickle by handle

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, os.getpid()), daemon=True,
                                 name="moeforge-ckpt-writer")
        self._proc.start()
        child.close()
        self._bound: Tuple = ()
        self._ready = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _recv(self) -> Tuple[str, Any]:
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                raise RuntimeError(f"checkpoint writer process {self._proc.pid} died "
                                   f"(exit code {self._proc.exitcode})")
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(f"checkpoint writer process {self._proc.pid} died "
                               f"(exit code {self._proc.exitcode})") from None

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
        if self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._conn.close()
