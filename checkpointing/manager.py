"""CheckpointManager: save (DCP shards + atomic commit), retention, resume with fallback.

The trainer builds ``state``: a dict of Stateful objects and/or nested dicts of tensors, e.g.
``{"app": AppState(model, opt), "extra": {"rng": RNGState(rank)}}``.
Everything in it goes through DCP (tensors and the optimizer's primitive hyper-parameters).
Non-tensor trainer state (data cursor, LR schedule, cost meter, W&B run id) is passed as
``trainer_state`` and lands in ``trainer_state.json``; the summary ``meta`` in ``meta.json``.
An engine that writes its own format (DeepSpeed) passes an ``EngineState`` instead of the dict
(``checkpointing.engine_state``): same commit, retention and resume, synchronous saves only.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from checkpointing import _dcp, commit, disk_space, layout, resume, retention
from checkpointing.async_saves import AsyncSaves
from checkpointing.config import CheckpointConfig
from checkpointing.engine_state import EngineState, check_files
from checkpointing.errors import CheckpointError, UnsafeCheckpointError
from checkpointing.save_result import SaveResult
from checkpointing.snapshot import state_bytes
from checkpointing.storage import Storage
from checkpointing.upload import Uploader
from checkpointing.validate import validate_checkpoint_config

log = logging.getLogger(__name__)

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


class CheckpointManager(AsyncSaves):
    """One per rank, for the ``checkpoint`` config section. With a process group, every method
    except the ``list``/``committed_steps`` queries is collective: call it on every rank."""

    def __init__(self, cfg: CheckpointConfig, output_dir: str, run_name: str, rank: int = 0, world_size: int = 1,
                 process_group: Optional["dist.ProcessGroup"] = None):
        validate_checkpoint_config(cfg)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.on_save_error: str = cfg.on_save_error
        self.storage_options: Dict[str, Any] = dict(cfg.storage_options or {})
        self.run_dir = layout.run_checkpoint_dir(cfg.root, output_dir, run_name)
        self.storage = Storage(self.run_dir, self.storage_options)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._inflight: Optional[Future] = None  # background write + commit of an async save
        self._handle: Optional[_dcp.AsyncHandle] = None
        self._record: Optional[SaveResult] = None  # the in-flight async save's (growing) record
        self._last: Optional[SaveResult] = None  # the last save that finished (or failed)
        self._need: Optional[int] = None  # rank 0: estimated bytes of the save in progress
        self._async_mode = self._resolve_async_mode(cfg.async_mode)
        self._init_async(cfg)
        self.uploader: Optional[Uploader] = None
        if cfg.upload_root:
            self.uploader = Uploader(self.storage, self.run_dir, layout.join(cfg.upload_root, run_name),
                                     self.storage_options, cfg.keep_last, cfg.keep_every)

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

    def last_save_stats(self) -> Dict[str, Any]:
        """Metrics of the last save that finished (committed or failed); {} before the first.
        Keys: ckpt_step, ckpt_ok, ckpt_staging_s, ckpt_blocked_s, ckpt_commit_s, ckpt_bytes, plus
        ckpt_upload_ok / ckpt_upload_s / ckpt_upload_bytes of the last upload with two tiers."""
        out = self._last.stats() if self._last is not None else {}
        if self.uploader is not None and self.uploader.last:
            up = self.uploader.last
            out.update(ckpt_upload_step=up["step"], ckpt_upload_ok=int(up["ok"]),
                       ckpt_upload_s=up["seconds"], ckpt_upload_bytes=up.get("bytes", -1))
        return out

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None,
             trainer_state: Optional[Mapping[str, Any]] = None) -> SaveResult:
        """Write ``state`` through DCP and commit step ``step``. Sync mode returns after the commit;
        async modes return once the write has started (thread: state staged; process: staging under
        way): call ``wait()`` before the next optimizer step and ``close()`` before exiting. A step
        already committed (a final save at the step of the last periodic one) is not written again.

        A failed save is never committed. ``on_save_error=stop`` raises CheckpointError;
        ``continue`` logs an ERROR line and returns a SaveResult with ``committed=False`` and
        ``error`` set (an async save's failure surfaces at the next ``save``/``wait_committed``/
        ``close``, the same way). Every rank sees the same outcome."""
        self.wait_committed()  # never two saves in flight
        t0 = time.perf_counter()
        try:
            return self._save(step, state, meta, trainer_state, t0)
        except CheckpointError as e:
            res = SaveResult(self.step_path(step), step, time.perf_counter() - t0, -1, committed=False,
                             error=str(e), blocked_s=time.perf_counter() - t0,
                             commit_s=time.perf_counter() - t0, mode=self.cfg.async_mode)
            return self._failed(res, e)

    def _failed(self, res: SaveResult, exc: CheckpointError) -> SaveResult:
        self._last = res
        if self.on_save_error == "stop":
            log.error("checkpoint save of step %d FAILED: %s (checkpoint.on_save_error=stop)", res.step, exc)
            raise exc
        log.error("checkpoint save of step %d FAILED, training continues "
                  "(checkpoint.on_save_error=continue): %s", res.step, exc)
        return res

    def _save(self, step: int, state: Mapping[str, Any], meta: Optional[Mapping[str, Any]],
              trainer_state: Optional[Mapping[str, Any]], t0: float) -> SaveResult:
        path = self.step_path(step)
        engine = isinstance(state, EngineState)  # the engine writes its own format (DeepSpeed)
        # rank 0 sizes the checkpoint (before the first save and each one after) against free space
        need = None
        if self.rank == 0:
            need = (disk_space.newest_size(self.storage, self.run_dir) if engine
                    else disk_space.estimate_state_bytes(state))
        prep = self._broadcast_from_0(self._prepare_step_dir(path, need) if self.rank == 0 else None)
        if prep["error"]:
            raise CheckpointError(f"saving checkpoint {path} failed before writing: {prep['error']}")
        if prep["committed"]:
            log.info("checkpoint %s is already committed; not saving it again", path)
            return SaveResult(path, step, 0.0, -1, committed=True, mode=self._async_mode)
        if engine:
            self._check_engine_target(state)
        else:
            try:
                plain = _materialise(state)
            except CheckpointError:
                raise
            except _dcp.ERRORS as e:
                raise CheckpointError(f"saving checkpoint {path} failed reading the state: "
                                      f"{_dcp.describe(e)}") from e
        full_meta = layout.build_meta(step, self.world_size, meta or {})
        trainer_state = dict(trainer_state or {})
        if not engine:
            writer = _dcp.make_writer(self.storage.native(path), self.storage.is_local,
                                      self.storage.storage_options, self._threads, self._delay_s)
            if self._async_mode in ("thread", "process"):
                return self._start_async(path, step, plain, writer, full_meta, trainer_state, t0)

        error = None
        try:
            if engine:
                state.save(self.storage.native(path))
            else:
                _dcp.save(plain, writer, self.process_group)
        except _dcp.ERRORS as e:  # noqa: BLE001 - re-raised below on every rank, with the path
            error = _dcp.describe(e)
            if disk_space.is_out_of_space(e) and not disk_space.is_out_of_space(error):
                error = f"No space left on device: {error}"  # the ENOSPC was deeper in the chain
        # The barrier: every rank's shards are durable (fsynced) once all ranks are past it.
        errors = self._all_errors(error)
        if not errors and self.rank == 0:
            try:
                if engine:  # what verify and the next load check the files against
                    full_meta["engine"] = state.describe(self.storage.native(path), self.world_size)
                commit.write_commit(self.storage, path, full_meta, trainer_state)
            except Exception as e:  # noqa: BLE001
                errors = [f"commit: {type(e).__name__}: {e}"]
        nbytes = -1
        if not errors and self.rank == 0:
            try:
                nbytes = self.storage.tree_size(path)
            except Exception as e:  # noqa: BLE001 - the commit stands; the size is a statistic
                log.warning("could not size %s: %s: %s", path, type(e).__name__, e)
        if errors and self.rank == 0 and any(disk_space.is_out_of_space(e) for e in errors):
            errors = [self._no_space(path, errors[0])]
        status = self._broadcast_from_0({"errors": errors, "bytes": nbytes} if self.rank == 0 else None)
        if status["errors"]:
            raise CheckpointError(f"saving checkpoint {path} failed (left uncommitted): "
                                  + "; ".join(status["errors"]))
        seconds = time.perf_counter() - t0
        res = SaveResult(path, step, seconds, status["bytes"] if self.rank == 0 else -1,
                         blocked_s=seconds, commit_s=seconds, mode="off")
        if self.rank == 0:
            log.info("checkpoint %s committed: %.1f MB in %.2f s", path, status["bytes"] / 1e6, seconds)
            self._after_commit(step)
        self._last = res
        return res

    def _check_engine_target(self, state: EngineState) -> None:
        if not self.storage.is_local:
            raise CheckpointError(f"{state.format} writes its checkpoint files with local file I/O: "
                                  f"checkpoint.root must be a local path or a POSIX mount, not {self.run_dir}")
        if self._async_mode != "off":
            raise CheckpointError(f"{state.format} saves synchronously: set checkpoint.async_mode=off "
                                  f"(it is {self._async_mode})")

    def _load_engine(self, state: EngineState, st: Storage, path: str, meta: Mapping[str, Any]) -> None:
        """Every rank checks the listed files first and all agree, so a missing or truncated file
        fails everywhere before any collective inside the engine's load."""
        if not meta.get("engine"):
            raise CheckpointError(f"{path} holds DCP shards (parallel.engine=fsdp2), not a {state.format} "
                                  "checkpoint: resume it with parallel.engine=fsdp2")
        problems = check_files(st, path, meta["engine"])
        errors = self._all_errors("; ".join(problems) if problems else None)
        if errors:
            raise CheckpointError(f"{state.format} checkpoint {path} is damaged: " + "; ".join(errors))
        refusal = None
        try:
            state.check_safe(st.native(path))
        except CheckpointError as e:
            refusal = {"unsafe": isinstance(e, UnsafeCheckpointError), "error": str(e)}
        refusals = [r for r in self._gather(refusal) if r]
        if refusals:  # every rank raises, before any collective inside the engine's load
            kind = UnsafeCheckpointError if any(r["unsafe"] for r in refusals) else CheckpointError
            raise kind(f"{state.format} checkpoint {path} refused: " + "; ".join(
                sorted({r["error"] for r in refusals})))
        state.load(st.native(path), meta)

    def _after_commit(self, step: int) -> None:
        """Rank 0, after a commit: retention, then (two tiers) queue the upload."""
        self._apply_retention()
        if self.uploader is not None:
            self.uploader.submit(step)

    def _prepare_step_dir(self, path: str, need: Optional[int] = None) -> Dict[str, Any]:
        """Rank 0, before any rank writes: is the step already committed? Else clear leftovers of a
        save that died there, so no stale shard survives next to the new ones; then refuse the save
        when ``need`` bytes do not fit on a local target (removing the empty step directory)."""
        try:
            if commit.is_committed(self.storage, path):
                return {"committed": True, "error": None}
            if self.storage.exists(path):
                log.warning("removing uncommitted leftovers at %s before saving there", path)
                self.storage.rm_tree(path)
            self.storage.makedirs(path)
            self._need = need
            free = disk_space.free_bytes(self.storage.native(path)) if self.storage.is_local else None
            if need and free is not None and need > free:
                self.storage.rm_tree(path)
                return {"committed": False, "error": disk_space.no_space_message(path, need, free)}
            return {"committed": False, "error": None}
        except Exception as e:  # noqa: BLE001 - raised on every rank by the caller
            return {"committed": False, "error": f"{type(e).__name__}: {e}"}

    def _no_space(self, path: str, failure: str, cleanup: bool = True) -> str:
        return disk_space.explain_failure(self.storage, path, self._need, failure, cleanup)

    def _gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` on every rank (``[obj]`` without a process group)."""
        if not self._distributed:
            return [obj]
        gathered: List[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, obj, group=self.process_group)
        return gathered

    def _all_errors(self, error: Optional[str]) -> List[str]:
        """Barrier that also tells rank 0 whether any rank failed to write its shards."""
        if not self._distributed:
            return [error] if error else []
        gathered: List[Optional[str]] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, error, group=self.process_group)
        return [f"rank {r}: {e}" for r, e in enumerate(gathered) if e]

    def prepare(self, state: Mapping[str, Any]) -> int:
        """Before the first save: this rank's state bytes; with async saves, allocate (and pin)
        the reusable host buffers in the background so no save pays for it in the loop. A
        process-mode writer needs them in shared memory: when /dev/shm cannot hold them, say so
        and write from a thread instead."""
        if isinstance(state, EngineState):
            return 0
        plain = _materialise(state)
        nbytes = state_bytes(plain)
        self._prepare_async(plain, nbytes)
        return nbytes

    def wait_committed(self) -> Optional[SaveResult]:
        """Block until the in-flight async save is written and (rank 0) committed. Returns its
        result, or None when nothing was in flight. A failure follows ``on_save_error``: stop
        raises CheckpointError, continue logs it and returns the failed SaveResult."""
        try:
            self.wait()
        except _dcp.ERRORS:
            pass  # the same failure surfaces from the write future below
        if self._inflight is None:
            return None
        fut, record = self._inflight, self._record
        self._inflight = self._handle = self._record = None
        try:
            res = fut.result()
        except _dcp.ERRORS as e:
            record.error = _dcp.describe(e)
            if disk_space.is_out_of_space(e):
                record.error = self._no_space(record.path, record.error, cleanup=self.rank == 0)
            record.committed = False
            record.commit_s = 0.0
            err = CheckpointError(f"async save of {record.path} failed (left uncommitted): {record.error}")
            return self._failed(record, err)
        self._last = res
        return res

    def close(self) -> Optional[SaveResult]:
        """Finish the in-flight save (and, with two tiers, its upload). Call before exiting; the
        result is that save's (None when none was in flight): check ``committed`` before exiting
        with "interrupted, resubmit" (PREEMPTED) after an async final save."""
        try:
            return self.wait_committed()
        finally:
            for pool in (self._executor, self._io):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._executor = self._io = None
            if self._writer_proc is not None:
                self._writer_proc.close()
                self._writer_proc = None
            if self._stager is not None:
                self._stager.close()
            if self.uploader is not None:
                self.uploader.close()

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
            if isinstance(state, EngineState):
                self._load_engine(state, st, path, meta)
            elif meta.get("engine"):
                raise CheckpointError(f"{path} was written by {meta['engine'].get('format')} "
                                      f"(parallel.engine={meta['engine'].get('format')}), not as DCP shards: "
                                      "resume it with that engine")
            else:
                reader = _dcp.make_reader(st.native(path), st.is_local, st.storage_options)
                _dcp.load(state, reader, self.process_group)
        except CheckpointError:
            raise
        except _dcp.ERRORS as e:
            unsafe = _dcp.unsafe_failure(e)
            if unsafe is not None:
                raise UnsafeCheckpointError(f"loading checkpoint {path} refused: {unsafe}") from None
            raise CheckpointError(f"loading checkpoint {path} failed: {_dcp.describe(e)}") from e
        meta["trainer_state"] = trainer_state
        meta["path"] = path
        if meta.get("world_size") not in (None, self.world_size):
            log.info("checkpoint %s was saved at world size %s; loading at %d (resharded by DCP)",
                     path, meta.get("world_size"), self.world_size)
        return meta

    def _two_tier_candidates(self, local: List[str]) -> List[str]:
        """Newest committed step of either tier first; at equal steps the local copy first (faster
        to read), the remote one as its fallback. A remote step without its marker (an upload that
        did not finish) is skipped like a local one. Remote copies are read in place via fsspec."""
        remote_steps = self.uploader.committed_steps()
        by_step: Dict[int, List[str]] = {}
        for path in local:
            by_step.setdefault(layout.parse_step(path), []).append(path)
        for step in remote_steps:
            by_step.setdefault(step, []).append(layout.step_dir(self.uploader.remote_run_dir, step))
        out = [p for step in sorted(by_step, reverse=True) for p in by_step[step]]
        if out and out[0] not in local:
            log.info("newest committed checkpoint is on the upload tier: %s", out[0])
        return out

    def load_latest(self, state: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """Resume per ``checkpoint.resume``. ``auto``: newest committed step first; one that fails
        to load is skipped with a warning naming it and the next older one is tried; if committed
        checkpoints exist and all fail, CheckpointError (never a silent fresh start). Returns the
        loaded checkpoint's meta (see ``load``), or None for a fresh start."""
        candidates = None
        if self.rank == 0:  # rank 0 chooses; every rank loads what it chose, or all stop
            disk_space.warn_capacity(self.storage, self.run_dir, state, self.cfg.keep_last,
                                     engine=isinstance(state, EngineState))
            candidates = resume.resume_candidates(self.cfg.resume, self.run_dir, self.storage,
                                                  self.storage_options)
            if self.cfg.resume == resume.AUTO and self.uploader is not None:
                candidates = self._two_tier_candidates(candidates)
        candidates = self._broadcast_from_0(candidates)
        if not candidates:
            if self.cfg.resume == resume.AUTO:
                log.info("no committed checkpoint under %s: starting fresh", self.run_dir)
            return None
        if self.cfg.resume != resume.AUTO:
            resume.agree_readable(candidates[0], self.storage_options, self._all_errors, self.world_size)
            return self.load(candidates[0], state)
        failures = []
        for path in candidates:
            try:  # a step no rank can read (corrupt, half deleted) is skipped by all, together
                unreadable = resume.agree_readable(path, self.storage_options, self._all_errors, self.world_size)
                if unreadable:
                    raise CheckpointError(unreadable)
                meta = self.load(path, state)
            except (UnsafeCheckpointError, resume.RanksDisagree):
                raise  # a crafted file, or ranks that cannot all read the step: never fall back past it
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
