"""What one checkpoint save did: the record ``CheckpointManager.save`` returns and its metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class SaveResult:
    """What one ``save`` did. ``committed`` False with ``error`` set: the save failed and was left
    uncommitted (``on_save_error=continue``); False without ``error``: an async save still in
    flight (its final result comes from ``wait_committed()`` / ``close()`` / ``last_save_stats()``),
    or, on ranks other than 0 after an async save, a write that succeeded but whose marker only
    rank 0 writes (decide on rank 0's value)."""

    path: str
    step: int
    seconds: float  # time the caller was blocked in save() (sync: all of it; async: until staged/started)
    bytes: int  # size of the step directory (rank 0; -1 on other ranks and before an async commit)
    committed: bool = True
    error: Optional[str] = None
    staging_s: float = 0.0  # save() start -> state copied to host memory (sync: 0, written in place)
    blocked_s: float = 0.0  # caller blocked: in save() plus in wait() for this save's staging
    commit_s: float = 0.0  # save() start -> marker written (rank 0) / write done (other ranks)
    mode: str = "off"  # the async mode actually used (process falls back to thread, logged)
    snapshot_s: float = 0.0  # in save(): the consistent copy (device clones, or CPU copies): the step pays this
    write_s: float = 0.0  # serialise + write the shards (background for async saves)
    started_at: float = 0.0  # time.perf_counter() at save() start (how long an async save has been writing)

    def stats(self) -> Dict[str, Any]:
        """Flat metrics for the trainer's metrics line / JSONL."""
        # ok = no failure seen by this rank (after an async save only rank 0 sees the marker, so
        # ``committed`` is rank 0's to report; the trainer logs rank 0's metrics)
        return {"ckpt_step": self.step, "ckpt_ok": int(self.error is None),
                "ckpt_staging_s": self.staging_s, "ckpt_blocked_s": self.blocked_s,
                "ckpt_commit_s": self.commit_s, "ckpt_bytes": self.bytes,
                "ckpt_snapshot_s": self.snapshot_s, "ckpt_write_s": self.write_s}

    def phases(self) -> str:
        """``snapshot 0.31 s, host copy 1.20 s, write 17.9 s, committed 19.6 s after save()``."""
        return (f"snapshot {self.snapshot_s:.2f} s, host copy {self.staging_s:.2f} s, write {self.write_s:.1f} s, "
                f"committed {self.commit_s:.1f} s after save()")
