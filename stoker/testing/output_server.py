"""A real HTTP PUT endpoint on loopback standing in for an object store, with hostile modes.

Tests point GenerationJobs' output URLs at it. `mode` picks what it does with a PUT:

- "store": keep the body, answer 200 (a well-behaved presigned URL);
- "status": answer `status` (403, 500, ...);
- "redirect": answer 307 to `location`;
- "trickle": answer 200, one byte of the status line every `gap_s`;
- "huge": answer 200 with a body of `body_bytes` bytes, written as fast as the client reads;
- "silent": read the request, then say nothing until the client gives up.

Every request is recorded (path and body size), so tests can assert what was sent.
"""

from __future__ import annotations

import dataclasses
import http.server
import socket
import threading
from typing import Literal

__all__ = ["OutputServer"]

Mode = Literal["store", "status", "redirect", "trickle", "huge", "silent"]


@dataclasses.dataclass
class _Request:
    path: str
    body_bytes: int


class OutputServer:
    """A threaded HTTP/1.1 PUT server on `host`; a context manager."""

    def __init__(self, mode: Mode = "store", *, host: str = "127.0.0.1", status: int = 200, location: str = "",
                 gap_s: float = 0.5, body_bytes: int = 1 << 30) -> None:
        self.mode, self.status, self.location, self.gap_s, self.body_bytes = mode, status, location, gap_s, body_bytes
        self.host = host
        self.requests: list[_Request] = []
        self.stored: dict[str, bytes] = {}
        self.sent_body_bytes = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = http.server.ThreadingHTTPServer((host, 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> OutputServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="output-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _handler(server: OutputServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with server._lock:
                server.requests.append(_Request(self.path, len(body)))
            self.close_connection = True
            try:
                self._answer(body)
            except OSError:
                pass  # the client gave up: that is what the hostile modes are for

        def _answer(self, body: bytes) -> None:
            mode = server.mode
            if mode == "store":
                with server._lock:
                    server.stored[self.path.split("?", 1)[0]] = body
                self._write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            elif mode == "status":
                self._write(f"HTTP/1.1 {server.status} Refused\r\nContent-Length: 0\r\n\r\n".encode())
            elif mode == "redirect":
                self._write(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {server.location}\r\n"
                            "Content-Length: 0\r\n\r\n".encode())
            elif mode == "trickle":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    self._write(bytes([byte]))
                    if server._closing.wait(server.gap_s):  # the trickle is the fault being simulated
                        return
            elif mode == "huge":
                self._write(f"HTTP/1.1 200 OK\r\nContent-Length: {server.body_bytes}\r\n\r\n".encode())
                block = b"\0" * (1 << 20)
                while server.sent_body_bytes < server.body_bytes and not server._closing.is_set():
                    self._write(block)
                    server.sent_body_bytes += len(block)
            elif mode == "silent":
                self.connection.settimeout(None)
                while not server._closing.wait(0.2):
                    try:
                        self.connection.setblocking(False)
                        if self.connection.recv(1, socket.MSG_PEEK) == b"":
                            return  # the client hung up
                    except BlockingIOError:
                        pass

        def _write(self, data: bytes) -> None:
            self.wfile.write(data)
            self.wfile.flush()

    return Handler
