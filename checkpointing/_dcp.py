"""The one module that knows torch.distributed.checkpoint's version differences and private bits.

Tested on torch 2.13 (CPU) and meant for 2.11 (GPU image): writer/reader construction, a load
planner that refuses pickled objects, and ``async_save``'s two return types.
"""

from __future__ import annotations

import contextlib
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

try:  # public name since 2.3, but keep the import failure explicit rather than an AttributeError later
    from torch.distributed.checkpoint import FsspecReader, FsspecWriter
except ImportError:  # pragma: no cover - older layouts
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

# DCP's CheckpointException derives from BaseException: ``except Exception`` does not catch it.
ERRORS = (Exception, CheckpointException)

__all__ = ["ERRORS", "make_writer", "make_reader", "WeightsOnlyLoadPlanner", "save", "load",
           "async_save_thread", "read_metadata", "describe", "Stateful"]


def make_writer(path: str, is_local: bool, storage_options: Mapping[str, Any]):
    if is_local:
        # sync_files: every shard is fsynced before DCP reports it written, so rank 0's
        # ``.metadata`` (and our marker after it) never points at data still in a page cache.
        return FileSystemWriter(path, single_file_per_rank=True, sync_files=True)
    # Object stores: a closed PUT is durable; fsync would only fall back to os.sync().
    return FsspecWriter(path, single_file_per_rank=True, sync_files=False, **dict(storage_options))


def make_reader(path: str, is_local: bool, storage_options: Mapping[str, Any]):
    if is_local:
        return FileSystemReader(path)
    return FsspecReader(path, **dict(storage_options))


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

    out = dcp.async_save(dict(state), storage_writer=writer, process_group=process_group,
                         async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=_no_dist())
    if isinstance(out, Future):
        return None, out
    # AsyncSaveResponse (torch >= 2.9 with a non-blocking stager)
    return out.staging_completion, out.upload_completion


def read_metadata(path: str, is_local: bool, storage_options: Mapping[str, Any]):
    """DCP's ``.metadata`` (a pickled ``Metadata`` written by DCP itself; DCP's own format)."""
    return make_reader(path, is_local, storage_options).read_metadata()


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
