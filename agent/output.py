"""Deliver a finished image: HTTP PUT to a URL, or a file in the agent's results directory.

A PUT URL is typically a presigned object-store URL whose query string is the credential,
so the query string never appears in logs, errors or the result record (`redact_url`).

Output URLs come from whoever writes GenerationJobs, so a delivery is fenced in
(`OutputPolicy`): https only unless plain http is allowed, an optional host allowlist
checked before any work on the job starts (`check_output_url`), one deadline for every try
together (enforced at the socket, see `http_guard`, so a server that trickles its answer
cannot hold the agent's thread), no redirects, and the answer's body is never read, so a
server answering with gigabytes costs nothing. Failures are retried with exponential
backoff up to the deadline, whatever they were, and reported with one generic reason and
message: a job author learns whether the image arrived, not whether a port was closed or
answered 403 (the agent's log has the detail). Result files are named from
namespace/name/attempt after sanitising every part, and are written to a temporary file
and renamed, so a reader never sees a partial image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import re
import time
import urllib.parse
from collections.abc import Callable

import httpx

from stoker.agent import http_guard
from stoker.agent.urls import URLError, ascii_host, host_allowed, parse_http_url

log = logging.getLogger(__name__)

PNG = "image/png"
_VERBATIM = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
_MAX_NAME_PART = 100


class OutputError(Exception):
    """Delivering a result failed. `retryable` is false when repeating cannot help."""

    def __init__(self, message: str, *, retryable: bool, reason: str = "OutputFailed") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class OutputResult:
    """Where the image went (GenerationJob `status.result`)."""

    location: str  # redacted URL (no query string) or absolute file path
    sha256: str
    size_bytes: int
    content_type: str


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a PUT: attempts in total and exponential backoff between them."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    timeout_s: float = 30.0
    """Per socket operation (connect, each write, each read); the overall bound is `OutputPolicy.deadline_s`."""

    def delay_s(self, attempt: int) -> float:
        """Pause after failed attempt number `attempt` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


@dataclasses.dataclass(frozen=True)
class OutputPolicy:
    """Where images may be delivered, and how long a delivery may take (from the agent's settings)."""

    allow_http: bool = False
    """Allow plain http output URLs; https only otherwise."""
    allowed_hosts: frozenset[str] | None = None
    """If set, only these hosts (exact, or `.example.com` for a domain and its subdomains)."""
    deadline_s: float = 120.0
    """Every try of one delivery together, backoff included."""


class _RedactUrls(logging.Filter):
    """httpx logs every request URL at INFO; strip query strings so presigned signatures never reach logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _RedactUrls) for f in _httpx_log.filters):
    _httpx_log.addFilter(_RedactUrls())


def redact_url(url: str) -> str:
    """`url` without userinfo, query string and fragment: safe to log and to store."""
    parts = urllib.parse.urlsplit(url)
    try:
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        host, port = (parts.netloc.rpartition("@")[2] or "")[:253], None
    if port:
        host = f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_output_url(url: str, policy: OutputPolicy = OutputPolicy()) -> httpx.URL:
    """Parse `url` and check it against the policy; raises a non-retryable `OutputError` (pure).

    The agent calls this before it downloads or generates anything for the job, so a URL
    that cannot be used fails the job once, not after the GPU work of every attempt."""
    try:
        parsed = parse_http_url(url, what="output URL")
    except URLError as exc:
        raise OutputError(f"{exc}; fix spec.output.url", retryable=False, reason="InvalidOutputURL") from None
    shown = redact_url(url)
    if parsed.scheme == "http" and not policy.allow_http:
        raise OutputError(f"output URL {shown} uses plain http; use https (agents allow http outputs only when "
                          "configured to: STOKER_OUTPUT_ALLOW_HTTP)", retryable=False, reason="OutputURLNotAllowed")
    if policy.allowed_hosts is not None and not host_allowed(ascii_host(parsed), policy.allowed_hosts):
        raise OutputError(f"host {ascii_host(parsed)} of output URL {shown} is not among the hosts the agents deliver "
                          "to; use an allowed object store (STOKER_OUTPUT_ALLOWED_HOSTS)", retryable=False,
                          reason="OutputURLNotAllowed")
    return parsed


def output_client(policy: RetryPolicy = RetryPolicy()) -> httpx.Client:
    """An HTTP client for deliveries: no redirects, the thread's `http_guard.Guard` applies."""
    return httpx.Client(timeout=policy.timeout_s, follow_redirects=False, transport=http_guard.GuardedTransport())


