"""The one module that knows torch.distributed.checkpoint's version differences and private bits.

Tested on torch 2.13 (CPU) and meant for 2.11 (GPU image): writer/reader construction (a reader
whose ``.metadata`` goes through a restricted unpickler, writers that stop DCP's daemon process
from outliving its trainer, ``thread_count`` parallel writers), a load planner that refuses pickled
objects, ``async_save``'s two return types with our own persistent stager
(checkpointing/snapshot.py), and the async PROCESS checkpointer (feature-detected, never
version-compared).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import pickle
import re
import warnings
from concurrent.futures import Future
from typing import Any, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.stateful import Stateful

from checkpointing import safe_pickle
from checkpointing.errors import UnsafeCheckpointError
from checkpointing.orphan_guard import ParentWatchingMixin
from compat.torch_compat import dcp_metadata_path, fsspec_reader_writer

FsspecReader, FsspecWriter = fsspec_reader_writer()

# DCP's CheckpointException derives from BaseException: ``except Exception`` does not catch it.
ERRORS = (Exception, CheckpointException)

__all__ = ["ERRORS", "make_writer", "make_reader", "WeightsOnlyLoadPlanner", "save", "load",
           "async_save_thread", "async_save", "process_mode_unavailable", "AsyncHandle",
           "read_metadata", "describe", "unsafe_failure", "Stateful"]


class _LocalWriter(ParentWatchingMixin, FileSystemWriter):
    """DCP's writer; in process mode, the daemon that unpickles it exits when the trainer dies."""


class _FsspecWriter(ParentWatchingMixin, FsspecWriter):
    """The same for object stores."""


class _SlowWriterMixin:
    """``checkpoint.fault_inject_write_delay_s``: storage that takes that much longer to write, for
    drills and tests of what a slow save costs the loop (it must cost nothing)."""

    delay_s = 0.0

    def write_data(self, plan, planner):
        import time

        time.sleep(self.delay_s)
        return super().write_data(plan, planner)


class _SlowLocalWriter(_SlowWriterMixin, _LocalWriter):
    pass


class _SlowFsspecWriter(_SlowWriterMixin, _FsspecWriter):
    pass


def make_writer(path: str, is_local: bool, storage_options: Mapping[str, Any], thread_count: int = 1,
                delay_s: float = 0.0):
    """``thread_count`` writers per rank, each with its own file: one stream cannot keep a local
    NVMe or an S3 multipart upload busy."""
    threads = max(1, int(thread_count))
    if is_local:
        # sync_files: every shard is fsynced before DCP reports it written, so rank 0's
        # ``.metadata`` (and our marker after it) never points at data still in a page cache.
        cls = _SlowLocalWriter if delay_s > 0 else _LocalWriter
        w = cls(path, single_file_per_rank=True, sync_files=True, thread_count=threads)
    else:
        # Object stores: a closed PUT is durable; fsync would only fall back to os.sync().
        cls = _SlowFsspecWriter if delay_s > 0 else _FsspecWriter
        w = cls(path, single_file_per_rank=True, sync_files=False, thread_count=threads,
                **dict(storage_options))
    if delay_s > 0:
        w.delay_s = float(delay_s)
    return w


class _SafeMetadataMixin:
    """``read_metadata`` through :func:`checkpointing.safe_pickle.load_dcp_metadata` instead of
    ``pickle.load``: DCP unpickles ``.metadata`` before any load planner runs, so this is the only
    place a crafted one can be stopped. Otherwise what DCP's own ``read_metadata`` does."""

    _where: str = ""
    _vetted = None  # the global Metadata once read: DCP reads it again inside load (see ``load``)

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        if rank is None and self._vetted is not None:
            metadata = self._vetted
        else:
            metadata = self._read_metadata_file(rank)
            if rank is None:
                self._vetted = metadata
        if hasattr(metadata, "storage_meta"):
            if metadata.storage_meta is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata

    def _read_metadata_file(self, rank: Optional[int]):
        path = dcp_metadata_path(self, rank)
        name = str(path).rsplit("/", 1)[-1]
        where = f"{self._where.rstrip('/')}/{name}" if self._where else str(path)
        with self.fs.create_stream(path, "rb") as stream:
            return safe_pickle.load_dcp_metadata(stream, where)


class _SafeFileSystemReader(_SafeMetadataMixin, FileSystemReader):
    pass


class _SafeFsspecReader(_SafeMetadataMixin, FsspecReader):
    pass


def make_reader(path: str, is_local: bool, storage_options: Mapping[str, Any]):
    """A DCP reader for ``path`` that refuses a ``.metadata`` holding anything but DCP metadata."""
    reader = _SafeFileSystemReader(path) if is_local else _SafeFsspecReader(path, **dict(storage_options))
    reader._where = str(path)
    return reader


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP stores non-tensor leaves (optimizer hyper-parameters: lr, betas, step counts) with
    ``torch.save`` and reads them back with ``weights_only=False``. Read each with
    ``weights_only=True`` first, so a checkpoint holding a pickled object fails to load instead of
    running code; the values themselves are primitives, so the second read is of the same bytes."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: (GLOBAL )?(\S+)", str(e))
            raise ValueError(
                f"{read_item.dest_index.fqn} holds a pickled object"
                f"{' (' + found.group(2) + ')' if found else ''}, refused by weights_only loading: "
                "checkpoints hold tensors and primitives only") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _no_dist() -> bool:
    # Said explicitly: DCP would otherwise warn on every call that it "assumes" a single process.
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns on every single-process call, even when told ``no_dist=True``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
        yield


