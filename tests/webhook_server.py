"""A loopback HTTP server that records the JSON bodies POSTed to it (alert webhooks in tests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List


class RecordingServer:
    """``url`` accepts POSTs; ``bodies`` holds each parsed JSON body. The first ``fail_first``
    requests get a 500 (to exercise retries); ``delay_s`` holds every answer back."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0):
        self.bodies: List[dict] = []
        self.paths: List[str] = []
        self.requests = 0
        self.fail_first, self.delay_s = fail_first, delay_s
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                import time

                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n)
                outer.requests += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                if outer.requests <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.bodies.append(json.loads(body))
                outer.paths.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "RecordingServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
