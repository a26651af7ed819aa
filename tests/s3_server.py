"""A real S3-compatible server on 127.0.0.1 for tests (moto's server mode), and a fault proxy.

`S3Server()` starts moto's ThreadedMotoServer on a free port. `FaultProxy(target, plans)` is a
small HTTP/1.1 proxy in front of it that injects faults deterministically: `plans` maps a path
prefix (a bucket: '/faulty/') to a `FaultPlan`, and whether request (method, path, Range) fails
on its n-th try depends only on that triple and the plan, never on timing or on the order in
which concurrent requests arrive. Paths under no prefix pass untouched. Faults:
  - 'drop'     the connection is reset (RST) before any response byte;
  - '503'      HTTP 503 with S3's SlowDown error body;
  - 'slow'     no response for `plan.slow_s` (longer than the client's timeout), then a reset;
  - 'truncate' a 200 with the full Content-Length but half the body, then the connection closes.
Every fault is bounded: each request fails at most `plan.fails_per_request` times (a retry
budget larger than that always gets through), the total is capped at `plan.max_faults`, and
`plan.always_fail` names objects (path substrings) that fail on every try (503).
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("drop", "503", "slow", "truncate")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class S3Server:
    """moto's S3 server on 127.0.0.1 (a thread of this process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop()


@dataclass
class FaultPlan:
    every: int = 3
    """About one request triple in `every` gets faults (chosen by a hash of the triple)."""
    fails_per_request: int = 2
    """Tries of a chosen triple that fail before it gets through."""
    kinds: tuple[str, ...] = KINDS
    methods: tuple[str, ...] = ("GET", "HEAD")
    max_faults: int = 400
    max_slow: int = 4
    """Slow faults cost the client a whole timeout each: few of them."""
    slow_s: float = 1.5
    always_fail: tuple[str, ...] = ()
    salt: str = ""

    def fault(self, method: str, path: str, rng: str, attempt: int) -> str | None:
        if any(s in path for s in self.always_fail):
            return "503"
        if method not in self.methods or attempt >= self.fails_per_request:
            return None
        h = hashlib.sha256(f"{self.salt}|{method}|{path}|{rng}".encode()).digest()
        if h[0] % self.every:
            return None
        return self.kinds[(h[1] + attempt) % len(self.kinds)]


@dataclass
class Stats:
    faults: Counter = field(default_factory=Counter)
    requests: int = 0
    served: Counter = field(default_factory=Counter)  # (method, path, range) -> good responses


class FaultProxy:
    def __init__(self, target_port: int, plans: dict[str, FaultPlan] | None = None):
        self.plans = dict(plans or {})
        self.stats = Stats()
        self._attempts: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _reset(self) -> None:
                # RST instead of FIN: the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))  # fmt: skip
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rng = self.headers.get("Range", "")
                key = (self.command, self.path.split("?")[0], rng)
                plan = next((v for k, v in proxy.plans.items() if key[1].startswith(k)), None)
                with proxy._lock:
                    proxy.stats.requests += 1
                    attempt = proxy._attempts[key]
                    proxy._attempts[key] += 1
                    kind = plan.fault(self.command, key[1], rng, attempt) if plan else None
                    total = sum(proxy.stats.faults.values())
                    forced = plan is not None and any(s in key[1] for s in plan.always_fail)
                    if kind and total >= plan.max_faults and not forced:
                        kind = None
                    if kind == "slow" and proxy.stats.faults["slow"] >= plan.max_slow:
                        kind = "503"
                    if kind:
                        proxy.stats.faults[kind] += 1
                if kind == "drop":
                    return self._reset()
                if kind == "slow":
                    time.sleep(plan.slow_s)
                    return self._reset()
                if kind == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length",
                                         "server", "date"):  # fmt: skip
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if kind == "truncate" and self.command == "GET" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if resp.status < 300:
                    with proxy._lock:
                        proxy.stats.served[key] += 1

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError, ValueError):
                    self.close_connection = True

            def finish(self) -> None:
                try:
                    super().finish()
                except (ConnectionError, OSError, ValueError):
                    pass

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self, plans: dict[str, FaultPlan] | None = None) -> None:
        with self._lock:
            self.plans = dict(plans or {})
            self.stats = Stats()
            self._attempts.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
