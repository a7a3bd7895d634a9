"""The agent's health endpoints for the kubelet's probes (shell).

- `/readyz`: 200 once the agent has registered and renewed its Lease, while renewals keep
  succeeding within the Lease's duration; 503 before that, when they stop, and while draining.
- `/healthz` (liveness): 503 when the Lease renewal loop stalls (no attempt finished, good or
  bad, for the Lease's duration: the agent's event loop or a thread is stuck), or when every
  renewal has failed for `failing_renewals_limit_s`. The kubelet then restarts a stuck agent
  instead of leaving it on its jobs. Renewals that fail only briefly (the API server restarting,
  an outage of every agent at once) make the agent unready, not dead: restarting a whole fleet
  because the API server is away would only throw away its RAM and VRAM tiers. Before the first
  renewal (the startup probe's time) and while draining it answers 200.

The server runs in its own thread, so it answers even when the agent's event loop is stuck:
that is the case it exists to report.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Health:
    """What the probes report. The agent calls `renewal(ok=...)` after every Lease renewal attempt,
    `started()` once registered and reporting, and `stopping()` on SIGTERM."""

    def __init__(self, *, stale_after_s: float, failing_renewals_limit_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self.failing_renewals_limit_s = failing_renewals_limit_s
        self._clock = clock
        self._last_attempt: float | None = None
        self._last_success: float | None = None
        self._started = False
        self._stopping = False
        self._lock = threading.Lock()

    def renewal(self, *, ok: bool) -> None:
        """A Lease renewal attempt finished just now."""
        with self._lock:
            now = self._clock()
            self._last_attempt = now
            if ok:
                self._last_success = now

    def started(self) -> None:
        with self._lock:
            self._started = True

    def stopping(self) -> None:
        with self._lock:
            self._stopping = True

    def live(self) -> tuple[bool, str]:
        with self._lock:
            if self._stopping:
                return True, "draining"
            if not self._started or self._last_attempt is None or self._last_success is None:
                return True, "starting"
            now = self._clock()
            stalled_s, failing_s = now - self._last_attempt, now - self._last_success
            if stalled_s > self.stale_after_s:
                return False, f"the Lease renewal loop is stuck: no attempt finished for {stalled_s:.0f}s"
            if failing_s > self.failing_renewals_limit_s:
                return False, f"every Lease renewal failed for {failing_s:.0f}s"
            return True, f"Lease renewed {failing_s:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            if self._stopping:
                return False, "draining"
            if not self._started or self._last_success is None:
                return False, "starting"
            age = self._clock() - self._last_success
            if age > self.stale_after_s:
                return False, f"no Lease renewal for {age:.0f}s: the operator counts this agent as NotReady"
            return True, f"Lease renewed {age:.1f}s ago"


def serve(health: Health, *, port: int, addr: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    """Serve /healthz and /readyz from a daemon thread; port 0 picks a free one. Returns the
    server and its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            check = {"/healthz": health.live, "/readyz": health.ready}.get(self.path.split("?", 1)[0])
            if check is None:
                self._send(404, {"ok": False, "detail": "not found; try /healthz or /readyz"})
                return
            ok, detail = check()
            self._send(200 if ok else 503, {"ok": ok, "detail": detail})

        def _send(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # probed every few seconds: not worth a log line
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    server = Server((addr, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    bound = int(server.server_address[1])
    log.info("serving /healthz and /readyz on %s:%d", f"[{addr}]" if ":" in addr else addr, bound)
    return server, bound
