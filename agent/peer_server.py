"""Serve this agent's verified model files to the other agents of the fleet (I/O).

Agents in one cluster reach each other at LAN speed, so a model any agent holds need
not cost a trip to its source. Each agent runs this small HTTP server on the pod
network; another agent that needs a file fetches it here instead (`peer_fetch`).

    GET /v1/blobs/sha256/<64 lowercase hex>     the file whose content has this digest
    HEAD (same path)                            its size, without the body

- Addressed by content: the only name a request can give is a sha256 digest, looked
  up in the disk tier's index of complete, verified files (`DiskStore.verified_path`).
  No path from the request ever reaches the filesystem, so there is nothing to
  traverse; a partial download is not in that index and is never served; there is
  no listing, and every other path answers 404.
- Authenticated: every request carries `Authorization: Bearer <token>`, the fleet's
  peer credential (a Secret the chart generates and mounts into agents only),
  compared in constant time. A request without it gets 401 and learns nothing about
  what this agent holds.
- Range requests (one range, `bytes=a-b`, `bytes=a-` or `bytes=-n`) resume a transfer
  cut short; the ETag is the digest itself, so `If-Range` from any holder of the same
  bytes matches.
- Serving never slows the agent's own work: at most `max_uploads` transfers run at
  once (more get 503 with Retry-After, and the fetcher tries another holder), all of
  them together within `upload_bytes_per_s` (a token bucket), sent with sendfile(2)
  from the page cache in slices, so no byte is copied through Python. The server runs
  in threads of its own, never on the agent's event loop.

A file evicted while it is being served keeps its inode until the transfer ends, so an
upload never fails because of an eviction (the disk briefly holds at most `max_uploads`
such files beyond the budget).
"""

from __future__ import annotations

import dataclasses
import hmac
import http
import http.server
import logging
import os
import pathlib
import re
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = [
    "BLOB_PATH", "PeerCredentialError", "PeerMetrics", "PeerServer", "PeerServerSettings", "TokenBucket",
    "advertised_host", "blob_path", "parse_range", "read_token",
]

log = logging.getLogger(__name__)

