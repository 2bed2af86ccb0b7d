"""The one module that knows torch.distributed.checkpoint's version differences and private bits.

Tested on torch 2.13 (CPU) and meant for 2.11 (GPU image): writer/reader construction (a reader
whose ``.metadata`` goes through a restricted unpickler, a writer that stops DCP's daemon process
from outliving its trainer), a load planner that refuses pickled objects, ``async_save``'s two
return types, and the async PROCESS checkpointer with a fresh ``DefaultStager`` per save
(feature-detected, never version-compared).
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
           "async_save_thread", "async_save", "DeviceSnapshotStager", "process_mode_unavailable", "AsyncHandle",
           "read_metadata", "describe", "unsafe_failure", "Stateful"]


class _LocalWriter(ParentWatchingMixin, FileSystemWriter):
    """DCP's writer; in process mode, the daemon that unpickles it exits when the trainer dies."""


class _FsspecWriter(ParentWatchingMixin, FsspecWriter):
    """The same for object stores."""


def make_writer(path: str, is_local: bool, storage_options: Mapping[str, Any]):
    if is_local:
        # sync_files: every shard is fsynced before DCP reports it written, so rank 0's
        # ``.metadata`` (and our marker after it) never points at data still in a page cache.
        return _LocalWriter(path, single_file_per_rank=True, sync_files=True)
    # Object stores: a closed PUT is durable; fsync would only fall back to os.sync().
    return _FsspecWriter(path, single_file_per_rank=True, sync_files=False, **dict(storage_options))


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


def _fresh_stager():
    """A new ``DefaultStager`` for one save, or None where torch has none. Never reused: on torch
    2.11 a second ``async_save`` through the same stager failed with ``KeyError: <class 'type'>``
    in ``deepcopy_with_tensor_offload``. Pinned memory and non-blocking copies only with CUDA
    (pinning needs a CUDA context); shared memory so the daemon process reads the staged copy
    without another copy; async staging so the trainer is blocked only until ``wait()``."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=True,
                                        use_async_staging=True, use_non_blocking_copy=cuda))


def _map(obj: Any, fn) -> Any:
    """``fn`` applied to every tensor (DTensors through their local shard) of a nested state."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return DTensor.from_local(fn(obj.to_local()), obj.device_mesh, obj.placements, run_check=False,
                                  shape=obj.shape, stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


class DeviceSnapshotStager:
    """``checkpoint.staging=device``: stage by copying the state to spare accelerator memory.

    ``stage`` clones every tensor on its own device (a device-to-device copy: ~4 TB/s on an
    H100/H200, so tens of milliseconds for tens of GB) and waits for that copy only; the trainer
    may change its parameters right after. A background thread then copies the snapshot to host
    memory on a side CUDA stream (training kernels keep the default stream) and hands it to DCP's
    writer, freeing the snapshot. Costs free device memory equal to the local state for the
    duration of the host copy. Duck-typed ``AsyncStager`` (DCP's protocol: stage / synchronize_staging
    / close / should_synchronize_after_execute)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge-d2h")
        self.snapshot_s = 0.0

    def stage(self, state_dict):
        import time

        t0 = time.perf_counter()
        snap = _map(state_dict, lambda t: t.detach().clone())
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the snapshot is complete; params may change
        self.snapshot_s = time.perf_counter() - t0
        return self._pool.submit(self._to_host, snap)

    @staticmethod
    def _to_host(snap):
        if not torch.cuda.is_available():
            return snap  # already host memory (a CPU run): the clone is the staged copy
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            host = _map(snap, lambda t: t.to("cpu") if t.is_cuda else t)
        side.synchronize()
        return host

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` returns after the device snapshot is complete, and the host
        copy is the upload's business (DCP waits on the future ``stage`` returned)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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
               staging: str = "host") -> AsyncHandle:
    """Start an async save in ``mode`` (``thread`` or ``process``); the caller checked
    ``process_mode_unavailable()`` first. Host staging: a fresh ``DefaultStager`` (pinned,
    asynchronous) where DCP has one, else the writer's blocking copy. Device staging (thread mode):
    :class:`DeviceSnapshotStager`; the trainer need not wait for the host copy, so the handle's
    staging is None once ``async_save`` returns."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    if staging == "device":
        if mode != "thread" or "async_stager" not in inspect.signature(dcp.async_save).parameters:
            raise ValueError("checkpoint.staging=device needs checkpoint.async_mode=thread and a torch whose "
                             "dcp.async_save takes async_stager (>= 2.9)")
        stager = DeviceSnapshotStager()
        try:
            with _quiet_no_dist():
                out = dcp.async_save(dict(state), storage_writer=writer, process_group=process_group,
                                     async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=_no_dist(),
                                     async_stager=stager)
        except BaseException:
            stager.close()
            raise
        upload = out if isinstance(out, Future) else out.upload_completion
        return AsyncHandle(None, upload, stager, "thread")

    # async_stager= arrived with DefaultStager; older DCP stages with the writer (blocking). Both
    # modes stage through a fresh stager: pinned memory and non-blocking copies on GPU (the
    # writer's own staging is a blocking pageable copy: 14.5 s for 23.6 GB on an H200).
    takes_stager = "async_stager" in inspect.signature(dcp.async_save).parameters
    stager = _fresh_stager() if takes_stager else None
    if stager is None and mode == "thread":
        staging, upload = async_save_thread(state, writer, process_group)
        return AsyncHandle(staging, upload, None, "thread")
    kwargs = {"async_stager": stager} if stager is not None else {}
    kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
    try:
        with _quiet_no_dist():
            out = dcp.async_save(dict(state), storage_writer=writer, process_group=process_group,
                                 async_checkpointer_type=kind, no_dist=_no_dist(), **kwargs)
    except BaseException:
        if stager is not None:
            getattr(stager, "close", lambda: None)()
        raise
    if isinstance(out, Future):
        return AsyncHandle(None, out, stager, mode)
    return AsyncHandle(out.staging_completion, out.upload_completion, stager, mode)


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
