"""The async half of ``CheckpointManager.save``: the snapshot in the loop, everything else beside it.

A mixin of :class:`checkpointing.manager.CheckpointManager` (it shares the manager's state: rank,
storage, process group, the in-flight save). The step that saves pays for the consistent copy
(``checkpointing/snapshot.py``); the host copy, serialisation, the write, the commit and retention
run on background threads, and with ``async_mode=process`` the serialising and writing run in
another process (``checkpointing/writer_process.py`` for one process; DCP's daemon for several
ranks). ``busy()`` tells the trainer a save is still writing, so the next one is skipped or
deferred (``checkpoint.if_busy``) instead of queueing behind it.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from checkpointing import _dcp, commit
from checkpointing.config import CheckpointConfig
from checkpointing.errors import CheckpointError
from checkpointing.save_result import SaveResult
from checkpointing.snapshot import SnapshotStager

log = logging.getLogger("checkpointing.manager")


def _shm_free_bytes() -> Optional[int]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class AsyncSaves:
    """Async saves for the manager: ``_start_async`` (from ``save``), ``wait``, ``take_wait_s``,
    ``inflight``, ``busy``; the manager provides rank, storage, process_group, ``_distributed``,
    ``_after_commit`` and the in-flight fields."""

    def _init_async(self, cfg: CheckpointConfig) -> None:
        self._staging = cfg.staging
        self._threads = cfg.write_threads
        self._delay_s = cfg.fault_inject_write_delay_s
        self._wait_s = 0.0  # loop time spent in wait() since the last take_wait_s()
        # Async saves: one persistent stager (buffers allocated once, reused); a single-process
        # run's process mode writes from our own writer process (DCP's daemon needs a group).
        self._stager: Optional[SnapshotStager] = None
        self._writer_proc = None
        self._io: Optional[ThreadPoolExecutor] = None
        if self._async_mode != "off":
            own_process = self._async_mode == "process" and not self._distributed
            self._stager = SnapshotStager(device=self._staging == "device", shared=self._async_mode == "process")
            self._stager.as_plain = own_process
            if own_process:
                from checkpointing.writer_process import WriterProcess

                self._writer_proc = WriterProcess()  # spawned now: its torch import overlaps start-up

    def _resolve_async_mode(self, mode: str) -> str:
        if mode != "process":
            return mode
        if not self._distributed:
            return "process"  # our own writer process (checkpointing/writer_process.py)
        reason = _dcp.process_mode_unavailable()
        if reason is None:
            return "process"
        log.warning("checkpoint.async_mode=process unavailable: %s; using async_mode=thread", reason)
        return "thread"

    def _start_async(self, path, step, plain, writer, full_meta, trainer_state, t0) -> SaveResult:
        stager = self._stager
        host_wait = self._staging == "host"  # the update must not run before the host copy is taken
        try:
            if self._writer_proc is not None:
                staging = stager.stage(plain)
                if self._io is None:
                    self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-write")
                upload = self._io.submit(self._write_in_process, path, staging)
                handle = _dcp.AsyncHandle(staging if host_wait and not staging.done() else None, upload, None,
                                          "process")
            else:
                handle = _dcp.async_save(plain, writer, self.process_group, self._async_mode, stager, host_wait)
        except _dcp.ERRORS as e:
            raise CheckpointError(f"saving checkpoint {path} failed to start: {_dcp.describe(e)}") from e
        del plain  # the stager holds its own copy
        started = time.perf_counter() - t0
        record = SaveResult(path, step, started, -1, committed=False, blocked_s=started,
                            mode=self._async_mode, snapshot_s=stager.timings.get("snapshot_s", started),
                            started_at=t0)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        self._handle, self._record = handle, record
        self._inflight = self._executor.submit(self._finish_async, record, handle, full_meta,
                                               trainer_state, t0)
        return SaveResult(**{**record.__dict__})

    def _write_in_process(self, path: str, staging: Future) -> float:
        host = staging.result()
        return self._writer_proc.write(self.storage.native(path), host, self.storage.is_local,
                                       self.storage.storage_options, self._threads, self._delay_s)

    def _finish_async(self, record: SaveResult, handle: "_dcp.AsyncHandle", meta: Dict[str, Any],
                      trainer_state: Dict[str, Any], t0: float) -> SaveResult:
        """Background: the marker only after the write future completed. DCP's save finishes on
        rank 0 only after gathering every rank's write results, so rank 0 needs no extra barrier.
        Commit and retention run here too: nothing of a save but its snapshot is in the loop."""
        out = handle.upload.result()
        host_s = self._stager.timings.get("host_s", 0.0) if self._stager is not None else 0.0
        record.staging_s = host_s
        record.write_s = (out if isinstance(out, float) else
                          max(0.0, time.perf_counter() - t0 - host_s))
        path = record.path
        if self.rank == 0:
            commit.write_commit(self.storage, path, meta, trainer_state)
            record.bytes = self.storage.tree_size(path)
        record.commit_s = time.perf_counter() - t0
        record.committed = self.rank == 0  # other ranks cannot see the marker being written
        if self.rank == 0:
            log.info("checkpoint %s committed in the background (%s): %.1f MB; %s", path, record.mode,
                     record.bytes / 1e6, record.phases())
            # Retention (deleting tens of GB) runs after this save's future completes, not before:
            # an emergency save waiting for its commit must not wait for old steps to be deleted
            # (8.5 s for a 23.6 GB step on an H200 node's disk). close() still waits for it.
            self._executor.submit(self._after_commit, record.step)
        return record

    def wait(self) -> None:
        """Block until the in-flight async save has staged its copy (call before the optimizer
        mutates the parameters again). A no-op in sync mode, with ``staging=device`` and once
        staged. The time spent here is the loop's: see ``take_wait_s``."""
        handle = self._handle
        if handle is not None and handle.staging is not None:
            t = time.perf_counter()
            try:
                handle.staging.result()
            finally:
                handle.staging = None
                waited = time.perf_counter() - t
                self._wait_s += waited
                if self._record is not None:
                    self._record.blocked_s += waited

    def take_wait_s(self) -> float:
        """Seconds ``wait()`` held the loop since the last call (checkpoint time inside a step)."""
        out, self._wait_s = self._wait_s, 0.0
        return out

    def inflight(self) -> Optional[SaveResult]:
        """The async save still writing or committing on this rank (its growing record), else None."""
        if self._inflight is None or self._inflight.done():
            return None
        return self._record

    def busy(self) -> bool:
        """Collective: is an async save still writing on any rank? (All ranks agree, so all skip or
        defer the same save.)"""
        local = self.inflight() is not None
        if not self._distributed:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(flag.item())

    def _prepare_async(self, plain: Any, nbytes: int) -> None:
        """Allocate (and pin) the reusable host buffers in the background. A process-mode writer
        needs them in shared memory: when /dev/shm cannot hold them, say so and write from a
        thread instead."""
        if self._stager is None:
            return
        if self._stager.shared:
            free = _shm_free_bytes()
            if free is not None and free < nbytes * 1.05:
                log.warning("checkpoint.async_mode=process needs %.1f GB of shared memory for the host copy, "
                            "but /dev/shm has %.1f GB free: writing from a thread instead (enlarge /dev/shm, "
                            "e.g. docker --shm-size, to write from a separate process)", nbytes / 1e9, free / 1e9)
                self._use_thread_writer()
        self._stager.prepare(plain)

    def _use_thread_writer(self) -> None:
        if self._writer_proc is not None:
            self._writer_proc.close()
            self._writer_proc = None
        self._async_mode = "thread"
        self._stager = SnapshotStager(device=self._staging == "device", shared=False)

