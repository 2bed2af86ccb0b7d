"""Two tiers: commit fast to ``checkpoint.root`` (local disk / FSx), then copy the committed step
to ``checkpoint.upload_root`` (s3://...) in the background.

The remote copy follows the same commit protocol as a direct S3 save: every shard and JSON file is
PUT first, the ``COMMITTED`` marker object last, so a remote step without its marker is an upload
that did not finish and resume skips it. Uploads run one at a time on one thread (rank 0 only; the
local root must be visible to rank 0: one node, or a shared file system such as FSx). A failed
upload is logged and never stops training: the local commit already made the step safe.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional

from checkpointing import commit, layout, retention
from checkpointing.storage import Storage

log = logging.getLogger(__name__)


def upload_step(local: Storage, local_step_dir: str, remote: Storage, remote_step_dir: str) -> int:
    """Copy one committed step directory; the marker last. Returns the bytes uploaded."""
    if remote.exists(layout.join(remote_step_dir, layout.COMMIT_MARKER)):
        return 0  # already there (a re-run of the same step)
    remote.rm_tree(remote_step_dir)  # leftovers of an upload that died
    src = local._p(local_step_dir)
    nbytes = 0
    for rel in local.files(local_step_dir):
        if rel == layout.COMMIT_MARKER or os.path.basename(rel).startswith(".tmp."):
            continue
        remote.put_file(os.path.join(src, rel), layout.join(remote_step_dir, rel))
        nbytes += os.path.getsize(os.path.join(src, rel))
    marker = local.read_bytes(layout.join(local_step_dir, layout.COMMIT_MARKER))
    remote.write_atomic(layout.join(remote_step_dir, layout.COMMIT_MARKER), marker)
    return nbytes


class Uploader:
    """Background copier of committed steps to the remote tier, with retention applied there."""

    def __init__(self, local: Storage, local_run_dir: str, remote_run_dir: str,
                 storage_options: Mapping[str, Any], keep_last: int, keep_every: int):
        self.local, self.local_run_dir = local, local_run_dir
        self.remote_run_dir = remote_run_dir
        self.remote = Storage(remote_run_dir, storage_options)
        self.keep_last, self.keep_every = keep_last, keep_every
        self._executor: Optional[ThreadPoolExecutor] = None
        self._inflight: Optional[Future] = None
        self.last: Dict[str, Any] = {}

    def submit(self, step: int, on_done: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        """Queue the upload of committed local ``step``; waits for the previous upload first
        (never two in flight, so a slow store slows saves down instead of piling them up)."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._inflight = self._executor.submit(self._run, step, on_done)

    def _run(self, step: int, on_done) -> Dict[str, Any]:
        t0 = time.perf_counter()
        src = layout.step_dir(self.local_run_dir, step)
        dst = layout.step_dir(self.remote_run_dir, step)
        stats: Dict[str, Any] = {"step": step, "path": dst}
        try:
            stats["bytes"] = upload_step(self.local, src, self.remote, dst)
            stats.update(ok=True, seconds=time.perf_counter() - t0)
            log.info("checkpoint %s uploaded to %s: %.1f MB in %.2f s", src, dst, stats["bytes"] / 1e6,
                     stats["seconds"])
            self._retention()
        except Exception as e:  # noqa: BLE001 - the local commit stands; say so loudly
            stats.update(ok=False, seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
            log.error("checkpoint upload of step %d to %s FAILED (left without a marker there; the "
                      "local commit at %s stands): %s", step, dst, src, stats["error"])
        self.last = stats
        if on_done is not None:
            on_done(stats)
        return stats

    def _retention(self) -> None:
        for step in retention.steps_to_delete(self.committed_steps(), self.keep_last, self.keep_every):
            path = layout.step_dir(self.remote_run_dir, step)
            try:
                self.remote.rm_file(layout.join(path, layout.COMMIT_MARKER))
                self.remote.rm_tree(path)
                log.info("retention: deleted %s", path)
            except Exception as e:  # noqa: BLE001
                log.warning("retention: could not delete %s: %s: %s", path, type(e).__name__, e)

    def committed_steps(self) -> List[int]:
        return commit.list_committed(self.remote, self.remote_run_dir)

    def wait(self) -> Optional[Dict[str, Any]]:
        if self._inflight is None:
            return None
        fut, self._inflight = self._inflight, None
        return fut.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
