"""Checkpoints written by a training engine in its own format (DeepSpeed), inside our step directory.

The commit protocol is unchanged (``checkpointing.commit``): every rank writes the engine's files,
each rank fsyncs its own, a barrier, then rank 0 lists what was written into ``meta.json``
(``engine``: format, tag, world size, every file and its size) and writes the marker last. That
listing is what ``python -m checkpointing verify`` checks, and what a load checks on every rank
before the engine reads anything (so a truncated or missing file fails on all ranks together,
before any collective inside the engine's load).

    step_<N>/
        deepspeed/                  DeepSpeed's tag directory: mp_rank_00_model_states.pt,
                                    *zero_pp_rank_<r>_mp_rank_00_optim_states.pt (ZeRO-3: model
                                    states per rank too)
        zero_to_fp32.py             DeepSpeed's own consolidation script, copied by it
        trainer_state.json, meta.json, COMMITTED

Nothing here imports DeepSpeed: the engine object is used through ``save_checkpoint`` /
``load_checkpoint`` only.
"""

from __future__ import annotations

import abc
import os
import re
from typing import Any, Dict, List, Mapping

from checkpointing import layout
from checkpointing.filecheck import check_listed_files
from checkpointing.safe_pickle import DEEPSPEED_GLOBALS, check_torch_file
from checkpointing.storage import Storage

OUR_FILES = (layout.META_FILE, layout.TRAINER_STATE_FILE, layout.COMMIT_MARKER)


class EngineState(abc.ABC):
    """Handed to ``CheckpointManager.save``/``load`` instead of a dict of Stateful objects."""

    format = "engine"

    @abc.abstractmethod
    def save(self, step_dir: str) -> None:
        """Collective: every rank writes its files under ``step_dir`` (a local path) and fsyncs them."""

    @abc.abstractmethod
    def load(self, step_dir: str, meta: Mapping[str, Any]) -> None:
        """Collective: read the files back into the engine. ``meta`` is the step's meta.json."""

    def expected_files(self, world_size: int) -> List[str]:
        """Relative paths that must exist after a save at ``world_size`` ranks."""
        return []

    def check_safe(self, step_dir: str) -> None:
        """Before ``load``: raise UnsafeCheckpointError when a file the engine would read could run
        code when read (the engine's own reader may unpickle anything)."""

    def describe(self, step_dir: str, world_size: int) -> Dict[str, Any]:
        """Rank 0, after every rank's save returned: meta.json's ``engine`` entry. Raises when an
        expected file is missing (the step is then left uncommitted)."""
        files = listing(step_dir)
        missing = [f for f in self.expected_files(world_size) if f not in files]
        if missing:
            raise RuntimeError(f"{self.format} save left no {', '.join(missing)} in {step_dir}")
        return {"format": self.format, "world_size": world_size, "files": files, **self.info()}

    def info(self) -> Dict[str, Any]:
        return {}


def listing(step_dir: str) -> Dict[str, int]:
    """Every file under a local step directory but our own JSON and marker: relative path -> bytes."""
    out: Dict[str, int] = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, step_dir).replace(os.sep, "/")
            if rel not in OUR_FILES and not rel.endswith(".tmp"):
                out[rel] = os.path.getsize(full)
    return dict(sorted(out.items()))


def check_files(st: Storage, step_dir: str, engine_meta: Mapping[str, Any], read: bool = False) -> List[str]:
    """Problems with an engine checkpoint's files against meta.json's listing ([] = good):
    missing, another size, or (``read``) unreadable to the end."""
    files = engine_meta.get("files")
    if not isinstance(files, Mapping) or not files:
        return [f"{layout.META_FILE}: engine entry lists no files"]
    return check_listed_files(st, step_dir, files, layout.META_FILE, exact=True, read=read)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DeepSpeedState(EngineState):
    """A DeepSpeed engine's checkpoint, in ``<step_dir>/deepspeed/`` (DeepSpeed's own format: its
    tools, e.g. ``zero_to_fp32.py``, read it). Loads at the world size and ZeRO stage it was saved
    with only: DeepSpeed does not repartition ZeRO state across world sizes."""

    format = "deepspeed"
    TAG = "deepspeed"
    _RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")

    def __init__(self, engine: Any, rank: int, world_size: int):
        self.engine, self.rank, self.world_size = engine, rank, world_size

    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def info(self) -> Dict[str, Any]:
        from importlib.metadata import version

        return {"tag": self.TAG, "zero_stage": self.zero_stage(), "deepspeed_version": version("deepspeed"),
                "bf16": bool(self.engine.bfloat16_enabled())}

    def expected_files(self, world_size: int) -> List[str]:
        prefix = "bf16_" if self.engine.bfloat16_enabled() else ""
        out = [f"{self.TAG}/{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
        if self.zero_stage() == 3:
            out += [f"{self.TAG}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
        else:
            out.append(f"{self.TAG}/mp_rank_00_model_states.pt")
        return out

    def check_safe(self, step_dir: str) -> None:
        """DeepSpeed reads its files with ``torch.load(weights_only=False)``. Every file in the tag
        directory is read first with torch's ``weights_only`` unpickler plus DeepSpeed's own
        checkpoint classes (memory-mapped: only the pickles are read), so a crafted file is refused
        before DeepSpeed touches it. A file swapped between this check and DeepSpeed's read is
        outside what this covers."""
        tag_dir = os.path.join(step_dir, self.TAG)
        for root, _, names in os.walk(tag_dir):
            for name in sorted(names):
                full = os.path.join(root, name)
                check_torch_file(full, full, DEEPSPEED_GLOBALS)

    def save(self, step_dir: str) -> None:
        self.engine.save_checkpoint(step_dir, tag=self.TAG, client_state={}, save_latest=False)
        # DeepSpeed's torch.save does not fsync: each rank makes its own files durable (rank 0 also
        # the rank-less ones) before the manager's barrier, so the marker never precedes the data.
        for root, _, names in os.walk(step_dir):
            for name in names:
                m = self._RANK_FILE.search(name)
                if (int(m.group(1)) if m else 0) == self.rank:
                    _fsync(os.path.join(root, name))
        if self.rank == 0:
            _fsync(os.path.join(step_dir, self.TAG))
            _fsync(step_dir)

    def load(self, step_dir: str, meta: Mapping[str, Any]) -> None:
        engine_meta = meta.get("engine") or {}
        saved_ws, saved_stage = meta.get("world_size"), engine_meta.get("zero_stage")
        if saved_ws != self.world_size:
            raise ValueError(f"DeepSpeed checkpoint {step_dir} was saved at world size {saved_ws}; this run has "
                             f"{self.world_size}: DeepSpeed cannot repartition ZeRO state, so resume at world "
                             f"size {saved_ws} (checkpoints of parallel.engine=fsdp2 reshard)")
        if saved_stage != self.zero_stage():
            raise ValueError(f"DeepSpeed checkpoint {step_dir} was saved with parallel.deepspeed.zero_stage="
                             f"{saved_stage}; this run has {self.zero_stage()}: resume with zero_stage="
                             f"{saved_stage}")
        path, _ = self.engine.load_checkpoint(step_dir, tag=engine_meta.get("tag", self.TAG),
                                              load_module_strict=True, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint under {step_dir}")