BLOB_PATH = re.compile(r"^/v1/blobs/sha256/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_SLICE_BYTES = 8 << 20
_REFUSALS = ("unauthorized", "busy", "not_found", "bad_request", "method_not_allowed")


class PeerCredentialError(ValueError):
    """The peer credential file exists but cannot be used; the message says why (never the value)."""


def read_token(path: pathlib.Path | None) -> str | None:
    """The fleet's peer credential from its file, or None when no file is configured or it does
    not exist (the agent then neither serves nor fetches from peers)."""
    if path is None or not path.exists():
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise PeerCredentialError(f"cannot read the peer credential {path}: {exc.strerror}") from None
    if len(token) < 16 or any(not (" " < c <= "~") for c in token):
        raise PeerCredentialError(
            f"the peer credential in {path} must be at least 16 printable ASCII characters without spaces; "
            f"let the chart generate it (agent.peer) or write such a value"
        )
    return token


def advertised_host(*, advertise: str | None, listen: str) -> str:
    """The IP address other agents use: the configured one, else the listen address when it is a
    specific one, else this host's address."""
    if advertise:
        return advertise
    if listen not in ("0.0.0.0", "::", ""):
        return listen
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def blob_path(sha256: str) -> str:
    """The path of a file on any agent's peer server."""
    return f"/v1/blobs/sha256/{sha256}"


@dataclasses.dataclass(frozen=True)
class PeerServerSettings:
    """How the peer server listens and how much it may serve."""

    token: str = dataclasses.field(repr=False)
    """The fleet's peer credential; requests must send it as a bearer token."""
    addr: str = "0.0.0.0"
    port: int = 0
    """0 picks a free port."""
    max_uploads: int = 2
    """Transfers served at once; more are refused with 503 and go to another holder."""
    upload_bytes_per_s: float = 400 * 2**20
    """All transfers together; 0 means no cap."""
    timeout_s: float = 30.0
    """A client that sends no request within this, or stops reading for this long, is dropped."""

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("the peer token must be at least 16 characters (the chart generates 48)")
        if self.max_uploads < 1:
            raise ValueError("max_uploads must be at least 1")
        if self.upload_bytes_per_s < 0:
            raise ValueError("upload_bytes_per_s must be >= 0 (0: no cap)")


class PeerMetrics:
    """The peer server's and peer fetches' metrics, in the agent's registry (fixed label values only)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.served_bytes = Counter("stoker_agent_peer_served_bytes", "Model bytes sent to other agents.", registry=r)
        self.uploads = Gauge("stoker_agent_peer_uploads_in_progress", "Transfers to other agents running now.",
                             registry=r)
        self.refused = Counter("stoker_agent_peer_refused_requests", "Peer requests answered without the file.",
                               ["reason"], registry=r)
        self.fetched_bytes = Counter("stoker_agent_peer_fetched_bytes",
                                     "Model bytes received from other agents instead of the source.", registry=r)
        self.fetch_failures = Counter("stoker_agent_peer_fetch_failures",
                                      "Fetches from a peer that failed and moved on to another holder or the source.",
                                      ["reason"], registry=r)
        for reason in _REFUSALS:
            self.refused.labels(reason)


class TokenBucket:
    """A rate limit shared by threads: `take(n)` returns once `n` bytes fit under the rate."""

    def __init__(self, rate_per_s: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate_per_s
        self.burst = burst if burst is not None else max(rate_per_s * 0.05, 64 * 1024)
        self._clock, self._sleep = clock, sleep
        self._level = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._level = min(self.burst, self._level + (now - self._at) * self.rate)
            self._at = now
            self._level -= n  # may go negative: the debt is slept off here, so the lock is never held while sleeping
            wait_s = -self._level / self.rate if self._level < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(first, last) byte of one satisfiable range; None for the whole file (no header, or
    one this server ignores, as RFC 9110 allows); False when it cannot be satisfied."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: answer with the whole file
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            return False
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return False
    return start, min(end, size - 1)


class PeerServer:
    """The agent's peer endpoint; `start()` it once, `stop()` it at exit.

    `lookup(sha256)` returns the path of a complete, verified file with that digest, or
    None; it is called from the server's threads, so it must be thread-safe."""

    def __init__(self, settings: PeerServerSettings, *, lookup: Callable[[str], pathlib.Path | None],
                 metrics: PeerMetrics | None = None) -> None:
        self.settings = settings
        self.lookup = lookup
        self.metrics = metrics or PeerMetrics()
        self.bucket = TokenBucket(settings.upload_bytes_per_s)
        self._slots = threading.BoundedSemaphore(settings.max_uploads)
        self._expected = f"Bearer {settings.token}".encode()
        self._httpd = _Server((settings.addr, settings.port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, host: str) -> str:
        """The base URL other agents use, for the address this agent is reached at."""
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{shown}:{self.port}"

    def start(self) -> PeerServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="peer-server", daemon=True)
        self._thread.start()
        log.info("serving verified model files to peers on port %d (at most %d at once, %s)", self.port,
                 self.settings.max_uploads,
                 f"{self.settings.upload_bytes_per_s / 2**20:.0f} MiB/s" if self.settings.upload_bytes_per_s else "no cap")
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_authorized(self, header: str | None) -> bool:
        # Constant time over the expected value's length, whatever was sent.
        return hmac.compare_digest((header or "").encode("latin-1", "replace"), self._expected)

    def try_acquire(self) -> bool:
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        self._slots.release()


class _Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most `MAX_CONNECTIONS` of them: more are closed at once, so
    idle or slow clients cannot pile up threads. Peers hanging up mid-transfer is normal (they go
    to another holder); it is not printed."""

    allow_reuse_address = True
    request_queue_size = 64
    MAX_CONNECTIONS = 64

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._connections = threading.BoundedSemaphore(self.MAX_CONNECTIONS)

    def process_request(self, request: object, client_address: object) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("refusing a peer connection from %s: %d are open", client_address, self.MAX_CONNECTIONS)
            self.shutdown_request(request)  # type: ignore[arg-type]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[arg-type]
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: object, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[arg-type]
        finally:
            self._connections.release()

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("peer connection from %s ended: %s", client_address, exc)
            return
        log.exception("peer server error serving %s", client_address)


def _make_handler(server: PeerServer) -> type[http.server.BaseHTTPRequestHandler]:
    settings = server.settings
    metrics = server.metrics

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "stoker-agent-peer/1"
        sys_version = ""
        timeout = settings.timeout_s

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # requests are logged below, without headers

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _refuse_method(self) -> None:
            self._answer(http.HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", extra={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

        def _answer(self, status: http.HTTPStatus, reason: str, *, extra: dict[str, str] | None = None) -> None:
            metrics.refused.labels(reason).inc()
            body = f"{status.value} {status.phrase}\n".encode()
            self.send_response(status.value)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self, *, head: bool) -> None:
            # Authentication before anything else: a stranger learns nothing, not even what exists.
            if not server.is_authorized(self.headers.get("Authorization")):
                log.info("refused an unauthenticated peer request from %s", self.client_address[0])
                return self._answer(http.HTTPStatus.UNAUTHORIZED, "unauthorized",
                                    extra={"WWW-Authenticate": 'Bearer realm="stoker-peer"'})
            match = BLOB_PATH.match(self.path)
            if match is None:
                return self._answer(http.HTTPStatus.NOT_FOUND, "not_found")
            digest = match.group(1)
            path = server.lookup(digest)
            fh = _open(path) if path is not None else None
            if fh is None:
                return self._answer(http.HTTPStatus.NOT_FOUND, "not_found")
            with fh:
                if head:
                    return self._headers(http.HTTPStatus.OK, digest, os.fstat(fh.fileno()).st_size, None)
                if not server.try_acquire():
                    return self._answer(http.HTTPStatus.SERVICE_UNAVAILABLE, "busy", extra={"Retry-After": "1"})
                metrics.uploads.inc()
                try:
                    self._send(fh, digest)
                finally:
                    metrics.uploads.dec()
                    server.release()
            return None

        def _headers(self, status: http.HTTPStatus, digest: str, size: int, span: tuple[int, int] | None) -> None:
            self.send_response(status.value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", f'"{digest}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-store")
            if span is not None:
                self.send_header("Content-Range", f"bytes {span[0]}-{span[1]}/{size}")
                self.send_header("Content-Length", str(span[1] - span[0] + 1))
            else:
                self.send_header("Content-Length", str(size))
            self.end_headers()

        def _send(self, fh: BinaryIO, digest: str) -> None:
            size = os.fstat(fh.fileno()).st_size
            span = parse_range(self.headers.get("Range"), size)
            if_range = self.headers.get("If-Range")
            if span is not None and if_range is not None and if_range.strip() != f'"{digest}"':
                span = None  # validator for other bytes: send the whole file
            if span is False:
                metrics.refused.labels("bad_request").inc()
                self.send_response(http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE.value)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            assert span is not True
            first, last = span if span is not None else (0, size - 1)
            self._headers(http.HTTPStatus.PARTIAL_CONTENT if span is not None else http.HTTPStatus.OK, digest, size,
                          span)
            self.wfile.flush()
            started = time.monotonic()
            offset, left = first, last - first + 1
            sock: socket.socket = self.connection
            rate = settings.upload_bytes_per_s
            # Slices of about 50 ms at the cap: a slow cap still sends its first bytes at once.
            slice_bytes = _SLICE_BYTES if rate <= 0 else int(min(_SLICE_BYTES, max(64 * 1024, rate * 0.05)))
            try:
                while left > 0:
                    n = min(left, slice_bytes)
                    server.bucket.take(n)
                    sent = sock.sendfile(fh, offset, n)
                    if sent <= 0:
                        break  # the file shrank under us: the fetcher's size check catches it
                    offset += sent
                    left -= sent
                    metrics.served_bytes.inc(sent)
            finally:
                elapsed = time.monotonic() - started
                done = offset - first
                log.info("served %d of %d bytes of sha256:%s… to %s in %.2fs%s", done, last - first + 1, digest[:12],
                         self.client_address[0], elapsed, "" if left <= 0 else " (the peer hung up)")
            if left > 0:
                self.close_connection = True

    return Handler


def _open(path: pathlib.Path) -> BinaryIO | None:
    """The file, opened without following a symlink, or None when it is gone (evicted since)
    or is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")