def put_image(
    url: str,
    data: bytes,
    *,
    content_type: str = PNG,
    policy: RetryPolicy = RetryPolicy(),
    output_policy: OutputPolicy = OutputPolicy(),
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> OutputResult:
    """PUT `data` to `url` (a presigned URL works as is), retrying failures until the policy's deadline."""
    parsed = check_output_url(url, output_policy)
    safe_url = redact_url(url)
    digest = hashlib.sha256(data).hexdigest()
    owned = client is None
    http = client or output_client(policy)
    guard = http_guard.Guard.lasting(output_policy.deadline_s)
    attempt = 0
    try:
        with http_guard.guarded(guard):
            for attempt in range(1, policy.attempts + 1):
                problem = _try_put(http, parsed, data, content_type)
                if problem is None:
                    log.info("uploaded %d bytes to %s (attempt %d)", len(data), safe_url, attempt)
                    return OutputResult(safe_url, digest, len(data), content_type)
                remaining_s = guard.remaining_s() or 0.0
                log.warning("upload to %s failed (%s) on attempt %d", safe_url, problem, attempt)
                if attempt == policy.attempts or remaining_s <= 0:
                    break
                sleep(min(policy.delay_s(attempt), remaining_s))
    finally:
        if owned:
            http.close()
    raise OutputError(
        f"the image could not be delivered to {safe_url} ({attempt} tries in "
        f"{output_policy.deadline_s - (guard.remaining_s() or 0.0):.0f} s): the endpoint did not accept it or "
        "could not be reached. Check that the URL is reachable from the agents, unexpired and allows PUT; "
        "the agent's log names the cause",
        retryable=True,
    )


def _try_put(http: httpx.Client, url: httpx.URL, data: bytes, content_type: str) -> str | None:
    """One PUT; None when it succeeded, else what went wrong (for the agent's log only)."""
    try:
        # streamed and closed unread: the answer's body, however large, is never read
        with http.stream("PUT", url, content=data, headers={"Content-Type": content_type}) as response:
            if response.is_success:
                return None
            if response.is_redirect:
                return f"HTTP {response.status_code} redirect (not followed)"
            return f"HTTP {response.status_code}"
    except httpx.TimeoutException as error:
        guard = http_guard.current()
        return f"timed out ({guard.describe() if guard is not None and guard.tripped else type(error).__name__})"
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError, ValueError, OSError) as error:
        # the exception text can carry the full URL: only its class name is kept
        return f"connection failed ({type(error).__name__})"


def result_filename(*, namespace: str, name: str, attempt: int, suffix: str = ".png") -> str:
    """A file name for a job's result that cannot leave the results directory, and that no
    other namespace/name/attempt shares. Pure.

    Object names are kept as they are when they are already safe and short; a part that had
    to be changed (characters replaced, or cut to fit a file name) gets a digest of the
    original, so two jobs never meet in one file."""
    def clean(part: str) -> str:
        if _VERBATIM.fullmatch(part) and len(part) <= _MAX_NAME_PART:
            return part  # no "_" in it: the "__" separators stay unambiguous
        digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        prefix = _UNSAFE.sub("-", part).lstrip(".-")[: _MAX_NAME_PART - 17]
        return f"{prefix}_{digest}"  # one "_": never mistaken for a verbatim part

    if attempt < 0:
        raise ValueError(f"attempt {attempt} must not be negative")
    return f"{clean(namespace)}__{clean(name)}__{attempt}{suffix}"


def write_result(
    results_dir: pathlib.Path, data: bytes, *, namespace: str, name: str, attempt: int, content_type: str = PNG
) -> OutputResult:
    """Write `data` atomically as the job's result file in `results_dir`."""
    root = results_dir.resolve()
    target = root / result_filename(namespace=namespace, name=name, attempt=attempt)
    if target.parent != root:  # unreachable with result_filename; kept as a guard
        raise OutputError(f"result path {target} escapes {root}", retryable=False)
    try:
        root.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as error:
        raise OutputError(
            f"writing result {target.name} into {root} failed: {error.strerror}; check the results volume",
            retryable=True,
        ) from None
    log.info("wrote %d bytes to %s", len(data), target)
    return OutputResult(str(target), hashlib.sha256(data).hexdigest(), len(data), content_type)
