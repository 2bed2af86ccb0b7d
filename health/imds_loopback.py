"""A loopback EC2 instance-metadata server speaking IMDSv2, for spot-notice drills (``python -m bench
ckpt_drill``) and the tests: shipped with health/ so an installed moeforge has it too.

Self-contained (stdlib only). ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds``
(1..21600, else 400); every GET needs a valid ``X-aws-ec2-metadata-token`` (else 401).
``spot/instance-action`` is 404 until ``arm_spot_notice()``; the rebalance path likewise until
``arm_rebalance()``.

    with ImdsServer(instance_type="p5.48xlarge", life_cycle="spot") as srv:
        ...  # point health.imds_endpoint=srv.endpoint
        srv.arm_spot_notice(in_s=120)

Standalone (e.g. for Slurm tests): ``python -m health.imds_loopback [--port P] [--arm-after S]``
prints ``endpoint=http://127.0.0.1:PORT`` and serves until killed (``--max-s`` bounds it).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_PATH = "/latest/api/token"
SPOT_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
INSTANCE_TYPE_PATH = "/latest/meta-data/instance-type"
LIFE_CYCLE_PATH = "/latest/meta-data/instance-life-cycle"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ImdsServer:
    def __init__(self, instance_type: str = "p5.48xlarge", life_cycle: str = "spot", port: int = 0):
        self.instance_type = instance_type
        self.life_cycle = life_cycle
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._spot: dict | None = None
        self._rebalance: dict | None = None
        self._fail_tokens = 0
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for assertions
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ImdsServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="imds-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(2.0)

    def __enter__(self) -> "ImdsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def arm_spot_notice(self, action: str = "terminate", in_s: float = 120.0) -> dict:
        """From now on instance-action returns 200 with a termination ``in_s`` seconds ahead."""
        with self._lock:
            self._spot = {"action": action, "time": _iso(time.time() + in_s)}
            return dict(self._spot)

    def arm_rebalance(self) -> dict:
        with self._lock:
            self._rebalance = {"noticeTime": _iso(time.time())}
            return dict(self._rebalance)

    def disarm(self) -> None:
        with self._lock:
            self._spot = self._rebalance = None

    def fail_next_tokens(self, n: int) -> None:
        """The next ``n`` token requests get 503 (a flaky first probe)."""
        with self._lock:
            self._fail_tokens = int(n)

    def revoke_tokens(self) -> None:
        """Invalidate every issued token (the client must fetch a new one: 401 then retry)."""
        with self._lock:
            self._tokens.clear()

    def count(self, path: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for _, p, s in self.requests if p == path and (status is None or s == status))

    # ------------------------------------------------------------------ HTTP
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: str = "", ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with server._lock:
                    server.requests.append((self.command, self.path, status))

            def do_PUT(self):
                if self.path != TOKEN_PATH:
                    return self._send(404, "Not Found")
                with server._lock:
                    flaky, server._fail_tokens = server._fail_tokens > 0, max(0, server._fail_tokens - 1)
                if flaky:
                    return self._send(503, "Service Unavailable")
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                try:
                    ttl_s = int(ttl)
                except (TypeError, ValueError):
                    return self._send(400, "Missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
                if not 1 <= ttl_s <= 21600:
                    return self._send(400, "TTL out of range")
                token = secrets.token_urlsafe(32)
                with server._lock:
                    server._tokens[token] = time.monotonic() + ttl_s
                self._send(200, token)

            def do_GET(self):
                token = self.headers.get("X-aws-ec2-metadata-token")
                with server._lock:
                    expiry = server._tokens.get(token or "")
                    spot, rebalance = server._spot, server._rebalance
                if expiry is None or expiry < time.monotonic():
                    return self._send(401, "Unauthorized")
                if self.path == SPOT_ACTION_PATH:
                    return self._send(200, json.dumps(spot), "application/json") if spot else self._send(404, "Not Found")
                if self.path == REBALANCE_PATH:
                    return (self._send(200, json.dumps(rebalance), "application/json") if rebalance
                            else self._send(404, "Not Found"))
                if self.path == INSTANCE_TYPE_PATH:
                    return self._send(200, server.instance_type)
                if self.path == LIFE_CYCLE_PATH:
                    return self._send(200, server.life_cycle)
                self._send(404, "Not Found")

        return Handler


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="loopback IMDSv2 server for tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--instance-type", default="p5.48xlarge")
    ap.add_argument("--life-cycle", default="spot")
    ap.add_argument("--arm-after", type=float, default=-1.0, help="arm the spot notice after S seconds")
    ap.add_argument("--notice-in", type=float, default=120.0)
    ap.add_argument("--max-s", type=float, default=3600.0, help="exit after this many seconds")
    a = ap.parse_args(argv)
    srv = ImdsServer(a.instance_type, a.life_cycle, a.port).start()
    print(f"endpoint={srv.endpoint}", flush=True)
    t0 = time.monotonic()
    armed = False
    try:
        while time.monotonic() - t0 < a.max_s:
            if not armed and a.arm_after >= 0 and time.monotonic() - t0 >= a.arm_after:
                srv.arm_spot_notice(in_s=a.notice_in)
                armed = True
                print("armed", flush=True)
            time.sleep(0.1)
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
