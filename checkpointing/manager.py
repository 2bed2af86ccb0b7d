"""CheckpointManager: save (DCP shards + atomic commit), retention, resume with fallback.

The trainer builds ``state``: a dict of Stateful objects and/or nested dicts of tensors, e.g.
``{"model": ModelState(model), "optim": OptimState(model, opt), "extra": {"rng": RNGState(rank)}}``.
Everything in it goes through DCP (tensors and the optimizer's primitive hyper-parameters).
Non-tensor trainer state (data cursor, LR schedule, cost meter, W&B run id) is passed as
``trainer_state`` and lands in ``trainer_state.json``; the summary ``meta`` in ``meta.json``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from checkpointing import _dcp, commit, layout, resume, retention
from checkpointing.errors import CheckpointError, ConfigError
from checkpointing.storage import Storage

log = logging.getLogger(__name__)

ASYNC_MODES = ("off", "thread", "process")


@dataclass
class SaveResult:
    path: str
    step: int
    seconds: float  # time the caller was blocked (sync: all of it; thread: staging)
    bytes: int  # size of the step directory (rank 0; -1 on other ranks and before an async commit)
    committed: bool = True


def validate_checkpoint_config(cfg: Any) -> None:
    """Rules for the ``checkpoint`` section; each message names the key and the fix."""
    if cfg.async_mode not in ASYNC_MODES:
        raise ConfigError(f"checkpoint.async_mode={cfg.async_mode!r} must be one of {', '.join(ASYNC_MODES)}")
    if cfg.async_mode == "process":
        raise ConfigError("checkpoint.async_mode=process is not implemented yet; use off or thread")
    for key in ("every_steps", "keep_last", "keep_every"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"checkpoint.{key}={getattr(cfg, key)} must be >= 0 (0 = off)")
    if not cfg.resume:
        raise ConfigError("checkpoint.resume is empty: use auto, none or a checkpoint path")


def _check_leaves(obj: Any, where: str) -> None:
    """Only tensors and primitives may reach DCP: anything else would be pickled."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_leaves(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_leaves(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"checkpoint state {where} is a {type(obj).__name__}: only tensors and "
                          "primitives go through DCP; put other trainer state in trainer_state (JSON)")


