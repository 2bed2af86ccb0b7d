"""Reading checkpoint pickles without running code from them.

Two pickles reach a moeforge run from checkpoint storage, and both would run code on load if read
the ordinary way:

- DCP's ``.metadata``: a plain pickle that ``FileSystemReader.read_metadata`` unpickles before any
  load planner sees it. :func:`load_dcp_metadata` reads it with an unpickler that resolves only
  the globals a real ``.metadata`` references (listed below, found by saving checkpoints of our
  models: one process, FSDP2 on 2 ranks, FSDP2 + EP on 4 ranks; torch 2.13);
- DeepSpeed's ``*.pt`` files, which DeepSpeed reads with ``torch.load(weights_only=False)``.
  :func:`check_torch_file` reads each first with torch's own ``weights_only`` unpickler (tensors,
  containers, primitives) plus the three DeepSpeed classes its checkpoints hold; the engine reads
  the file only when that passed.

A pickle names every class or function it calls as a global, and the unpickler resolves each
through ``find_class`` before it can be called: refusing there means the payload never runs. The
refusal names the file and the global, e.g. ``posix.system``.
"""

from __future__ import annotations

import importlib
import pickle
import re
from typing import IO, Iterable, Set, Tuple

import torch

from checkpointing.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["DCP_METADATA_GLOBALS", "DEEPSPEED_GLOBALS", "load_dcp_metadata", "check_torch_file"]

# Every class in this module (dataclasses and an enum) is metadata: admitted by module.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# What else a real .metadata references, and why each is harmless to call with any arguments.
DCP_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # a dataclass: path, offset, length
    ("torch", "Size"),  # a tuple subclass
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id of a local save
    ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"),  # the same class on Python >= 3.13
    ("pathlib._local", "PurePosixPath"),
})
# Classes inside DeepSpeed's checkpoint files (ZeRO 1-3, fp32 and bf16, DeepSpeed 0.19.8), beyond
# what torch's weights_only unpickler admits: plain objects and an enum, no code on construction.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _admitted(module: str, name: str) -> bool:
    if (module, name) in DCP_METADATA_GLOBALS:
        return True
    if module == _DCP_METADATA_MODULE:
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type) and obj.__module__ == module
    if module == "torch":  # dtypes pickle as torch.float32 & co
        return isinstance(getattr(torch, name, None), torch.dtype)
    return False


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals of a DCP ``.metadata``. Every way a pickle reaches a callable
    (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through ``find_class``; ``persistent_load`` is
    left undefined, so a persistent id is refused too."""

    def find_class(self, module: str, name: str):
        if not _admitted(module, name):
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


def load_dcp_metadata(stream: IO[bytes], where: str):
    """The ``Metadata`` pickled in ``stream`` (``where`` names the file in errors).
    UnsafeCheckpointError when it references anything but DCP metadata; CheckpointError when it is
    not a readable pickle at all."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        obj = _MetadataUnpickler(stream).load()
    except _Refused as e:
        raise UnsafeCheckpointError(
            f"{where} references {e.qualname}, which a DCP .metadata file never holds (only "
            f"{_DCP_METADATA_MODULE}.* and a few torch/builtin types): refused to unpickle it, so "
            "nothing in it ran. The file was not written by DCP, or was altered") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage: a damaged checkpoint
        raise CheckpointError(f"{where} is not a readable DCP .metadata file: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Metadata):
        raise UnsafeCheckpointError(f"{where} holds a {type(obj).__name__}, not DCP Metadata: refused")
    return obj


def _resolve(qualnames: Iterable[str]) -> Tuple[list, Set[str]]:
    """The objects named by ``qualnames``, and the names that could not be imported here."""
    out, missing = [], set()
    for q in qualnames:
        module, _, name = q.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            missing.add(q)  # not installed, or another version: a file referencing it cannot be vetted
    return out, missing


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch names the refused global in two wordings


def _reason(message: str) -> str:
    """The line of torch's weights_only message that says what was refused (it opens with advice
    to retry with ``weights_only=False``, which is the one thing not to do here)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "nsupported" in ln:
            return ln
    return lines[-1] if lines else message


def check_torch_file(path: str, where: str, extra_globals: Iterable[str] = ()) -> None:
    """Read the torch file at ``path`` with torch's ``weights_only`` unpickler (plus
    ``extra_globals``, dotted names), memory-mapping the tensor data so only the pickle itself is
    read. UnsafeCheckpointError naming ``where`` and the refused global when it references
    anything else; CheckpointError when it is not a readable torch file."""
    allowed, missing = _resolve(extra_globals)
    with torch.serialization.safe_globals(allowed):
        try:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = _GLOBAL.search(str(e))
            if found and found.group(1) in missing:
                raise CheckpointError(f"{where} holds {found.group(1)}, which cannot be imported here: "
                                      "install the package that wrote it to check and load the file") from None
            what = (f"references {found.group(1)}, which a checkpoint never holds" if found
                    else f"is refused by weights_only loading ({_reason(str(e))})")
            raise UnsafeCheckpointError(f"{where} {what}: refused to load it, so nothing in it ran") from None
        except Exception as e:  # noqa: BLE001 - truncated or not a torch file: a damaged checkpoint
            raise CheckpointError(f"{where} is not a readable torch file: {type(e).__name__}: {e}") from None
