"""Run alerts: one entry, ``alert(event, text, level)``, for every site (budget thresholds, NaN
rollbacks, preemption, an unhealthy node, a failed save); docs/monitoring.md lists them.

Destinations, set once per process by ``configure`` (rank 0 sends; other ranks' calls are no-ops):

- W&B (``logging.wandb=true``): ``wandb.alert`` on the run, attached when the run opens. The call
  only queues a record for wandb's own service process, so it is made on the caller's thread.
- ``logging.alert_webhook``: a JSON POST with a Slack-compatible body (``{"text": ...}`` plus
  ``event``, ``level``, ``run``) to any URL, from one background thread: a timeout per attempt,
  a few attempts with backoff, and a bounded queue, so a slow or dead receiver never blocks a
  step. ``shutdown`` waits (bounded) for what is queued before the process leaves.

This module imports nothing of moeforge's, so any package may call it (cost and health never
import train).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from typing import Any, Optional

log = logging.getLogger("moeforge")

LEVELS = ("INFO", "WARN", "ERROR")
EVENTS = ("budget", "nan_rollback", "preemption", "unhealthy", "save_failed")
TIMEOUT_S = 5.0
ATTEMPTS = 3
BACKOFF_S = 0.5
MAX_QUEUED = 64  # an alert storm drops the excess (logged) rather than growing without bound


class _Webhook:
    """POSTs from a daemon thread; ``post`` never blocks."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S, attempts: int = ATTEMPTS):
        self.url, self.timeout_s, self.attempts = url, timeout_s, attempts
        self.q: "queue.Queue[Optional[dict]]" = queue.Queue(maxsize=MAX_QUEUED)
        self.sent = self.failed = 0
        self.thread = threading.Thread(target=self._run, name="moeforge-alert-webhook", daemon=True)
        self.thread.start()

    def post(self, body: dict) -> None:
        try:
            self.q.put_nowait(body)
        except queue.Full:
            log.warning("alert webhook: %d alerts queued already; dropped: %s", MAX_QUEUED, body.get("text"))

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        for attempt in range(1, self.attempts + 1):
            req = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    r.read()
                self.sent += 1
                return
            except Exception as e:  # any failure: retry, then say so (never raise into the run)
                if attempt == self.attempts:
                    self.failed += 1
                    log.warning("alert webhook: %s not delivered after %d attempts (%s: %s)",
                                body.get("event"), attempt, type(e).__name__, e)
                    return
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))

    def _run(self) -> None:
        while True:
            body = self.q.get()
            try:
                if body is None:
                    return
                self._send(body)
            finally:
                self.q.task_done()

    def close(self, timeout_s: float) -> None:
        """Deliver what is queued, waiting at most ``timeout_s``."""
        try:
            self.q.put(None, timeout=max(0.1, timeout_s))
        except queue.Full:
            return
        self.thread.join(timeout_s)


class Alerts:
    def __init__(self, run: str = "", enabled: bool = True, webhook: str = ""):
        self.run, self.enabled = run, enabled
        self.webhook = _Webhook(webhook) if webhook and enabled else None
        self.wandb_run: Any = None

    def alert(self, event: str, text: str, level: str = "WARN") -> None:
        if not self.enabled:
            return
        level = level if level in LEVELS else "WARN"
        title = f"moeforge {self.run}: {event}" if self.run else f"moeforge: {event}"
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level))
            except Exception as e:  # an alert must not kill the run: say so loudly instead
                log.warning("W&B alert %s failed: %s: %s", event, type(e).__name__, e)
        if self.webhook is not None:
            self.webhook.post({"text": f"[{level}] {title}: {text}", "event": event, "level": level,
                               "run": self.run})

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.wandb_run = None
        if self.webhook is not None:
            self.webhook.close(timeout_s)
            self.webhook = None


_current = Alerts(enabled=False)


def configure(run: str, enabled: bool, webhook: str = "") -> Alerts:
    """This process's alerts (train/main.py: rank 0 enabled). Replaces any earlier configuration."""
    global _current
    _current.shutdown(timeout_s=1.0)
    _current = Alerts(run=run, enabled=enabled, webhook=webhook)
    return _current


def attach_wandb(run: Any) -> None:
    """W&B alerts from now on (None detaches: call before ``run.finish()``)."""
    _current.wandb_run = run


def alert(event: str, text: str, level: str = "WARN") -> None:
    """Send one alert to every configured destination; never raises, never blocks a step."""
    _current.alert(event, text, level)


def shutdown(timeout_s: float = 10.0) -> None:
    _current.shutdown(timeout_s)
