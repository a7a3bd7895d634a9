"""Overall deadlines and minimum transfer rates for blocking HTTP requests (I/O).

httpx's timeouts bound each socket operation, not a request: a server that sends one byte
every few seconds, in its headers or its body, keeps a request alive for ever, and with it
the thread that made it. A `Guard` bounds everything a thread sends and receives while it is
active: an absolute deadline, and optionally a minimum average rate over a sliding window.

It works at the socket: `GuardedTransport` is httpx's own transport whose network backend
clamps every connect, read and write to what the guard allows, so the checks cost nothing
per received chunk in the callers' loops, and a trickle is cut off inside the read that
waits for it. A tripped guard surfaces as `httpx.ReadTimeout` (or Connect/WriteTimeout);
`Guard.tripped` says which limit it was.

    with http_guard.guarded(Guard.lasting(120.0)) as guard:
        client.put(url, content=data)        # raises httpx.TimeoutException past 120 s
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import typing
from collections.abc import Callable, Iterator

import httpcore
import httpx

__all__ = ["Guard", "GuardedTransport", "current", "guarded"]

_local = threading.local()


@dataclasses.dataclass
class Guard:
    """Limits on one thread's HTTP traffic while it is active (`guarded`)."""

    deadline: float | None = None
    """`clock()` time after which nothing more may be sent or received."""
    min_bytes_per_s: float = 0.0
    """Received bytes per second, on average over each `window_s`, below which the transfer is cut off; 0: no rule."""
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    tripped: str | None = None
    """None, "deadline" or "throughput": which limit ended the transfer."""
    received_bytes: int = 0
    _window_start: float = dataclasses.field(default=0.0, init=False)
    _window_bytes: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        self._window_start = self.clock()

    @classmethod
    def lasting(cls, seconds: float, **kwargs: typing.Any) -> Guard:
        """A guard whose deadline is `seconds` from now."""
        clock = kwargs.get("clock", time.monotonic)
        return cls(deadline=clock() + seconds, **kwargs)

    def restart_window(self) -> None:
        """Measure the rate afresh (a new attempt; time spent backing off does not count)."""
        self._window_start, self._window_bytes = self.clock(), 0

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def describe(self) -> str:
        """Why the guard tripped, for an error message."""
        if self.tripped == "throughput":
            return f"slower than {self.min_bytes_per_s:.0f} bytes/s on average over {self.window_s:.0f} s"
        if self.tripped == "deadline":
            return "past its deadline"
        return "within its limits"

    # ---- used by the guarded streams

    def _next_check_s(self) -> float | None:
        """Seconds until a limit must be checked again even without traffic (None: never)."""
        now = self.clock()
        waits = []
        if self.deadline is not None:
            waits.append(self.deadline - now)
        if self.min_bytes_per_s > 0:
            waits.append(self._window_start + self.window_s - now)
        return min(waits) if waits else None

    def _check(self) -> None:
        """Trip (and raise) when a limit is passed; start a new window when the last one was fast enough."""
        now = self.clock()
        if self.tripped is None and self.deadline is not None and now >= self.deadline:
            self.tripped = "deadline"
        elif self.tripped is None and self.min_bytes_per_s > 0 and now - self._window_start >= self.window_s:
            if self._window_bytes < self.min_bytes_per_s * (now - self._window_start):
                self.tripped = "throughput"
            else:
                self.restart_window()
        if self.tripped is not None:
            raise httpcore.ReadTimeout(f"transfer {self.describe()}")

    def _count(self, n: int) -> None:
        self.received_bytes += n
        self._window_bytes += n


def current() -> Guard | None:
    """The guard active in this thread, if any."""
    return getattr(_local, "guard", None)


@contextlib.contextmanager
def guarded(guard: Guard) -> Iterator[Guard]:
    """Apply `guard` to every request this thread makes inside the block (through a `GuardedTransport`)."""
    previous = current()
    _local.guard = guard
    try:
        yield guard
    finally:
        _local.guard = previous


def _clamp(timeout: float | None, guard: Guard) -> float | None:
    """`timeout` shortened to the guard's next check (never 0: a socket would turn non-blocking)."""
    limit = guard._next_check_s()
    if limit is None:
        return timeout
    limit = max(limit, 0.001)
    return limit if timeout is None else min(timeout, limit)


class _GuardedStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, read_bytes: int = 0) -> None:
        self._stream = stream
        self._read_bytes = read_bytes

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # h11 takes whatever a read returns, so a larger read than httpcore's 64 KiB is safe:
        # a bulk download then costs one recv and one parser pass per MiB instead of sixteen
        max_bytes = max(max_bytes, self._read_bytes)
        guard = current()
        if guard is None:
            return self._stream.read(max_bytes, timeout)
        started = time.monotonic()
        while True:
            guard._check()
            wait = timeout
            if timeout is not None:
                wait = timeout - (time.monotonic() - started)
                if wait <= 0:
                    raise httpcore.ReadTimeout("timed out")
            try:
                data = self._stream.read(max_bytes, _clamp(wait, guard))
            except httpcore.ReadTimeout:
                if timeout is not None and time.monotonic() - started >= timeout:
                    raise
                continue  # woke up to check the guard's limits
            guard._count(len(data))
            return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        guard = current()
        if guard is not None:
            guard._check()
            timeout = _clamp(timeout, guard)
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: typing.Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        guard = current()
        if guard is not None:
            guard._check()
            timeout = _clamp(timeout, guard)
        return _GuardedStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._read_bytes)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend, read_bytes: int = 0) -> None:
        self._backend = backend
        self._read_bytes = read_bytes

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        guard = current()
        if guard is not None:
            guard._check()
            timeout = _clamp(timeout, guard)
        return _GuardedStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options), self._read_bytes)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        return _GuardedStream(self._backend.connect_unix_socket(path, timeout, socket_options), self._read_bytes)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's HTTP transport (same arguments), with every connection subject to the thread's `Guard`.

    `read_bytes`: the least each socket read asks for (0: httpcore's own size); bulk transfers
    set it to a MiB or so.
    """

    def __init__(self, *, read_bytes: int = 0, **kwargs: typing.Any) -> None:
        super().__init__(**kwargs)
        pool = getattr(self, "_pool", None)
        if pool is None or not hasattr(pool, "_network_backend"):  # pinned httpx/httpcore versions have it
            raise RuntimeError("this httpx version keeps its connection pool elsewhere; update GuardedTransport")
        pool._network_backend = _GuardedBackend(pool._network_backend, read_bytes)
