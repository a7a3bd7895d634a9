"""A real HTTP model file server on 127.0.0.1 with switchable fault injection.

Tests, benchmarks and the local demo serve generated model files from it. Faults
are switched at run time through `server.faults` (a plain mutable object guarded
by a lock): drop the connection mid-file, answer an error status N times before
succeeding, serve slowly, serve wrong bytes, turn Range support off, require a
bearer token. Every request is recorded so tests can assert what the client did.

    with ModelServer({"sd15.safetensors": data}) as server:
        server.faults.drop_after_bytes = 1 << 20
        url = server.url("sd15.safetensors")
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import pathlib
import re
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = ["Faults", "ModelServer", "RequestRecord"]

_CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """Fault switches; change them at any time, they apply to the next request."""

    drop_after_bytes: int | None = None
    """Close the connection (with a TCP reset) after this many body bytes..."""
    drop_count: int = 1
    """...for this many responses (then serve normally)."""
    fail_status: int = 500
    fail_count: int = 0
    """Answer `fail_status` to this many requests before serving normally."""
    status_override: int | None = None
    """Answer every request with this status (for example 403)."""
    rate_bytes_per_s: float | None = None
    """Throttle the body to about this rate."""
    corrupt: bool = False
    """Serve the right length with wrong bytes."""
    range_support: bool = True
    """Honour Range requests (otherwise always answer 200 with the whole file)."""
    required_token: str | None = None
    """Answer 401 unless `Authorization: Bearer <token>` is sent."""
    send_content_length: bool = True
    """Send Content-Length; without it the body is delimited by closing the connection."""
    extra_bytes: int = 0
    """Append this many bytes beyond the declared Content-Length (a server that lies)."""
    redirects: dict[str, str] = field(default_factory=dict)
    """Answer 302 for these file names, pointing at the given URLs."""


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    range: str | None
    authorized: bool
    status: int


@dataclass
class _Source:
    data: bytes | None = None
    path: pathlib.Path | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]

    def etag(self) -> str:
        if self.data is not None:
            return '"' + hashlib.sha256(self.data).hexdigest()[:32] + '"'
        st = self.path.stat()  # type: ignore[union-attr]
        return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class ModelServer:
    """Threaded HTTP/1.1 server for model files; a context manager."""

    def __init__(
        self,
        files: Mapping[str, bytes | pathlib.Path] | None = None,
        *,
        directory: pathlib.Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._files: dict[str, _Source] = {}
        self._directory = directory
        self._drops_done = 0
        self._fails_done = 0
        self._host = host
        self._httpd = _QuietServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        for name, content in (files or {}).items():
            self.add(name, content)
        self._thread: threading.Thread | None = None

    # ---- content ---------------------------------------------------------

    def add(self, name: str, content: bytes | pathlib.Path) -> str:
        """Serve `content` at /`name`; returns its URL."""
        src = _Source(data=content) if isinstance(content, bytes) else _Source(path=pathlib.Path(content))
        with self._lock:
            self._files[name.lstrip("/")] = src
        return self.url(name)

    def _lookup(self, name: str) -> _Source | None:
        with self._lock:
            src = self._files.get(name)
        if src is None and self._directory is not None:
            candidate = (self._directory / name).resolve()
            if candidate.is_file() and self._directory.resolve() in candidate.parents:
                src = _Source(path=candidate)
        return src

    # ---- lifecycle -------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name.lstrip('/')}"

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="model-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- observation -----------------------------------------------------

    def request_count(self, name: str | None = None, *, method: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (name is None or r.path == "/" + name.lstrip("/")) and (method is None or r.method == method)
            )

    def range_requests(self, name: str | None = None) -> list[str]:
        with self._lock:
            return [
                r.range for r in self.requests if r.range and (name is None or r.path == "/" + name.lstrip("/"))
            ]

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self._drops_done = 0
            self._fails_done = 0

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _take_fail(self) -> bool:
        with self._lock:
            if self._fails_done < self.faults.fail_count:
                self._fails_done += 1
                return True
            return False

    def _take_drop(self) -> int | None:
        with self._lock:
            if self.faults.drop_after_bytes is not None and self._drops_done < self.faults.drop_count:
                self._drops_done += 1
                return self.faults.drop_after_bytes
            return None


class _QuietServer(http.server.ThreadingHTTPServer):
    """Clients hanging up mid-body is expected here (timeouts, cancels); do not print it."""

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _make_handler(server: ModelServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "stoker-model-server/1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _simple(self, status: int, authorized: bool) -> None:
            server._record(RequestRecord(self.command, self.path, self.headers.get("Range"), authorized, status))
            body = f"{status} {http.HTTPStatus(status).phrase}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self, *, head: bool) -> None:
            faults = server.faults
            auth = self.headers.get("Authorization")
            authorized = faults.required_token is None or auth == f"Bearer {faults.required_token}"
            if not authorized:
                return self._simple(401, authorized)
            if faults.status_override is not None:
                return self._simple(faults.status_override, authorized)
            if server._take_fail():
                return self._simple(faults.fail_status, authorized)
            name = self.path.split("?", 1)[0].lstrip("/")
            if name in faults.redirects:
                server._record(RequestRecord(self.command, self.path, self.headers.get("Range"), authorized, 302))
                self.send_response(302)
                self.send_header("Location", faults.redirects[name])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            src = server._lookup(name)
            if src is None:
                return self._simple(404, authorized)

            size = src.size
            etag = src.etag()
            start, end = 0, size - 1
            status = 200
            range_header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if range_header and faults.range_support and (if_range is None or if_range == etag):
                match = _RANGE.match(range_header.strip())
                if match is None:
                    return self._simple(400, authorized)
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else size - 1
                if start >= size or end < start:
                    server._record(RequestRecord(self.command, self.path, range_header, authorized, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                end = min(end, size - 1)
                status = 206
            length = end - start + 1
            server._record(RequestRecord(self.command, self.path, range_header, authorized, status))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", etag)
            if faults.range_support:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            if faults.send_content_length:
                self.send_header("Content-Length", str(length))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if head:
                return None
            drop_after = server._take_drop()
            self._send_body(src, start, length, drop_after=drop_after)
            if faults.extra_bytes:
                self.wfile.write(b"\0" * faults.extra_bytes)
                self.close_connection = True
            return None

        def _send_body(self, src: _Source, start: int, length: int, *, drop_after: int | None) -> None:
            faults = server.faults
            fast = drop_after is None and faults.rate_bytes_per_s is None and not faults.corrupt
            if fast and src.path is not None:
                self.wfile.flush()
                with src.path.open("rb") as fh:
                    self.connection.sendfile(fh, start, length)
                return
            sent = 0
            t0 = time.monotonic()
            fh: BinaryIO | None = src.path.open("rb") if src.path is not None else None
            try:
                if fh is not None:
                    fh.seek(start)
                while sent < length:
                    n = min(_CHUNK if faults.rate_bytes_per_s is None else 16384, length - sent)
                    if drop_after is not None:
                        n = min(n, drop_after - sent)
                        if n <= 0:
                            self._reset_connection()
                            return
                    if fh is not None:
                        chunk = fh.read(n)
                    else:
                        chunk = src.data[start + sent : start + sent + n]  # type: ignore[index]
                    if faults.corrupt:
                        chunk = bytes(b ^ 0xFF for b in chunk[:64]) + chunk[64:]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    rate = faults.rate_bytes_per_s
                    if rate:
                        # throttling is the fault being simulated, so sleeping here is the point
                        ahead_s = sent / rate - (time.monotonic() - t0)
                        if ahead_s > 0:
                            time.sleep(ahead_s)
                if drop_after is not None and drop_after <= sent:
                    self._reset_connection()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                if fh is not None:
                    fh.close()

        def _reset_connection(self) -> None:
            self.wfile.flush()
            # SO_LINGER 0 makes close() send a RST: the client sees a dropped connection
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    return Handler


def main(argv: list[str] | None = None) -> None:
    """Serve a directory of model files for local demos: `python -m stoker.testing.model_server DIR`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8089")), help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    server = ModelServer(directory=args.directory, host=args.host, port=args.port)
    print(f"serving {args.directory} at {server.base_url}", flush=True)
    server._httpd.serve_forever()


if __name__ == "__main__":
    main()
