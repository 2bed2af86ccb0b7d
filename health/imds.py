"""EC2 instance metadata (IMDSv2) client and the spot-interruption watcher.

Protocol: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` returns a token;
every GET carries it in ``X-aws-ec2-metadata-token``. ``/latest/meta-data/spot/instance-action`` is
404 until AWS schedules an interruption (~2 minutes ahead, best effort), then 200
``{"action": "terminate|stop|hibernate", "time": "...Z"}``. AWS recommends polling every 5 s.

Off EC2 nothing is sent at all: with the default endpoint the client first asks the machine itself
(DMI vendor / hypervisor UUID, local files) whether it is an EC2 instance, and stays off when it is
not, so a laptop or CI never sends a packet to 169.254.169.254. Where the machine does look like
EC2, the token request is retried with backoff (``PROBE_ATTEMPTS``; one lost packet must not
price a run at $0), then the client disables itself. A node that should have IMDS (EC2 by its DMI,
or an endpoint set explicitly) and cannot reach it logs one WARNING saying what is off (spot
notices, pricing) and which keys to set. ``AWS_EC2_METADATA_DISABLED=true`` (the AWS SDKs' switch)
turns it off outright; a non-default endpoint (a test's loopback server) is always probed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from datetime import datetime

from health.background import BackgroundThread
from health.exit_codes import ExitCode
from health.flags import StopFlags

log = logging.getLogger("moeforge.health")

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
SPOT_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
INSTANCE_TYPE_PATH = "/latest/meta-data/instance-type"
LIFE_CYCLE_PATH = "/latest/meta-data/instance-life-cycle"

PROBE_ATTEMPTS = 3  # token requests before IMDS is declared unreachable
PROBE_BACKOFF_S = 0.25  # first wait between attempts; doubles each time
_WARNED: set = set()  # endpoints already warned about in this process (once each)

# IMDS is link-local: never route it through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


_EC2_HINTS = ("/sys/class/dmi/id/sys_vendor", "/sys/class/dmi/id/board_asset_tag",
              "/sys/class/dmi/id/bios_vendor", "/sys/hypervisor/uuid", "/sys/class/dmi/id/product_uuid")


def looks_like_ec2(hint_paths=_EC2_HINTS) -> bool:
    """Local evidence (no network) that this is an EC2 instance: Nitro DMI says "Amazon EC2" and
    asset tags start with "i-"; Xen instances have a hypervisor UUID starting with "ec2"."""
    for path in hint_paths:
        try:
            with open(path) as f:
                value = f.read().strip().lower()
        except OSError:
            continue
        if "amazon" in value or value.startswith("ec2") or value.startswith("i-"):
            return True
    return False


class ImdsClient:
    """Small IMDSv2 client. Every getter returns None when IMDS is disabled or the path is 404."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 0.5, token_ttl_s: int = 21600):
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.token_ttl_s = int(token_ttl_s)
        self._token: str | None = None
        self._token_expiry = 0.0
        self.disabled = os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true" or not endpoint
        self._probed = False
        self.disabled_reason = "AWS_EC2_METADATA_DISABLED=true" if self.disabled else ""
        # Should this node have IMDS? EC2 by its own DMI, or an endpoint someone set on purpose.
        self.on_ec2 = bool(endpoint) and (self.endpoint != DEFAULT_ENDPOINT or looks_like_ec2())
        if not self.disabled and not self.on_ec2:
            self.disabled, self.disabled_reason = True, "not an EC2 instance (DMI/hypervisor)"

    # ------------------------------------------------------------------ protocol
    def _fetch_token(self) -> str:
        req = urllib.request.Request(self.endpoint + TOKEN_PATH, method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)})
        with _OPENER.open(req, timeout=self.timeout_s) as r:
            token = r.read().decode().strip()
        self._token = token
        self._token_expiry = time.monotonic() + max(1, self.token_ttl_s - 60)
        return token

    def available(self) -> bool:
        """Probe once (a token request); on any failure disable the client for good."""
        if self.disabled:
            return False
        if not self._probed:
            self._probed = True
            error = None
            for attempt in range(PROBE_ATTEMPTS):
                try:
                    self._fetch_token()
                    error = None
                    break
                except (OSError, urllib.error.URLError, ValueError) as e:
                    error = e
                    if attempt + 1 < PROBE_ATTEMPTS:
                        time.sleep(PROBE_BACKOFF_S * 2 ** attempt)
            if error is not None:
                self.disabled = True
                self.disabled_reason = (f"no IMDSv2 at {self.endpoint} after {PROBE_ATTEMPTS} tries "
                                        f"({error.__class__.__name__}: {error})")
                self._warn_unreachable()
                return False
            if attempt:
                log.info("IMDS answered at %s on try %d of %d", self.endpoint, attempt + 1, PROBE_ATTEMPTS)
        return True

    def _warn_unreachable(self) -> None:
        """Once per endpoint and process: on a node that should have IMDS this is not routine."""
        if self.endpoint in _WARNED:
            return
        _WARNED.add(self.endpoint)
        log.warning("IMDS unreachable on what looks like an EC2 instance: %s. Spot notices and pricing are "
                    "off (no checkpoint-and-exit on a spot notice; the run is priced from cluster=, $0 for "
                    "cluster=local). Set cost.price_per_hour=<$ per instance-hour> and check "
                    "health.imds_endpoint=%s (or the instance's metadata options: IMDSv2, hop limit >= 2 "
                    "in containers)", self.disabled_reason, self.endpoint)

    def get(self, path: str) -> str | None:
        """GET a metadata path: its body, or None on 404 / when disabled. Retries once on 401."""
        if not self.available():
            return None
        for attempt in (0, 1):
            if self._token is None or time.monotonic() >= self._token_expiry:
                self._fetch_token()
            req = urllib.request.Request(self.endpoint + path, headers={"X-aws-ec2-metadata-token": self._token})
            try:
                with _OPENER.open(req, timeout=self.timeout_s) as r:
                    return r.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code == 401 and attempt == 0:
                    self._token = None  # expired or revoked: fetch a fresh one and retry once
                    continue
                raise
        return None

    # ------------------------------------------------------------------ metadata
    def spot_instance_action(self) -> dict | None:
        body = self.get(SPOT_ACTION_PATH)
        return json.loads(body) if body else None

    def rebalance_recommendation(self) -> dict | None:
        body = self.get(REBALANCE_PATH)
        return json.loads(body) if body else None

    def instance_type(self) -> str | None:
        body = self.get(INSTANCE_TYPE_PATH)
        return body.strip() if body else None

    def instance_life_cycle(self) -> str | None:
        """'spot' or 'on-demand' (the cost meter's lifecycle), None off EC2."""
        body = self.get(LIFE_CYCLE_PATH)
        return body.strip() if body else None