def _materialise(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Call ``state_dict()`` on Stateful entries once, and check what DCP will write."""
    out = {}
    for key, value in state.items():
        out[key] = value.state_dict() if isinstance(value, _dcp.Stateful) else value
        _check_leaves(out[key], key)
    return out


class CheckpointManager:
    """One per rank. ``cfg`` is the ``checkpoint`` config section (duck-typed: root, keep_last,
    keep_every, resume, async_mode, storage_options). With a process group, every method except
    the ``list``/``committed_steps`` queries is collective: call it on every rank."""

    def __init__(self, cfg: Any, output_dir: str, run_name: str, rank: int = 0, world_size: int = 1,
                 process_group: Optional["dist.ProcessGroup"] = None):
        validate_checkpoint_config(cfg)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.storage_options: Dict[str, Any] = dict(cfg.storage_options or {})
        self.run_dir = layout.run_checkpoint_dir(cfg.root, output_dir, run_name)
        self.storage = Storage(self.run_dir, self.storage_options)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._inflight: Optional[Future] = None  # background upload + commit of an async save
        self._staging: Optional[Future] = None
        self._inflight_step: Optional[int] = None

    # -- distributed helpers -----------------------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _broadcast_from_0(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every rank (JSON-able values only)."""
        if not self._distributed:
            return obj
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        return box[0]

    # -- queries -----------------------------------------------------------------------------
    def step_path(self, step: int) -> str:
        return layout.step_dir(self.run_dir, step)

    def committed_steps(self) -> List[int]:
        return commit.list_committed(self.storage, self.run_dir)

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None,
             trainer_state: Optional[Mapping[str, Any]] = None) -> SaveResult:
        """Write ``state`` through DCP and commit step ``step``. Sync mode returns after the commit;
        thread mode returns once the state is staged to host memory (call ``wait()`` before the next
        optimizer step and ``wait_committed()`` before exiting). A step already committed (a final
        save at the step of the last periodic one) is not written again."""
        self.wait_committed()  # never two saves in flight
        path = self.step_path(step)
        t0 = time.perf_counter()
        prep = self._broadcast_from_0(self._prepare_step_dir(path) if self.rank == 0 else None)
        if prep["error"]:
            raise CheckpointError(f"saving checkpoint {path} failed before writing: {prep['error']}")
        if prep["committed"]:
            log.info("checkpoint %s is already committed; not saving it again", path)
            return SaveResult(path, step, 0.0, -1, committed=True)
        plain = _materialise(state)
        full_meta = layout.build_meta(step, self.world_size, meta or {})
        trainer_state = dict(trainer_state or {})
        writer = _dcp.make_writer(self.storage.native(path), self.storage.is_local, self.storage_options)

        if self.cfg.async_mode == "thread":
            staging, upload = _dcp.async_save_thread(plain, writer, self.process_group)
            del plain  # the stager holds its own host copy
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
            self._staging = staging
            self._inflight_step = step
            self._inflight = self._executor.submit(self._finish_async, path, upload, full_meta, trainer_state)
            return SaveResult(path, step, time.perf_counter() - t0, -1, committed=False)

        error = None
        try:
            _dcp.save(plain, writer, self.process_group)
        except _dcp.ERRORS as e:  # noqa: BLE001 - re-raised below on every rank, with the path
            error = _dcp.describe(e)
        # The barrier: every rank's shards are durable (fsynced) once all ranks are past it.
        errors = self._all_errors(error)
        if not errors and self.rank == 0:
            try:
                commit.write_commit(self.storage, path, full_meta, trainer_state)
            except Exception as e:  # noqa: BLE001
                errors = [f"commit: {type(e).__name__}: {e}"]
        status = self._broadcast_from_0(
            {"errors": errors, "bytes": self.storage.tree_size(path) if not errors else -1}
            if self.rank == 0 else None)
        if status["errors"]:
            raise CheckpointError(f"saving checkpoint {path} failed (left uncommitted): "
                                  + "; ".join(status["errors"]))
        seconds = time.perf_counter() - t0
        if self.rank == 0:
            log.info("checkpoint %s committed: %.1f MB in %.2f s", path, status["bytes"] / 1e6, seconds)
            self._apply_retention()
        return SaveResult(path, step, seconds, status["bytes"] if self.rank == 0 else -1)

    def _prepare_step_dir(self, path: str) -> Dict[str, Any]:
        """Rank 0, before any rank writes: is the step already committed? Else clear leftovers of a
        save that died there, so no stale shard survives next to the new ones."""
        try:
            if commit.is_committed(self.storage, path):
                return {"committed": True, "error": None}
            if self.storage.exists(path):
                log.warning("removing uncommitted leftovers at %s before saving there", path)
                self.storage.rm_tree(path)
            self.storage.makedirs(path)
            return {"committed": False, "error": None}
        except Exception as e:  # noqa: BLE001 - raised on every rank by the caller
            return {"committed": False, "error": f"{type(e).__name__}: {e}"}

    def _all_errors(self, error: Optional[str]) -> List[str]:
        """Barrier that also tells rank 0 whether any rank failed to write its shards."""
        if not self._distributed:
            return [error] if error else []
        gathered: List[Optional[str]] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, error, group=self.process_group)
        return [f"rank {r}: {e}" for r, e in enumerate(gathered) if e]

    def _finish_async(self, path: str, upload: Future, meta: Dict[str, Any],
                      trainer_state: Dict[str, Any]) -> SaveResult:
        """Background: the marker only after the upload future completed. DCP's save finishes on
        rank 0 only after gathering every rank's write results, so rank 0 needs no extra barrier."""
        t0 = time.perf_counter()
        upload.result()
        if self.rank != 0:
            return SaveResult(path, meta["step"], 0.0, -1, committed=False)
        commit.write_commit(self.storage, path, meta, trainer_state)
        nbytes = self.storage.tree_size(path)
        log.info("checkpoint %s committed in the background: %.1f MB, %.2f s after staging",
                 path, nbytes / 1e6, time.perf_counter() - t0)
        self._apply_retention()
        return SaveResult(path, meta["step"], time.perf_counter() - t0, nbytes)

    def wait(self) -> None:
        """Block until the in-flight async save has staged its copy (call before the optimizer
        mutates the parameters again). A no-op in sync mode."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def wait_committed(self) -> Optional[SaveResult]:
        """Block until the in-flight async save is written and (rank 0) committed. Raises
        CheckpointError if it failed. Returns its result, or None when nothing was in flight."""
        self.wait()
        if self._inflight is None:
            return None
        fut, step = self._inflight, self._inflight_step
        self._inflight = self._inflight_step = None
        try:
            return fut.result()
        except _dcp.ERRORS as e:
            raise CheckpointError(f"async save of {self.step_path(step)} failed (left uncommitted): "
                                  f"{_dcp.describe(e)}") from e

    def close(self) -> None:
        try:
            self.wait_committed()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _apply_retention(self) -> None:
        steps = self.committed_steps()
        for step in retention.steps_to_delete(steps, self.cfg.keep_last, self.cfg.keep_every):
            path = self.step_path(step)
            try:
                # The marker goes first: a half-deleted step must never look committed.
                self.storage.rm_file(layout.join(path, layout.COMMIT_MARKER))
                self.storage.rm_tree(path)
                log.info("retention: deleted %s", path)
            except Exception as e:  # noqa: BLE001 - retention must never stop training
                log.warning("retention: could not delete %s: %s: %s", path, type(e).__name__, e)

    # -- load --------------------------------------------------------------------------------
    def load(self, path: str, state: Mapping[str, Any]) -> Dict[str, Any]:
        """Load the committed checkpoint at ``path`` into ``state`` in place. Returns its meta.json
        content plus ``trainer_state`` (trainer_state.json) and ``path``."""
        path = path.rstrip("/")
        st = Storage(path, self.storage_options)
        if not commit.is_committed(st, path):
            raise CheckpointError(f"{path} is not a committed checkpoint (no {layout.COMMIT_MARKER})")
        try:
            meta = commit.read_meta(st, path)
            trainer_state = commit.read_trainer_state(st, path)
            reader = _dcp.make_reader(st.native(path), st.is_local, self.storage_options)
            _dcp.load(state, reader, self.process_group)
        except _dcp.ERRORS as e:
            raise CheckpointError(f"loading checkpoint {path} failed: {_dcp.describe(e)}") from e
        meta["trainer_state"] = trainer_state
        meta["path"] = path
        if meta.get("world_size") not in (None, self.world_size):
            log.info("checkpoint %s was saved at world size %s; loading at %d (resharded by DCP)",
                     path, meta.get("world_size"), self.world_size)
        return meta

    def load_latest(self, state: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """Resume per ``checkpoint.resume``. ``auto``: newest committed step first; one that fails
        to load is skipped with a warning naming it and the next older one is tried; if committed
        checkpoints exist and all fail, CheckpointError (never a silent fresh start). Returns the
        loaded checkpoint's meta (see ``load``), or None for a fresh start."""
        candidates = resume.resume_candidates(self.cfg.resume, self.run_dir, self.storage,
                                              self.storage_options)
        if not candidates:
            if self.cfg.resume == resume.AUTO:
                log.info("no committed checkpoint under %s: starting fresh", self.run_dir)
            return None
        if self.cfg.resume != resume.AUTO:
            return self.load(candidates[0], state)
        failures = []
        for path in candidates:
            try:
                meta = self.load(path, state)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s; trying the next older one", path, e)
                failures.append(str(e))
                continue
            if failures:
                log.warning("resumed from %s after %d newer checkpoint(s) failed to load",
                            path, len(failures))
            return meta
        raise CheckpointError(f"all {len(candidates)} committed checkpoints under {self.run_dir} failed "
                              "to load; refusing to start fresh over them:\n  " + "\n  ".join(failures))
