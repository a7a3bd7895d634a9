"""Safe model downloads: stream to a partial file, resume, verify, rename atomically.

One `Downloader.download` call fetches one URL into `dest`:

- the body streams into `<dest>.part` next to `dest` (same filesystem, so the
  final rename is atomic), with a small `<dest>.part.json` sidecar naming the
  source and the server's validator (ETag / Last-Modified) so a later attempt,
  even after a crash, can resume with an HTTP Range request (`If-Range` guards
  against the file having changed); a server without Range support restarts;
- transient failures (5xx, 408/429, connection resets, timeouts) are retried
  with exponential backoff and jitter; 4xx are not;
- the size is checked against Content-Length / Content-Range and the size hint,
  the sha256 against the expected digest; a mismatch removes the partial file;
- the file is fsynced, renamed into place, and the directory fsynced.

Only https is allowed unless the policy allows http; an optional host allowlist
is checked on the URL and on every redirect. Credentials are sent only to the
origin of the requested URL and never appear in logs, reprs or error messages;
URLs in messages lose their query string (presigned URLs carry signatures).

Blocking by design: the agent runs it in a worker thread (`asyncio.to_thread`)
so hashing and file writes never stall the event loop. Progress is a plain
object the caller can read from any thread while the download runs.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import logging
import os
import pathlib
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx

from stoker.agent import http_guard
from stoker.agent.urls import URLError, ascii_host, host_allowed, parse_http_url, redact_url

__all__ = [
    "CredentialError",
    "Credentials",
    "DownloadError",
    "DownloadFailure",
    "DownloadPolicy",
    "DownloadProgress",
    "DownloadRequest",
    "DownloadResult",
    "Downloader",
    "ascii_host",
    "check_url",
    "host_allowed",
    "partial_paths",
    "quiet_http_client_logs",
    "redact_url",
]

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_HASH_READ_BYTES = 8 << 20
_WRITE_BYTES = 1 << 20
_SOCKET_READ_BYTES = 1 << 20  # 1.22 CPU-s/GB against 1.50 with httpcore's 64 KiB reads (bench/download_bench.py)
_FLUSH_INTERVAL_S = 0.05
_WRITE_PARTS = 512  # below IOV_MAX (1024 on Linux): one writev takes them all


class DownloadFailure(enum.StrEnum):
    """Machine-readable reasons, used in CRD status, Events and metrics labels."""

    CHECKSUM_MISMATCH = "ChecksumMismatch"
    SIZE_MISMATCH = "SizeMismatch"
    HTTP_NOT_FOUND = "HTTPNotFound"
    HTTP_FORBIDDEN = "HTTPForbidden"
    HTTP_UNAUTHORIZED = "HTTPUnauthorized"
    HTTP_CLIENT_ERROR = "HTTPClientError"
    HTTP_SERVER_ERROR = "HTTPServerError"
    HTTP_TOO_MANY_REQUESTS = "HTTPTooManyRequests"
    CONNECTION_FAILED = "ConnectionFailed"
    TIMEOUT = "Timeout"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    SIZE_UNKNOWN = "SizeUnknown"
    URL_NOT_ALLOWED = "URLNotAllowed"
    TOO_MANY_REDIRECTS = "TooManyRedirects"
    CANCELLED = "Cancelled"
    IO_ERROR = "IOError"
    INVALID_REQUEST = "InvalidRequest"


_RETRYABLE = frozenset(
    {
        DownloadFailure.HTTP_SERVER_ERROR,
        DownloadFailure.HTTP_TOO_MANY_REQUESTS,
        DownloadFailure.CONNECTION_FAILED,
        DownloadFailure.TIMEOUT,
        DownloadFailure.DEADLINE_EXCEEDED,
    }
)


class CredentialError(ValueError):
    """A credential cannot be sent; the message names the header, never the value."""


class DownloadError(Exception):
    """A download failed; `reason` is machine-readable, the message is for people."""

    def __init__(
        self,
        reason: DownloadFailure,
        message: str,
        *,
        url: str | None = None,
        status_code: int | None = None,
        attempts: int = 0,
        os_errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.url = url
        self.status_code = status_code
        self.attempts = attempts
        self.os_errno = os_errno
        """For IO_ERROR: the errno of the local write that failed (ENOSPC: the disk is full)."""

    @property
    def retryable(self) -> bool:
        """True when trying again later may succeed (the retries of this call ran out)."""
        return self.reason in _RETRYABLE or self.reason == DownloadFailure.CANCELLED


@dataclass(frozen=True)
class Credentials:
    """One HTTP header carrying a secret; the value never shows in repr or logs."""

    header_name: str
    header_value: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(header_name={self.header_name!r}, header_value=<redacted>)"

    def __post_init__(self) -> None:
        if not _HEADER_NAME.match(self.header_name):
            raise CredentialError(f"{self.header_name!r} is not a valid HTTP header name for a credential")
        bad = next((i for i, c in enumerate(self.header_value) if not (" " <= c <= "~" or c == "\t")), None)
        if bad is not None:
            # never echo the value: the position is enough to find the stray newline or character
            raise CredentialError(
                f"the credential for header {self.header_name} has a control or non-ASCII character at position "
                f"{bad} (a line break inside the Secret value?); store the value on a single line of printable ASCII"
            )
        if not self.header_value.strip():
            raise CredentialError(f"the credential for header {self.header_name} is empty; put the value into the Secret")

    @classmethod
    def bearer(cls, token: str) -> Credentials:
        """An `Authorization: Bearer <token>` header."""
        return cls("Authorization", f"Bearer {token.strip()}")

    @classmethod
    def for_header(cls, header_name: str, secret_value: str) -> Credentials:
        """As ModelCache's secretRef means it: Authorization gets `Bearer` unless a scheme is given.

        Raises `CredentialError` (without the value in its message) when the value is empty or
        holds characters that cannot go into an HTTP header.
        """
        value = secret_value.strip()
        if header_name.lower() == "authorization" and value and " " not in value:
            return cls.bearer(value)
        return cls(header_name, value)


@dataclass(frozen=True)
class DownloadPolicy:
    """How downloads behave; the agent builds it from its settings."""

    allow_http: bool = False
    """Allow plain http URLs (in-cluster mirrors, tests); https only otherwise."""
    allowed_hosts: frozenset[str] | None = None
    """If set, only these hosts (exact, or `.example.com` for a domain suffix)."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_attempts: int = 6
    """Attempts per download call, counting the first."""
    min_bytes_per_s: float = 32 * 1024
    """An attempt receiving less than this on average over `throughput_window_s` is cut off
    (and retried from where it stopped); 0 turns the rule off."""
    throughput_window_s: float = 60.0
    deadline_s: float | None = 4 * 3600.0
    """The whole call, retries and backoff included, fails with DeadlineExceeded after this long."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_multiplier: float = 2.0
    max_redirects: int = 5
    verify_tls: bool = True
    trust_env: bool = True
    """Honour HTTPS_PROXY / NO_PROXY / SSL_CERT_FILE from the environment."""
    user_agent: str = "stoker-agent"


def quiet_http_client_logs() -> None:
    """Keep the HTTP client libraries' own logs at WARNING: httpx logs every full URL (a
    presigned URL's signature) at INFO, and httpcore a refused header's value at DEBUG."""
    for name in ("httpx", "httpcore", "h11"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_url(url: str, policy: DownloadPolicy) -> httpx.URL:
    """Parse `url` and check it against the policy; raises `DownloadError(URLNotAllowed)`."""
    try:
        parsed = parse_http_url(url, what="download URL")
    except URLError as exc:
        raise DownloadError(DownloadFailure.URL_NOT_ALLOWED, f"{exc}; fix spec.source.url") from None
    shown = redact_url(url)
    if parsed.scheme == "http" and not policy.allow_http:
        raise DownloadError(
            DownloadFailure.URL_NOT_ALLOWED,
            f"refusing plain http URL {shown}: use https, or allow http in the agent settings (STOKER_ALLOW_HTTP)",
            url=shown,
        )
    if policy.allowed_hosts is not None and not host_allowed(ascii_host(parsed), policy.allowed_hosts):
        raise DownloadError(
            DownloadFailure.URL_NOT_ALLOWED,
            f"host {parsed.host!r} of {shown} is not in the agent's download host allowlist; "
            f"add it to STOKER_ALLOWED_HOSTS or use an allowed mirror",
            url=shown,
        )
    return parsed


def partial_paths(dest: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(partial data file, its sidecar) used while `dest` downloads."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


@dataclass(frozen=True)
class DownloadRequest:
    url: str
    dest: pathlib.Path
    sha256: str | None = None
    """Expected lowercase hex digest; None means compute but do not check."""
    size_bytes: int | None = None
    """Expected size (the ModelCache hint); checked against the server and the file."""
    credentials: Credentials | None = None
    require_size: bool = False
    """Fail with `SizeUnknown` when neither the hint nor the server gives the size
    (the disk tier must reserve space before writing)."""
    resume_key: str | None = None
    """Identifies the source across attempts and restarts; a partial file written for
    another key is discarded. Defaults to the redacted URL (presigned query strings
    change between requests, the object does not)."""

    def __repr__(self) -> str:
        return (
            f"DownloadRequest(url={redact_url(self.url)!r}, dest={str(self.dest)!r}, sha256={self.sha256!r}, "
            f"size_bytes={self.size_bytes!r}, credentials={self.credentials!r})"
        )

    def effective_resume_key(self) -> str:
        return self.resume_key or redact_url(self.url)


@dataclass(frozen=True)
class DownloadResult:
    path: pathlib.Path
    size_bytes: int
    sha256: str
    duration_s: float
    attempts: int
    resumed_bytes: int
    """Bytes not transferred again thanks to Range resumes (from a partial file or after a drop)."""
    transferred_bytes: int

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.transferred_bytes / self.duration_s if self.duration_s > 0 else 0.0


class DownloadProgress:
    """Live figures of one download; written by the download thread, read by anyone.

    Reads need no lock: each field is a single reference swap, and a report that is
    a few microseconds stale does not matter.
    """

    WINDOW_S = 5.0

    def __init__(self) -> None:
        self.bytes_done = 0
        self.total_bytes: int | None = None
        self.attempts = 0
        self.started_at = time.monotonic()
        self.finished = False
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._transferred = 0
        self._lock = threading.Lock()

    def _update(self, *, bytes_done: int, transferred_delta: int) -> None:
        self.bytes_done = bytes_done
        now = time.monotonic()
        with self._lock:
            self._transferred += transferred_delta
            if not self._samples or now - self._samples[-1][0] >= 0.1:
                self._samples.append((now, self._transferred))
                while self._samples and now - self._samples[0][0] > self.WINDOW_S:
                    self._samples.popleft()

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Transfer rate over the last few seconds (0 before two samples)."""
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def transferred_bytes(self) -> int:
        """Bytes received over the network, including any that a restart threw away."""
        return self._transferred

    @property
    def fraction(self) -> float | None:
        return self.bytes_done / self.total_bytes if self.total_bytes else None


