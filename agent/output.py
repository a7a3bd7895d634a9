"""Deliver a finished image: HTTP PUT to a URL, or a file in the agent's results directory.

A PUT URL is typically a presigned object-store URL whose query string is the credential,
so the query string never appears in logs, errors or the result record (`redact_url`).
Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential
backoff; other 4xx answers are final because repeating the same request cannot help.
Result files are named from namespace/name/attempt after sanitising every part, and are
written to a temporary file and renamed, so a reader never sees a partial image.
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

log = logging.getLogger(__name__)

PNG = "image/png"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_SAFE_PART = re.compile(r"[^A-Za-z0-9._-]+")


class OutputError(Exception):
    """Delivering a result failed. `retryable` is false when repeating cannot help."""

    reason = "OutputFailed"

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


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
    timeout_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        """Pause after failed attempt number `attempt` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


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
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def put_image(
    url: str,
    data: bytes,
    *,
    content_type: str = PNG,
    policy: RetryPolicy = RetryPolicy(),
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> OutputResult:
    """PUT `data` to `url` (a presigned URL works as is), retrying transient failures."""
    safe_url = redact_url(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutputError(f"output URL {safe_url!r} must be an http(s) URL with a host", retryable=False)
    digest = hashlib.sha256(data).hexdigest()
    owned = client is None
    http = client or httpx.Client(timeout=policy.timeout_s, follow_redirects=False)
    try:
        for attempt in range(1, policy.attempts + 1):
            try:
                response = http.put(url, content=data, headers={"Content-Type": content_type})
            except httpx.TransportError as error:
                # The exception text can carry the full URL; only its class name is kept.
                problem = f"connection failed ({type(error).__name__})"
            else:
                if response.is_success:
                    log.info("uploaded %d bytes to %s (attempt %d)", len(data), safe_url, attempt)
                    return OutputResult(safe_url, digest, len(data), content_type)
                problem = f"HTTP {response.status_code}"
                if response.status_code not in _RETRY_STATUS:
                    raise OutputError(
                        f"upload to {safe_url} was refused with {problem}; check that the output URL "
                        "is valid, unexpired and allows PUT",
                        retryable=False,
                    )
            if attempt < policy.attempts:
                delay = policy.delay_s(attempt)
                log.warning("upload to %s failed (%s); retrying in %.1fs", safe_url, problem, delay)
                sleep(delay)
        raise OutputError(
            f"upload to {safe_url} failed after {policy.attempts} attempts (last: {problem}); "
            "the object store may be unavailable",
            retryable=True,
        )
    finally:
        if owned:
            http.close()


def _clean(part: str) -> str:
    cleaned = _SAFE_PART.sub("_", part).strip("._")
    return cleaned[:100] or "_"


def result_filename(*, namespace: str, name: str, attempt: int, suffix: str = ".png") -> str:
    """A file name for a job's result that cannot leave the results directory. Pure."""
    if attempt < 0:
        raise ValueError(f"attempt {attempt} must not be negative")
    return f"{_clean(namespace)}__{_clean(name)}__{attempt}{suffix}"


def job_result_filename(*, namespace: str, name: str, uid: str, suffix: str = ".png") -> str:
    """The one result file of a job (every attempt writes the same name; the uid tells a job apart
    from an earlier one of the same name). Pure."""
    return f"{_clean(namespace)}__{_clean(name)}__{_clean(uid)[:36]}{suffix}"


def write_result(
    results_dir: pathlib.Path, data: bytes, *, namespace: str, name: str, attempt: int, content_type: str = PNG,
    job_uid: str | None = None,
) -> OutputResult:
    """Write `data` atomically as the job's result file in `results_dir`.

    With `job_uid`, the file is named after the job, not the attempt: a later attempt replaces
    what an interrupted one left (renamed into place atomically), so a job has one result file."""
    root = results_dir.resolve()
    filename = (job_result_filename(namespace=namespace, name=name, uid=job_uid) if job_uid else
                result_filename(namespace=namespace, name=name, attempt=attempt))
    target = root / filename
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