def save(state: Mapping[str, Any], writer, process_group=None) -> None:
    with _quiet_no_dist():
        dcp.save(dict(state), storage_writer=writer, process_group=process_group, no_dist=_no_dist())


def load(state: Mapping[str, Any], reader, process_group=None) -> None:
    # Vet .metadata before DCP does: DCP turns any read_metadata failure into an AssertionError
    # string (and then tries rank-local metadata), losing UnsafeCheckpointError. The reader keeps
    # what it read, so DCP's own read costs nothing more.
    if isinstance(reader, _SafeMetadataMixin):
        reader.read_metadata()
    with _quiet_no_dist():
        dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner(),
                 process_group=process_group, no_dist=_no_dist())


def async_save_thread(state: Mapping[str, Any], writer,
                      process_group=None) -> Tuple[Optional[Future], Future]:
    """Start a thread-backed async save. Returns ``(staging_future or None, upload_future)``.

    A fresh writer (and so a fresh stager) per save: on torch 2.11 a ``DefaultStager`` reused for a
    second ``async_save`` failed in ``deepcopy_with_tensor_offload``. ``FileSystemWriter`` is a
    blocking stager, so staging is done when this returns and the staging future is None.
    """
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    with _quiet_no_dist():
        out = dcp.async_save(dict(state), storage_writer=writer, process_group=process_group,
                             async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=_no_dist())
    if isinstance(out, Future):
        return None, out
    # AsyncSaveResponse (torch >= 2.9 with a non-blocking stager)
    return out.staging_completion, out.upload_completion


def process_mode_unavailable() -> Optional[str]:
    """Why ``async_mode=process`` cannot run here (None when it can). DCP's checkpoint daemon
    joins a process group of its own, set up from the trainer's: it needs one initialised."""
    try:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    except ImportError:
        return f"torch {torch.__version__} has no AsyncCheckpointerType"
    if not hasattr(AsyncCheckpointerType, "PROCESS"):
        return f"torch {torch.__version__} has no AsyncCheckpointerType.PROCESS"
    if _no_dist():
        return "no initialised process group (DCP's checkpoint daemon process needs one)"
    return None


class AsyncHandle:
    """One async save in flight: ``staging`` (None once staged / when staging was blocking),
    ``upload`` (DCP's write future), the stager to close after the write, and the mode used."""

    def __init__(self, staging: Optional[Future], upload: Future, stager: Any, mode: str):
        self.staging, self.upload, self.stager, self.mode = staging, upload, stager, mode

    def close_stager(self) -> None:
        stager, self.stager = self.stager, None
        close = getattr(stager, "close", None)  # a no-op on stagers without one
        if close is not None:
            close()


def async_save(state: Mapping[str, Any], writer, process_group=None, mode: str = "thread",
               stager: Any = None, host_wait: bool = False) -> AsyncHandle:
    """Start DCP's async save in ``mode`` (``thread`` or ``process``: DCP's checkpoint daemon; the
    caller checked ``process_mode_unavailable()``) through ``stager`` (a persistent
    :class:`checkpointing.snapshot.SnapshotStager`). ``host_wait``: the trainer must wait for the
    host copy before its next optimizer step (``staging=host`` on an accelerator); otherwise the
    handle's staging is None and only the snapshot was paid for in the call."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    if stager is None or "async_stager" not in inspect.signature(dcp.async_save).parameters:
        # torch < 2.9: no async_stager; the writer stages (a blocking pageable copy)
        staging, upload = async_save_thread(state, writer, process_group)
        return AsyncHandle(staging, upload, None, "thread")
    kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
    with _quiet_no_dist():
        out = dcp.async_save(dict(state), storage_writer=writer, process_group=process_group,
                             async_checkpointer_type=kind, no_dist=_no_dist(), async_stager=stager)
    if isinstance(out, Future):
        return AsyncHandle(None, out, None, mode)
    staging = out.staging_completion if host_wait and not out.staging_completion.done() else None
    return AsyncHandle(staging, out.upload_completion, None, mode)


def read_metadata(path: str, is_local: bool, storage_options: Mapping[str, Any]):
    """DCP's ``.metadata`` (a pickled ``Metadata``), read without running code from it."""
    return make_reader(path, is_local, storage_options).read_metadata()


def unsafe_failure(exc: BaseException) -> Optional[UnsafeCheckpointError]:
    """The UnsafeCheckpointError behind ``exc``, if any: DCP wraps what a rank raised inside a
    load step (our ``read_metadata`` included) in a CheckpointException, per rank."""
    if isinstance(exc, UnsafeCheckpointError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and isinstance(failures, dict):
        for _, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(inner, UnsafeCheckpointError):
                return inner
    return None


def describe(exc: BaseException) -> str:
    """One line for an error: DCP's CheckpointException carries per-rank tracebacks in its
    message; name each failing rank's exception instead."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        return "; ".join(parts)
    return f"{type(exc).__name__}: {exc}"
