"""The results store: an S3-compatible bucket configured once for all jobs (I/O).

Jobs without an output URL of their own go to the bucket the agent is configured with
(the chart's agent.results.s3): `PUT <endpoint>/<bucket>/<prefix><namespace>/<job>/<attempt>.png`
(path-style, which every S3-compatible server accepts), signed with AWS Signature V4 by
httpx-auth. status.result.location is that object's URL without any credential.

Credentials come from a mounted Secret (`accessKeyId`, `secretAccessKey`, optional
`sessionToken`) and are bound to the endpoint's host: they are sent on requests to that
host only (redirects are not followed, and `S3ResultsStore` refuses a request to any other
host), never logged and never written to status. `Credentials` is the whole interface
between this store and where credentials come from, so a host-bound credential source
can supply them as well.

Transient failures (connection errors, 5xx, 429) are retried with backoff, like a PUT URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import re
import time
import urllib.parse
from collections.abc import Callable

import httpx

from stoker.agent.output import PNG, OutputError, OutputResult, RetryPolicy

log = logging.getLogger(__name__)

_SAFE_KEY_PART = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class Credentials:
    """An access key for one host. `repr` hides the secret parts."""

    host: str
    """The only host these are sent to (the endpoint's host, with its port when it has one)."""
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class S3Settings:
    endpoint: str
    """Base URL of the S3 API, for example https://s3.eu-west-1.amazonaws.com or https://minio.example:9000."""
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""
    """Key prefix for every image, for example results/."""
    allow_http: bool = False
    """Accept a plain http endpoint (an in-cluster server)."""

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"results store endpoint {self.endpoint!r} must be an https URL with a host, like "
                             "https://s3.eu-west-1.amazonaws.com")
        if parts.scheme == "http" and not self.allow_http:
            raise ValueError(f"results store endpoint {self.endpoint!r} is plain http; use https, or allow http "
                             "for an in-cluster server (agent setting allow_http)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise ValueError(f"results store bucket {self.bucket!r} is not a valid S3 bucket name")

    @property
    def host(self) -> str:
        return endpoint_host(self.endpoint)


def endpoint_host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def object_key(*, prefix: str, namespace: str, name: str, attempt: int) -> str:
    """The key of a job's image: prefix + namespace/name/attempt.png, every part sanitised. Pure."""
    def clean(part: str) -> str:
        return _SAFE_KEY_PART.sub("_", part).strip("._")[:120] or "_"

    return f"{prefix}{clean(namespace)}/{clean(name)}/{attempt}.png"


def read_credentials(folder: pathlib.Path, *, host: str) -> Credentials:
    """Credentials from a mounted Secret's files (accessKeyId, secretAccessKey, optional sessionToken)."""
    def read(key: str, *, required: bool) -> str | None:
        path = folder / key
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            if required:
                raise ValueError(f"the results store Secret mounted at {folder} has no key {key}; create it with "
                                 "accessKeyId and secretAccessKey") from None
            return None

    access, secret = read("accessKeyId", required=True), read("secretAccessKey", required=True)
    if not access or not secret:
        raise ValueError(f"the results store Secret mounted at {folder} has an empty accessKeyId or secretAccessKey")
    return Credentials(host=host, access_key_id=access, secret_access_key=secret,
                       session_token=read("sessionToken", required=False))


class S3ResultsStore:
    """Uploads job images to one bucket (see the module docstring)."""

    def __init__(self, settings: S3Settings, credentials: Credentials | None, *, policy: RetryPolicy = RetryPolicy(),
                 client: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if credentials is not None and credentials.host != settings.host:
            raise ValueError(f"the results store credentials are for {credentials.host}, not the endpoint's host "
                             f"{settings.host}; they are never sent elsewhere")
        self.settings, self.policy, self._sleep = settings, policy, sleep
        self._credentials = credentials
        self._client = client or httpx.Client(timeout=policy.timeout_s, follow_redirects=False)

    def url_of(self, key: str) -> str:
        return f"{self.settings.endpoint.rstrip('/')}/{self.settings.bucket}/{urllib.parse.quote(key)}"

    def _auth(self, url: str) -> httpx.Auth | None:
        if self._credentials is None:
            return None
        if endpoint_host(url) != self._credentials.host:  # unreachable with url_of; the binding is checked anyway
            raise OutputError(f"refusing to send the results store credentials to {endpoint_host(url)}", retryable=False)
        from httpx_auth import AWS4Auth

        extra = {"security_token": self._credentials.session_token} if self._credentials.session_token else {}
        return AWS4Auth(access_id=self._credentials.access_key_id, secret_key=self._credentials.secret_access_key,
                        region=self.settings.region, service="s3", **extra)

    def put(self, data: bytes, *, namespace: str, name: str, attempt: int, content_type: str = PNG) -> OutputResult:
        key = object_key(prefix=self.settings.prefix, namespace=namespace, name=name, attempt=attempt)
        url = self.url_of(key)
        digest = hashlib.sha256(data).hexdigest()
        problem = ""
        for attempt_no in range(1, self.policy.attempts + 1):
            try:
                response = self._client.put(url, content=data, auth=self._auth(url),
                                            headers={"Content-Type": content_type})
            except httpx.TransportError as error:
                problem = f"connection failed ({type(error).__name__})"
            else:
                if response.is_success:
                    log.info("stored %d bytes as %s", len(data), url)
                    return OutputResult(url, digest, len(data), content_type)
                problem = f"HTTP {response.status_code} {_s3_code(response)}".strip()
                if response.status_code not in (408, 429, 500, 502, 503, 504):
                    raise OutputError(f"the results store refused {url}: {problem}; check the bucket, its "
                                      "policy and the agent's credentials", retryable=response.status_code == 404)
            if attempt_no < self.policy.attempts:
                delay = self.policy.delay_s(attempt_no)
                log.warning("storing %s failed (%s); retrying in %.1fs", url, problem, delay)
                self._sleep(delay)
        raise OutputError(f"storing {url} failed after {self.policy.attempts} attempts (last: {problem}); the results "
                          "store may be unavailable", retryable=True)

    def get(self, key: str) -> bytes:
        """Read an object back (tests, tools)."""
        url = self.url_of(key)
        response = self._client.get(url, auth=self._auth(url))
        if not response.is_success:
            raise OutputError(f"reading {url} failed: HTTP {response.status_code} {_s3_code(response)}",
                              retryable=response.status_code >= 500)
        return response.content

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and first installs; needs the right to)."""
        url = f"{self.settings.endpoint.rstrip('/')}/{self.settings.bucket}"
        response = self._client.put(url, auth=self._auth(url))
        if not response.is_success and _s3_code(response) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise OutputError(f"creating bucket {self.settings.bucket} failed: HTTP {response.status_code} "
                              f"{_s3_code(response)}", retryable=False)

    def close(self) -> None:
        self._client.close()


def _s3_code(response: httpx.Response) -> str:
    """The <Code> of an S3 error body, if any (no other part of the body is echoed)."""
    match = re.search(r"<Code>([A-Za-z0-9]{1,64})</Code>", response.text[:4096]) if response.content else None
    return match.group(1) if match else ""
