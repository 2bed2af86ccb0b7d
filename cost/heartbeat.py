"""The heartbeat file: rank 0 rewrites ``RUN_DIR/heartbeat.json`` with the cost state and the
goodput ledger, so the next attempt can bill the time a killed attempt ran after its last
checkpoint (docs/cost.md)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional

from cost.meter import CostMeter

log = logging.getLogger("moeforge")

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_VERSION = 1


def write_json_atomic(path: str, obj: Any) -> None:
    """Write-then-rename: a reader sees the old file or the new one, never half of one."""
    from checkpointing.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False))


def read_heartbeat(run_dir: str) -> Optional[Dict[str, Any]]:
    """The run directory's heartbeat, or None when there is none. An unreadable one is reported
    (warning naming the file) and ignored: totals then come from the checkpoint alone."""
    path = os.path.join(run_dir, HEARTBEAT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            hb = json.load(f)
        if int(hb.get("version", 1)) > HEARTBEAT_VERSION:
            raise ValueError(f"heartbeat version {hb.get('version')} is newer than this code")
        return hb
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s): the cost of attempts after the last checkpoint "
                    "is not billed; delete the file to silence this", path, e)
        return None


class Heartbeat:
    """Rank 0 rewrites ``RUN_DIR/heartbeat.json`` at most every ``every_s`` seconds (and on
    ``force``): the cost state (attempt history), the goodput ledger and anything extra."""

    def __init__(self, run_dir: str, every_s: float = 30.0, enabled: bool = True):
        self.path = os.path.join(run_dir, HEARTBEAT_FILE)
        self.every_s = float(every_s)
        self.enabled = enabled
        self._last_write = -float("inf")

    def maybe_write(self, meter: CostMeter, ledger: Any = None, now: Optional[float] = None,
                    force: bool = False, **extra: Any) -> bool:
        now = time.time() if now is None else now
        if not self.enabled or (not force and now - self._last_write < self.every_s):
            return False
        body = {"version": HEARTBEAT_VERSION, "updated": now, "cost": meter.state_dict(now)}
        if ledger is not None:
            body["goodput"] = ledger.state_dict()
        body.update(extra)
        write_json_atomic(self.path, body)
        self._last_write = now
        return True