class _Retry(Exception):
    """A transient failure of one attempt."""

    def __init__(self, reason: DownloadFailure, message: str, *, status_code: int | None = None, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status_code = status_code
        self.delay_s = delay_s


class _BackgroundSha256:
    """sha256 computed in a background thread, overlapping the network receive.

    hashlib releases the GIL on large buffers, so on a multi-core machine hashing
    costs little wall time; the bounded queue keeps memory use to a few MiB.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()
        self._result: str | None = None

    def _run(self) -> None:
        while (parts := self._queue.get()) is not None:
            for part in parts:
                self._digest.update(part)

    def update(self, parts: list[bytes]) -> None:
        """Hash `parts` after everything handed over before (the list must not change afterwards)."""
        self._queue.put(parts)

    def hexdigest(self) -> str:
        if self._result is None:
            self._queue.put(None)
            self._thread.join()
            self._result = self._digest.hexdigest()
        return self._result

    def close(self) -> None:
        if self._result is None and self._thread.is_alive():
            self._queue.put(None)


class _Complete(Exception):
    """The partial file already holds every byte."""


class _Restart(Exception):
    """The partial file cannot be resumed; start over at byte 0 without waiting."""


class Downloader:
    """Downloads files according to a `DownloadPolicy`. Thread-safe; one per agent."""

    def __init__(
        self,
        policy: DownloadPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.policy = policy or DownloadPolicy()
        self._sleep = sleep
        self._client = httpx.Client(
            follow_redirects=False,
            # deadlines and the minimum rate are enforced at the socket (see http_guard)
            transport=transport or http_guard.GuardedTransport(verify=self.policy.verify_tls,
                                                               trust_env=self.policy.trust_env,
                                                               read_bytes=_SOCKET_READ_BYTES),
            timeout=httpx.Timeout(
                connect=self.policy.connect_timeout_s,
                read=self.policy.read_timeout_s,
                write=self.policy.read_timeout_s,
                pool=self.policy.connect_timeout_s,
            ),
            verify=self.policy.verify_tls,
            trust_env=self.policy.trust_env,
            headers={"User-Agent": self.policy.user_agent, "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the download ----------------------------------------------------

    def download(
        self,
        request: DownloadRequest,
        *,
        progress: DownloadProgress | None = None,
        on_total: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        before_rename: Callable[[pathlib.Path, str], None] | None = None,
        on_grow: Callable[[int], int] | None = None,
    ) -> DownloadResult:
        """Fetch `request.url` into `request.dest`; see the module docstring.

        `on_total(total_bytes)` runs once the size is known and before any byte is
        written (the disk tier checks there that the file can fit; an exception it raises
        aborts the download and propagates unchanged). `on_grow(needed_bytes)` runs before
        the partial file grows past what it granted last: it returns the new size the file
        may reach (at least `needed_bytes`; the disk tier reserves space as bytes arrive)
        or raises, which aborts the download likewise. `cancel` stops the download at the
        next chunk with reason `Cancelled`, keeping the partial file for a resume.
        `before_rename(partial_path, sha256)` runs on the complete, verified partial file just
        before it is renamed into place (format validation, writing metadata); an
        exception it raises discards the file and propagates unchanged.
        """
        check_url(request.url, self.policy)
        progress = progress or DownloadProgress()
        shown = redact_url(request.url)
        started = time.monotonic()
        job = _Job(request=request, progress=progress, on_total=on_total, cancel=cancel, shown_url=shown,
                   on_grow=on_grow)
        p = self.policy
        guard = http_guard.Guard(deadline=None if p.deadline_s is None else started + p.deadline_s,
                                 min_bytes_per_s=p.min_bytes_per_s, window_s=p.throughput_window_s)
        with http_guard.guarded(guard):
            return self._download(job, guard, started, before_rename)

    def _download(self, job: _Job, guard: http_guard.Guard, started: float,
                  before_rename: Callable[[pathlib.Path, str], None] | None) -> DownloadResult:
        request, progress, cancel, shown = job.request, job.progress, job.cancel, job.shown_url
        job.load_partial()
        attempt = 0
        try:
            if job.total is not None:
                job.set_total(job.total)
            while True:
                attempt += 1
                progress.attempts = attempt
                try:
                    self._attempt(job)
                    break
                except _Restart as exc:
                    log.info("restarting download of %s from byte 0: %s", shown, exc)
                    job.truncate()
                    if attempt >= self.policy.max_attempts:
                        raise DownloadError(
                            DownloadFailure.HTTP_SERVER_ERROR, f"download of {shown} kept restarting: {exc}", url=shown, attempts=attempt
                        ) from None
                except _Retry as exc:
                    if guard.tripped == "deadline" or (guard.deadline is not None and time.monotonic() >= guard.deadline):
                        raise DownloadError(
                            DownloadFailure.DEADLINE_EXCEEDED,
                            f"download of {shown} did not finish within {self.policy.deadline_s:.0f} s "
                            f"(attempt {attempt}: {exc.message}); the partial file ({job.offset} bytes) is kept",
                            url=shown, attempts=attempt,
                        ) from None
                    if guard.tripped == "throughput":
                        exc = _Retry(DownloadFailure.TIMEOUT, f"the source sent {guard.describe()} (at byte {job.offset})")
                    guard.tripped = None
                    if attempt >= self.policy.max_attempts:
                        raise DownloadError(
                            exc.reason,
                            f"download of {shown} failed after {attempt} attempts: {exc.message}; "
                            f"the partial file ({job.offset} bytes) is kept and resumed next time",
                            url=shown,
                            status_code=exc.status_code,
                            attempts=attempt,
                        ) from None
                    delay_s = self._backoff_s(attempt, exc.delay_s)
                    log.info(
                        "download of %s: %s (attempt %d/%d), retrying in %.2fs from byte %d",
                        shown, exc.message, attempt, self.policy.max_attempts, delay_s, job.offset,
                    )
                    remaining_s = guard.remaining_s()
                    self._wait(delay_s if remaining_s is None else max(0.0, min(delay_s, remaining_s)), cancel, shown)
                    guard.restart_window()
            result = job.finish(attempts=attempt, started=started, before_rename=before_rename)
        except DownloadError as exc:
            exc.attempts = exc.attempts or attempt
            if exc.reason not in _RETRYABLE and exc.reason != DownloadFailure.CANCELLED:
                job.discard()
            raise
        finally:
            job.shutdown()
            progress.finished = True
        log.info(
            "downloaded %s: %d bytes in %.2fs (%d attempts, %d bytes resumed)",
            shown, result.size_bytes, result.duration_s, result.attempts, result.resumed_bytes,
        )
        return result

    def _backoff_s(self, attempt: int, hinted_s: float | None) -> float:
        p = self.policy
        base = min(p.backoff_initial_s * p.backoff_multiplier ** (attempt - 1), p.backoff_max_s)
        if hinted_s is not None:
            base = min(max(base, hinted_s), p.backoff_max_s)
        return base / 2 + random.uniform(0, base / 2)

    def _wait(self, delay_s: float, cancel: threading.Event | None, shown: str) -> None:
        if cancel is None:
            self._sleep(delay_s)
        elif cancel.wait(delay_s):
            raise DownloadError(DownloadFailure.CANCELLED, f"download of {shown} was cancelled", url=shown)

    def _open(self, job: _Job, headers: dict[str, str]) -> httpx.Response:
        """Send the GET, following redirects by hand so each hop is checked."""
        url = job.request.url
        origin = httpx.URL(url)
        creds = job.request.credentials
        for _ in range(self.policy.max_redirects + 1):
            parsed = check_url(url, self.policy)
            hop_headers = dict(headers)
            # credentials go to the origin the ModelCache named, never to a redirect target
            if creds is not None and (parsed.scheme, parsed.host, parsed.port) == (origin.scheme, origin.host, origin.port):
                hop_headers[creds.header_name] = creds.header_value
            try:
                response = self._client.send(self._client.build_request("GET", parsed, headers=hop_headers), stream=True)
            except (httpx.LocalProtocolError, UnicodeError):
                # h11 quotes the offending header, which may be the credential: never pass its text on
                raise DownloadError(
                    DownloadFailure.INVALID_REQUEST,
                    f"could not send the request for {job.shown_url}: a request header (the credential?) is not valid "
                    f"HTTP; check the Secret named by spec.source.secretRef",
                    url=job.shown_url,
                ) from None
            except httpx.TimeoutException as exc:
                raise _Retry(DownloadFailure.TIMEOUT, f"timed out connecting or waiting for headers ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise _Retry(
                    DownloadFailure.CONNECTION_FAILED, f"connection failed ({type(exc).__name__}: {_safe(exc, creds)})"
                ) from None
            if response.is_redirect and "location" in response.headers:
                location = response.headers["location"]
                response.close()
                url = str(parsed.join(location))
                continue
            return response
        raise DownloadError(
            DownloadFailure.TOO_MANY_REDIRECTS,
            f"download of {job.shown_url} was redirected more than {self.policy.max_redirects} times",
            url=job.shown_url,
        )

    def _attempt(self, job: _Job) -> None:
        if job.cancel is not None and job.cancel.is_set():
            raise DownloadError(DownloadFailure.CANCELLED, f"download of {job.shown_url} was cancelled", url=job.shown_url)
        if job.total is not None and job.offset == job.total and job.offset > 0:
            job.resumed_bytes += job.offset  # a previous run got every byte but died before the rename
            return
        headers: dict[str, str] = {}
        if job.offset > 0:
            headers["Range"] = f"bytes={job.offset}-"
            if job.validator:
                headers["If-Range"] = job.validator
        response = self._open(job, headers)
        try:
            self._check_status(job, response)
            self._receive(job, response)
        except _Complete:
            return
        finally:
            response.close()

    def _check_status(self, job: _Job, response: httpx.Response) -> None:
        status = response.status_code
        shown = job.shown_url
        if status == 416 and job.offset > 0:
            match = re.match(r"^bytes \*/(\d+)$", response.headers.get("content-range", ""))
            if match is not None:
                job.set_total(int(match.group(1)))  # a size hint that disagrees fails here
                if job.offset == job.total:
                    raise _Complete()
            raise _Restart(f"server refused the range from byte {job.offset}")
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            reason = DownloadFailure.HTTP_TOO_MANY_REQUESTS if status == 429 else DownloadFailure.HTTP_SERVER_ERROR
            raise _Retry(reason, f"server answered {status}", status_code=status, delay_s=_retry_after_s(response))
        reason = {
            401: DownloadFailure.HTTP_UNAUTHORIZED,
            403: DownloadFailure.HTTP_FORBIDDEN,
            404: DownloadFailure.HTTP_NOT_FOUND,
            410: DownloadFailure.HTTP_NOT_FOUND,
        }.get(status, DownloadFailure.HTTP_CLIENT_ERROR)
        advice = {
            DownloadFailure.HTTP_UNAUTHORIZED: "check the ModelCache secretRef and that the Secret holds a valid credential",
            DownloadFailure.HTTP_FORBIDDEN: "check the credential's permissions, or whether a presigned URL expired",
            DownloadFailure.HTTP_NOT_FOUND: "check spec.source.url",
        }.get(reason, "check spec.source")
        raise DownloadError(reason, f"server answered {status} for {shown}; {advice}", url=shown, status_code=status)

    def _receive(self, job: _Job, response: httpx.Response) -> None:
        status = response.status_code
        shown = job.shown_url
        length = _int_header(response, "content-length")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != job.offset:
                raise _Restart(f"unexpected Content-Range {response.headers.get('content-range')!r}")
            total = int(match.group(3)) if match.group(3) != "*" else None
            if total is not None and job.total is not None and total != job.total:
                raise _Restart(f"file size changed from {job.total} to {total} bytes")
            job.resumed_bytes += job.offset
        else:
            if job.offset > 0:
                job.truncate()  # server ignored Range (no support, or the file changed)
            total = length
        if total is not None:
            job.set_total(total)
        elif job.request.size_bytes is not None:
            job.set_total(job.request.size_bytes)
        elif job.request.require_size:
            raise DownloadError(
                DownloadFailure.SIZE_UNKNOWN,
                f"server did not announce the size of {shown}; set spec.source.sizeBytes so space can be reserved",
                url=shown,
            )
        job.validator = _validator(response)
        job.write_sidecar()
        fh = job.open_for_append()
        # Socket reads ask for 1 MiB (a socket often hands over less). About 1 MiB of them at a time goes
        # to one writev and one hasher handoff, uncopied (joining them into one buffer cost more than the syscalls it saved),
        # or whatever arrived within 50 ms on a slow link, so progress and cancellation stay responsive.
        parts: list[bytes] = []
        pending = 0
        flushed_at = time.monotonic()
        try:
            for chunk in response.iter_raw():
                parts.append(chunk)
                pending += len(chunk)
                if (pending >= _WRITE_BYTES or len(parts) >= _WRITE_PARTS
                        or time.monotonic() - flushed_at > _FLUSH_INTERVAL_S):
                    flushed_at = time.monotonic()
                    if job.cancel is not None and job.cancel.is_set():
                        raise DownloadError(DownloadFailure.CANCELLED, f"download of {shown} was cancelled", url=shown)
                    job.append(fh, parts)
                    parts, pending = [], 0
            if parts:
                job.append(fh, parts)
                parts, pending = [], 0
        except httpx.TimeoutException as exc:
            raise _Retry(DownloadFailure.TIMEOUT, f"read timed out at byte {job.offset} ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Retry(
                DownloadFailure.CONNECTION_FAILED,
                f"connection dropped at byte {job.offset} ({type(exc).__name__}: {_safe(exc, job.request.credentials)})",
            ) from None
        finally:
            if parts:
                job.append(fh, parts)  # keep what arrived before a drop, for the resume
            fh.flush()
        if job.total is not None and job.offset < job.total:
            raise _Retry(DownloadFailure.CONNECTION_FAILED, f"body ended at byte {job.offset} of {job.total}")


@dataclass
class _Job:
    """Mutable state of one download call (owned by the download thread)."""

    request: DownloadRequest
    progress: DownloadProgress
    on_total: Callable[[int], None] | None
    cancel: threading.Event | None
    shown_url: str
    offset: int = 0
    total: int | None = None
    validator: str | None = None
    hasher: Any = field(default_factory=_BackgroundSha256)
    announced_total: int | None = None
    resumed_bytes: int = 0
    on_grow: Callable[[int], int] | None = None
    granted: int = 0
    """Bytes the partial file may hold (`on_grow`'s last answer)."""
    _fh: BinaryIO | None = None

    @property
    def part(self) -> pathlib.Path:
        return partial_paths(self.request.dest)[0]

    @property
    def sidecar(self) -> pathlib.Path:
        return partial_paths(self.request.dest)[1]

    def load_partial(self) -> None:
        """Adopt a partial file from an earlier attempt or process when it is for this source."""
        if not self.part.exists():
            self.sidecar.unlink(missing_ok=True)
            return
        try:
            meta = json.loads(self.sidecar.read_text())
            ok = meta.get("resume_key") == self.request.effective_resume_key() and meta.get("sha256") == self.request.sha256
        except (OSError, ValueError):
            ok = False
        if not ok:
            self.truncate()
            return
        size = self.part.stat().st_size
        total = meta.get("total_bytes")
        if isinstance(total, int) and size > total:
            self.truncate()
            return
        self.validator = meta.get("validator")
        self.total = total if isinstance(total, int) else None
        with self.part.open("rb") as fh:
            while block := fh.read(_HASH_READ_BYTES):
                self.hasher.update([block])
        self.offset = size
        self.progress._update(bytes_done=size, transferred_delta=0)
        self.progress.total_bytes = self.total
        log.info("resuming %s from partial file at byte %d", self.shown_url, size)

    def set_total(self, total: int) -> None:
        hint = self.request.size_bytes
        if hint is not None and total != hint:
            raise DownloadError(
                DownloadFailure.SIZE_MISMATCH,
                f"server reports {total} bytes for {self.shown_url} but the ModelCache says sizeBytes={hint}; "
                f"fix spec.source.sizeBytes or the URL",
                url=self.shown_url,
            )
        self.total = total
        self.progress.total_bytes = total
        if total != self.announced_total and self.on_total is not None:
            self.on_total(total)
        self.announced_total = total

    def write_sidecar(self) -> None:
        meta = {
            "resume_key": self.request.effective_resume_key(),
            "sha256": self.request.sha256,
            "validator": self.validator,
            "total_bytes": self.total,
        }
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.sidecar)

    def open_for_append(self) -> BinaryIO:
        if self._fh is None:
            self._fh = self.part.open("ab", buffering=0)
        return self._fh

    def append(self, fh: BinaryIO, parts: list[bytes]) -> None:
        """Write `parts` (received chunks, in order) at the end of the partial file and hash them."""
        size = sum(len(part) for part in parts)
        if self.total is not None and self.offset + size > self.total:
            raise DownloadError(
                DownloadFailure.SIZE_MISMATCH,
                f"server sent more than the announced {self.total} bytes for {self.shown_url}",
                url=self.shown_url,
            )
        if self.on_grow is not None and self.offset + size > self.granted:
            self.granted = self.on_grow(self.offset + size)  # space is reserved as bytes arrive
        try:
            written = os.writev(fh.fileno(), parts)
            if written < size:  # a short write: write the rest piece by piece
                rest = memoryview(b"".join(parts))[written:]
                while rest:
                    rest = rest[os.write(fh.fileno(), rest):]
        except OSError as exc:
            raise DownloadError(
                DownloadFailure.IO_ERROR, f"cannot write {self.part.name}: {exc.strerror}; check free disk space",
                url=self.shown_url, os_errno=exc.errno,
            ) from None
        self.hasher.update(parts)
        self.offset += size
        self.progress._update(bytes_done=self.offset, transferred_delta=size)

    def truncate(self) -> None:
        self.close()
        self.part.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)
        self.offset = 0
        self.total = None
        self.validator = None
        self.hasher.close()
        self.hasher = _BackgroundSha256()
        self.progress._update(bytes_done=0, transferred_delta=0)

    def discard(self) -> None:
        self.truncate()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def shutdown(self) -> None:
        self.close()
        self.hasher.close()

    def finish(
        self, *, attempts: int, started: float, before_rename: Callable[[pathlib.Path, str], None] | None
    ) -> DownloadResult:
        shown = self.shown_url
        hint = self.request.size_bytes
        if hint is not None and self.offset != hint:
            raise DownloadError(
                DownloadFailure.SIZE_MISMATCH,
                f"downloaded {self.offset} bytes from {shown} but the ModelCache says sizeBytes={hint}",
                url=shown,
            )
        if self.total is not None and self.offset != self.total:
            raise DownloadError(
                DownloadFailure.SIZE_MISMATCH, f"downloaded {self.offset} of {self.total} bytes from {shown}", url=shown
            )
        digest = self.hasher.hexdigest()
        if self.request.sha256 is not None and digest != self.request.sha256.lower():
            raise DownloadError(
                DownloadFailure.CHECKSUM_MISMATCH,
                f"sha256 of {shown} is {digest}, expected {self.request.sha256}; the file was discarded. "
                f"Fix spec.source.sha256 or the file at the source",
                url=shown,
            )
        self.close()
        if not self.part.exists():
            self.part.touch()  # an empty body never opened the file
        with self.part.open("rb+") as fh:
            os.fsync(fh.fileno())
        if before_rename is not None:
            try:
                before_rename(self.part, digest)
            except BaseException:
                self.discard()
                raise
        os.replace(self.part, self.request.dest)
        self.sidecar.unlink(missing_ok=True)
        _fsync_dir(self.request.dest.parent)
        return DownloadResult(
            path=self.request.dest,
            size_bytes=self.offset,
            sha256=digest,
            duration_s=time.monotonic() - started,
            attempts=attempts,
            resumed_bytes=self.resumed_bytes,
            transferred_bytes=self.progress.transferred_bytes,
        )


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _validator(response: httpx.Response) -> str | None:
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag  # If-Range needs a strong validator
    return response.headers.get("last-modified")


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _safe(exc: Exception, credentials: Credentials | None = None) -> str:
    """Exception text without anything URL-like (it could carry a query signature) or the credential."""
    text = str(exc)
    if credentials is not None:
        for secret in {credentials.header_value, credentials.header_value.partition(" ")[2]} - {""}:
            text = text.replace(secret, "<redacted>")
    return re.sub(r"https?://\S+", "<url>", text)[:200]
