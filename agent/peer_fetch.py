"""Fetch a model from another agent of the fleet before going to its source (I/O).

Who holds what is read from the API server, not asked around: the operator lists the
agents holding each model in its ModelCache status (`agents`, with `downloading` for a
copy being fetched), and each agent's CacheAgent status says whether it is Ready, where
its peer endpoint is (`peer.url`) and which digest its copy has (`models[].sha256`).
The agent chooses among those holders itself rather than being told by the operator at
binding time: the same lookup serves jobs and prefetch orders, the binding (the hot path)
stays one small write, and a holder that evicted its copy since is simply skipped.

The bytes must match a digest known before the first byte: the ModelCache's
`spec.source.sha256`, or the digest the first verified copy recorded (`status.sha256`,
published by the operator). Without one the agent fetches from the source only.

`PeerFetcher.fetch` runs in the download thread with the same request, partial file and
callbacks as a source download:

- holders with a verified copy are tried one after another, in an order that differs
  per agent (so a fleet does not converge on one holder); a holder that is busy (503),
  unreachable or gone is passed over, and the next resumes the partial file with a Range
  request (every holder's ETag is the digest, so If-Range holds across holders);
- a copy that does not match the digest is discarded, the holder is reported (a
  Warning Event `PeerChecksumMismatch` on its CacheAgent, a metric) and bypassed for an
  hour;
- when no holder has a verified copy yet but one is fetching it, the agent waits for that
  copy rather than going to the source too (concurrent misses fan out from the first
  copy), as long as the copy makes progress. Two agents that start at once, each seeing the
  other's fetch at 0 bytes, must not wait for each other: a fetch with no bytes yet is waited
  for only briefly, and only by agents whose names sort after its agent's, so one of them
  (the first name) goes to the source and the others take its copy; a holder that stays busy
  is waited for at most `busy_wait_s`;
- `None` means no holder could serve it: the caller fetches from the source, resuming
  the partial file when it can. A peer's failure is never reported as the source's: it
  goes to the log and the peer metrics, not to the model's failures.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from stoker.agent.download import (
    Credentials,
    DownloadError,
    DownloadFailure,
    DownloadPolicy,
    DownloadProgress,
    DownloadRequest,
    DownloadResult,
    Downloader,
)
from stoker.agent.peer_server import PeerMetrics, blob_path

__all__ = ["PeerCandidate", "PeerDirectory", "PeerFetcher", "peer_download_policy", "valid_peer_url"]

log = logging.getLogger(__name__)

_BAD_PEER_S = 3600.0
"""How long a holder that served wrong bytes is bypassed for that digest."""


@dataclasses.dataclass(frozen=True)
class PeerCandidate:
    """An agent that holds, or is fetching, a copy of a model."""

    agent: str
    url: str
    """Base URL of its peer endpoint."""
    ready: bool
    """It holds a verified copy with the digest asked for; False: it is fetching one."""
    bytes_done: int = 0
    """For a copy being fetched: bytes it has so far."""


def valid_peer_url(url: str) -> bool:
    """Only http://<IP address>:<port>: a peer endpoint is an address on the pod network, never a
    name to resolve or a URL with a path (an agent's status cannot send others elsewhere)."""
    try:
        parsed = httpx.URL(url)
        ipaddress.ip_address(parsed.host)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return parsed.scheme == "http" and parsed.port is not None and parsed.path in ("", "/") and not parsed.query


def peer_download_policy(*, connect_timeout_s: float = 3.0, read_timeout_s: float = 10.0) -> DownloadPolicy:
    """Downloads from peers: one attempt each (the next holder is the retry), no redirects, plain
    http on the pod network (the bytes are checked against the digest, the request carries the
    fleet's credential), no proxies from the environment."""
    return DownloadPolicy(allow_http=True, allowed_hosts=None, connect_timeout_s=connect_timeout_s,
                          read_timeout_s=read_timeout_s, max_attempts=1, max_redirects=0, trust_env=False,
                          user_agent="stoker-agent-peer")


class PeerDirectory:
    """Finds the fleet's holders of a model through the API server (called from worker threads).

    `get(kind, name)` returns an object as a dict (`kube.Objects.get`); CacheAgents are read
    at most every `cache_s` per agent, and at most `max_holders` holders and `max_fetching`
    agents still fetching are looked at per model (in an order of this agent's own, so that a
    popular model's many holders share the load and a miss costs a few reads, not one per holder)."""

    def __init__(self, get: Callable[[str, str], dict[str, Any]], *, self_name: str, cache_s: float = 2.0,
                 max_holders: int = 6, max_fetching: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self._get, self.self_name, self.cache_s, self._clock = get, self_name, cache_s, clock
        self.max_holders, self.max_fetching = max_holders, max_fetching
        self._agents: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def _agent(self, name: str) -> dict[str, Any] | None:
        now = self._clock()
        with self._lock:
            cached = self._agents.get(name)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        try:
            body: dict[str, Any] | None = self._get("CacheAgent", name)
        except Exception as exc:  # noqa: BLE001 - gone, or the API is unreachable: not a holder now
            log.debug("cannot read CacheAgent %s: %s", name, exc)
            body = None
        with self._lock:
            self._agents[name] = (now, body)
        return body

    def candidates(self, model: str, sha256: str) -> list[PeerCandidate]:
        """Ready agents in the peer tier that hold `model` with this digest, or are fetching it."""
        try:
            mc = self._get("ModelCache", model)
        except Exception as exc:  # noqa: BLE001 - no directory: the source it is
            log.debug("cannot read ModelCache %s: %s", model, exc)
            return []
        copies = [c for c in (mc.get("status") or {}).get("agents") or [] if c.get("agent") not in (None, self.self_name)]
        random.Random(f"{self.self_name}/{model}").shuffle(copies)
        copies.sort(key=lambda c: c.get("tier") == "downloading")  # holders of a copy first
        out: list[PeerCandidate] = []
        looked = {True: 0, False: 0}
        for copy in copies:
            name = copy["agent"]
            fetching = copy.get("tier") == "downloading"
            if looked[fetching] >= (self.max_fetching if fetching else self.max_holders):
                continue
            looked[fetching] += 1
            body = self._agent(name)
            status = (body or {}).get("status") or {}
            url = (status.get("peer") or {}).get("url", "")
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            if not ready or not valid_peer_url(url):
                continue
            entry = next((m for m in status.get("models") or [] if m.get("name") == model), None)
            if entry is not None and entry.get("sha256") == sha256:
                out.append(PeerCandidate(agent=name, url=url, ready=True))
                continue
            download = next((d for d in status.get("downloads") or [] if d.get("name") == model), None)
            if download is not None:
                out.append(PeerCandidate(agent=name, url=url, ready=False, bytes_done=int(download.get("bytesDone") or 0)))
        return out


class PeerFetcher:
    """Fetches files from the fleet's holders; see the module docstring. Thread-safe."""

    def __init__(self, directory: PeerDirectory, downloader: Downloader, *, token: str, self_name: str,
                 metrics: PeerMetrics | None = None,
                 report_bad_peer: Callable[[str, str, str], None] = lambda agent, model, message: None,
                 poll_s: float = 2.0, stall_s: float = 60.0, start_grace_s: float = 15.0, busy_wait_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory, self.downloader = directory, downloader
        self._credentials = Credentials.bearer(token)
        self.self_name = self_name
        self.metrics = metrics or PeerMetrics()
        self.report_bad_peer = report_bad_peer
        """Called with (agent, model, message) when an agent served bytes that do not match."""
        self.poll_s, self.stall_s, self._clock = poll_s, stall_s, clock
        self.start_grace_s, self.busy_wait_s = start_grace_s, busy_wait_s
        self._bad: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _is_bad(self, agent: str, sha256: str) -> bool:
        with self._lock:
            until = self._bad.get((agent, sha256))
        return until is not None and until > self._clock()

    def _mark_bad(self, agent: str, sha256: str) -> None:
        with self._lock:
            self._bad[(agent, sha256)] = self._clock() + _BAD_PEER_S

    def fetch(self, request: DownloadRequest, *, model: str, sha256: str, progress: DownloadProgress,
              on_total: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
              before_rename: Callable[[Any, str], None] | None = None,
              on_grow: Callable[[int], int] | None = None) -> DownloadResult | None:
        """Fetch `request.dest` from a holder of `model` (namespace-local name) whose copy has
        digest `sha256`; None when no holder could serve it (the caller uses the source)."""
        order = random.Random(f"{self.self_name}/{sha256}")  # per agent and model: holders share the load
        tried: set[str] = set()
        seen: dict[str, tuple[int, float, float]] = {}  # agent -> (bytes, when they last grew, first seen)
        busy_since: float | None = None
        while True:
            if cancel is not None and cancel.is_set():
                raise DownloadError(DownloadFailure.CANCELLED, f"fetch of {model} from peers was cancelled")
            found = [c for c in self.directory.candidates(model, sha256) if not self._is_bad(c.agent, sha256)]
            holders = [c for c in found if c.ready and c.agent not in tried]
            order.shuffle(holders)
            busy = False
            for holder in holders:
                outcome = self._try(holder, request, model=model, sha256=sha256, progress=progress, on_total=on_total,
                                    cancel=cancel, before_rename=before_rename, on_grow=on_grow)
                if isinstance(outcome, DownloadResult):
                    return outcome
                if outcome == "busy":
                    busy = True  # it may free a slot: ask again on the next round
                else:
                    tried.add(holder.agent)
            # Nobody could serve a verified copy now. Wait for a busy holder, or for a copy being
            # fetched elsewhere while it makes progress; otherwise the source it is.
            now = self._clock()
            fetching = []
            for c in found:
                if c.ready or c.agent in tried:
                    continue
                before = seen.get(c.agent)
                if before is None:
                    before = seen[c.agent] = (c.bytes_done, now, now)
                elif c.bytes_done > before[0]:
                    before = seen[c.agent] = (c.bytes_done, now, before[2])
                if c.bytes_done > 0:
                    if now - before[1] < self.stall_s:
                        fetching.append(c)
                elif c.agent < self.self_name and now - before[2] < self.start_grace_s:
                    fetching.append(c)  # just starting: the first name fetches, the others wait for it
            busy_since = (busy_since or now) if busy else None
            if busy and not fetching and now - busy_since >= self.busy_wait_s:
                busy = False  # a holder busy for this long: the source it is
            if not busy and not fetching:
                return None
            if fetching and not busy:
                log.info("waiting for %s's copy of %s (fetching, %d bytes so far) rather than fetching it from the "
                         "source too", fetching[0].agent, model, fetching[0].bytes_done)
            if cancel is not None:
                if cancel.wait(self.poll_s):
                    raise DownloadError(DownloadFailure.CANCELLED, f"fetch of {model} from peers was cancelled")
            else:
                time.sleep(self.poll_s)

    def _try(self, holder: PeerCandidate, request: DownloadRequest, *, model: str, sha256: str,
             progress: DownloadProgress, on_total: Callable[[int], None] | None, cancel: threading.Event | None,
             before_rename: Callable[[Any, str], None] | None,
             on_grow: Callable[[int], int] | None = None) -> DownloadResult | str:
        url = holder.url.rstrip("/") + blob_path(sha256)
        peer_request = dataclasses.replace(request, url=url, sha256=sha256, credentials=self._credentials)
        done_before = progress.transferred_bytes
        log.info("fetching %s from peer %s", model, holder.agent)
        try:
            result = self.downloader.download(peer_request, progress=progress, on_total=on_total, cancel=cancel,
                                              before_rename=before_rename, on_grow=on_grow)
        except DownloadError as exc:
            self.metrics.fetched_bytes.inc(max(0, progress.transferred_bytes - done_before))
            if exc.reason == DownloadFailure.CANCELLED:
                raise
            self.metrics.fetch_failures.labels(_failure_label(exc)).inc()
            if exc.reason == DownloadFailure.CHECKSUM_MISMATCH:
                self._mark_bad(holder.agent, sha256)
                message = (f"agent {self.self_name} fetched {model} from this agent and the bytes do not match "
                           f"sha256 {sha256}; the copy was discarded and this agent is bypassed for it. Its file may "
                           f"be damaged: delete the pod to start with a fresh cache")
                log.warning("peer %s served %s with the wrong digest; trying another holder", holder.agent, model)
                self.report_bad_peer(holder.agent, model, message)
                return "bad"
            if exc.status_code == 503:
                log.info("peer %s is busy serving others; trying another holder of %s", holder.agent, model)
                return "busy"
            log.info("fetching %s from peer %s failed (%s: %s); %s", model, holder.agent, exc.reason, exc.message,
                     "resuming elsewhere" if exc.retryable else "trying elsewhere")
            return "failed"
        self.metrics.fetched_bytes.inc(result.transferred_bytes)
        log.info("fetched %s from peer %s: %d bytes in %.2fs", model, holder.agent, result.size_bytes, result.duration_s)
        return result


def _failure_label(exc: DownloadError) -> str:
    """A fixed set of metric label values."""
    if exc.reason == DownloadFailure.CHECKSUM_MISMATCH:
        return "checksum_mismatch"
    if exc.status_code == 503:
        return "busy"
    if exc.reason in (DownloadFailure.HTTP_NOT_FOUND, DownloadFailure.HTTP_UNAUTHORIZED, DownloadFailure.HTTP_FORBIDDEN):
        return "refused"
    if exc.reason in (DownloadFailure.TIMEOUT, DownloadFailure.CONNECTION_FAILED):
        return "connection"
    return "other"