def parse_notice_time(s: str) -> float | None:
    """'2026-11-22T03:00:00Z' -> epoch seconds (None when unparseable)."""
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class PreemptionWatcher:
    """Daemon thread: polls spot/instance-action every ``interval_s``; on a notice requests
    ``ExitCode.PREEMPTED`` once.

    A rebalance recommendation (capacity risk, not a notice) logs a warning; with
    ``act_on_rebalance=True`` it also requests a checkpoint-and-exit PREEMPTED.
    """

    def __init__(self, flags: StopFlags, endpoint: str = DEFAULT_ENDPOINT, interval_s: float = 5.0,
                 timeout_s: float = 0.5, act_on_rebalance: bool = False, client: ImdsClient | None = None,
                 max_polls: int | None = None):
        self.flags = flags
        self.client = client or ImdsClient(endpoint, timeout_s=timeout_s)
        self.interval_s = interval_s
        self.act_on_rebalance = act_on_rebalance
        self.max_polls = max_polls  # bound for tests; None = until stop()
        self.notice: dict | None = None
        self.deadline: float | None = None  # epoch seconds of the announced termination
        self.rebalance: dict | None = None
        self.polls = 0
        self.errors = 0
        self._thread = BackgroundThread("moeforge-imds", self._run)
        self._stop = self._thread.stop_event

    def start(self) -> bool:
        """Start polling; False (and no thread) when IMDS is not reachable."""
        if not self.client.available():
            return False
        self._thread.start()
        return True

    def stop(self, timeout: float = 2.0) -> None:
        self._thread.stop(timeout)

    def poll_once(self) -> None:
        self.polls += 1
        try:
            action = self.client.spot_instance_action()
            rebalance = self.client.rebalance_recommendation() if self.rebalance is None else None
        except (OSError, urllib.error.URLError, ValueError) as e:
            self.errors += 1  # one failed poll is not a notice; keep polling, but say so
            if self.errors == 1 or self.errors % 60 == 0:  # the first, then every ~5 min at 5 s polls
                log.warning("IMDS spot-notice poll failed (%d so far): %s: a spot notice may be missed while "
                            "this lasts", self.errors, e)
            return
        if action and self.notice is None:
            self.notice = action
            when = action.get("time", "?")
            self.deadline = parse_notice_time(when)
            reason = f"spot interruption notice: {action.get('action', '?')} at {when}"
            log.warning("%s; requesting checkpoint and exit %d", reason, ExitCode.PREEMPTED)
            self.flags.request(ExitCode.PREEMPTED, reason)
        if rebalance and self.rebalance is None:
            self.rebalance = rebalance
            msg = f"EC2 rebalance recommendation (noticeTime {rebalance.get('noticeTime', '?')})"
            if self.act_on_rebalance:
                log.warning("%s; health.act_on_rebalance=true: checkpoint and exit %d", msg, ExitCode.PREEMPTED)
                self.flags.request(ExitCode.PREEMPTED, msg)
            else:
                log.warning("%s: spot capacity at risk; continuing (health.act_on_rebalance=false)", msg)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            if self.notice is not None or (self.max_polls is not None and self.polls >= self.max_polls):
                return
            self._stop.wait(self.interval_s)
