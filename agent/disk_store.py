"""The agent's disk tier: files, downloads and the index around the pure accounting.

Gather, decide, act: the accounting and eviction choice live in `disk_cache`
(pure); this module owns the directory, runs downloads in worker threads, and
applies the decisions (deleting evicted files, writing the index).

Layout under the cache directory (names never come from user input)::

    models/<id>.<format>             complete, verified file
    models/<id>.<format>.meta.json   what it is: key, source, sha256, size (written before the rename)
    models/<id>.<format>.part        download in progress (see `download.partial_paths`)
    models/<id>.<format>.part.json   the downloader's resume sidecar
    models/<id>.<format>.pending.json which model the partial file belongs to
    index.json                       use history per model (last uses, frequency rank) and the ranks
                                     of evicted models, so eviction order survives restarts

`<id>` is a hash of the model key ("namespace/name"), the uid of the ModelCache it was
fetched for and its source (URL without query, expected sha256), so a changed source,
or a ModelCache deleted and created again under the same name, gets a fresh file: an old
copy is never served for, nor reported as a copy of, a different ModelCache. A held old
copy is replaced once no job uses it (the hold is on the name; it passes to the new file). Downloads are shared
by model key: two ModelCaches with the same URL are two models (two files), which
keeps one owner per file and lets each carry its own credentials and checks.

A download may carry a rank hint, the model's use rank over the whole fleet (ModelCache
`useRank`, see `stoker.userank`): the new copy starts from it, so a model in steady use
elsewhere is not the first to go here. Waiters that join a download add their hints; the
highest counts.

A download runs as long as someone wants it: a job, or a prefetch for an order. When
the last of them stops waiting (the order is released, the job is deleted), the download
stops; the partial file is kept for a resume.

Space is reserved as the bytes arrive, with a bounded look-ahead, never from a size a
server or a ModelCache only claims: a claim is checked to be possible (it could fit if
everything evictable went) and otherwise evicts nothing. So a source that announces 95 MiB
and sends ten bytes, or answers 404, costs the cache nothing; an interrupted download
keeps reserved only the bytes it has on disk.

On start the index is rebuilt from the disk: a file without its metadata, with
a wrong size, with a safetensors header that does not validate (cheap: only the
header is read), or with a wrong digest when `verify_on_start` (slow: every byte
is re-hashed), is deleted; a partial
file with intact sidecars is kept as a *parked* download whose bytes stay
reserved in the budget, and is resumed by the next `ensure` of the same source
(or dropped when space is needed). A partial file is never
reported as cached.

Preloaded (baked-in) models are matched by a manifest, `manifest.json` in the
read-only preload directory::

    {"models": [{"key": "team/sd15", "file": "sd15.safetensors", "sha256": "<hex>"}]}

Hashing tens of gigabytes of baked-in files at every start would cost minutes, so
the manifest, written when the image is built, is trusted for the digest. An
entry is served for a model with the same key, or for any model whose expected
sha256 equals the entry's (the same bytes under another name). `key` may be
omitted for digest-only matching. Files must be plain names in that directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stoker.agent import faults, pools, safetensors_header
from stoker.agent.disk_cache import DiskCacheState, InsufficientCache
from stoker.agent.download import (
    Credentials,
    DownloadError,
    DownloadFailure,
    DownloadProgress,
    DownloadRequest,
    DownloadResult,
    Downloader,
    check_url,
    partial_paths,
    redact_url,
)
from stoker.agent.metrics import AgentMetrics
from stoker.agent.peer_fetch import PeerFetcher
from stoker.agent.settings import AgentSettings

__all__ = [
    "DiskStore",
    "DiskStoreError",
    "DownloadView",
    "FailureView",
    "ModelSource",
    "ModelView",
    "Priority",
    "StoreSnapshot",
    "PICKLE_FORMATS",
]

log = logging.getLogger(__name__)

TIER = "disk"
FORMATS = frozenset({"safetensors", "ckpt", "pt", "bin"})
PICKLE_FORMATS = frozenset({"ckpt", "pt", "bin"})
_META = ".meta.json"
_PENDING = ".pending.json"
_INDEX = "index.json"
_MANIFEST = "manifest.json"
_BANDWIDTH_EWMA_WEIGHT = 0.3
_MAX_FAILURES = 500
LOOKAHEAD_MAX_BYTES = 256 << 20
T = TypeVar("T")


class DiskStoreError(Exception):
    """A model could not be made available on disk; `reason` is machine-readable.

    `local`: the fault is this agent's (its disk or memory, see `stoker.agent.faults`), not
    the source's; such errors are retryable elsewhere and never reported as model failures."""

    def __init__(self, reason: str, message: str, *, key: str | None = None, retryable: bool = False,
                 local: bool = False, size_bytes: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.key = key
        self.retryable = retryable
        self.local = local
        self.size_bytes = size_bytes
        """The model's size as its source announced it, when that is what failed (ExceedsDiskBudget)."""


class Priority(enum.IntEnum):
    """Download order: job downloads before prefetches. Lower runs first."""

    JOB = 0
    PREFETCH = 1


@dataclass(frozen=True)
class ModelSource:
    """One model artifact as the disk tier needs it (the agent maps ModelCache onto this)."""

    key: str
    """"namespace/name" of the ModelCache."""
    url: str
    sha256: str | None = None
    size_bytes: int | None = None
    format: str = "safetensors"
    allow_pickle: bool = False
    credentials: Credentials | None = None
    model_uid: str | None = None
    """metadata.uid of the ModelCache: part of the copy's identity (see the module docstring)."""
    published_sha256: str | None = None
    """The digest the fleet agreed on when the source gives none (ModelCache status.sha256, the first
    verified copy's): copies fetched from other agents are checked against it."""

    def __repr__(self) -> str:
        # the query string of a presigned URL is a credential too
        return (
            f"ModelSource(key={self.key!r}, url={redact_url(self.url)!r}, sha256={self.sha256!r}, "
            f"size_bytes={self.size_bytes!r}, format={self.format!r}, allow_pickle={self.allow_pickle!r}, "
            f"credentials={self.credentials!r})"
        )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown weight format {self.format!r} for {self.key}; expected one of {sorted(FORMATS)}")
        for digest in (self.sha256, self.published_sha256):
            if digest is not None and (len(digest) != 64 or not _is_hex(digest)):
                raise ValueError(f"sha256 of {self.key} must be 64 lowercase hex characters")

    @property
    def digest(self) -> str:
        """Identity of the copy: key, ModelCache uid, URL without query, expected digest."""
        ident = f"{self.key}\n{redact_url(self.url)}\n{self.sha256 or ''}"
        if self.model_uid:
            ident += f"\n{self.model_uid}"
        return hashlib.sha256(ident.encode()).hexdigest()

    @property
    def verify_sha256(self) -> str | None:
        """The digest a copy from another agent must match (None: fetch from the source only)."""
        return self.sha256 or self.published_sha256

    @property
    def file_name(self) -> str:
        return f"{self.digest[:32]}.{self.format}"


@dataclass(frozen=True)
class ModelView:
    key: str
    size_bytes: int
    last_used: float
    """Unix time of the last use."""
    preloaded: bool
    held: bool
    in_use: int
    sha256: str | None
    path: pathlib.Path
    rank_s: float | None = None
    """Where eviction puts it (Unix seconds, lowest evicted first); None when preloaded."""
    model_uid: str | None = None
    """The ModelCache the copy was fetched for (None: baked in, or fetched before uids were kept)."""


@dataclass(frozen=True)
class DownloadView:
    key: str
    bytes_done: int
    total_bytes: int | None
    bandwidth_bytes_per_s: float
    priority: Priority
    running: bool
    """False while queued behind other downloads."""
    attempts: int


@dataclass(frozen=True)
class FailureView:
    """The last failure to fetch or verify a model (cleared when it succeeds)."""

    key: str
    reason: str
    message: str
    retryable: bool
    at: float
    """Unix time of the failure."""


@dataclass(frozen=True)
class StoreSnapshot:
    """What the disk tier reports in CacheAgent status."""

    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    free_bytes: int
    preloaded_bytes: int
    models: tuple[ModelView, ...]
    """Most recently used first; preloaded models included (they cost no budget)."""
    downloads: tuple[DownloadView, ...]
    parked_partial_bytes: int
    """Bytes of interrupted downloads kept for a resume (inside `reserved_bytes`)."""
    download_bandwidth_bytes_per_s: float | None
    """Moving average over recent downloads from sources; None before the first."""
    failures: tuple[FailureView, ...] = ()
    """Recent failures, newest first."""
    peer_bandwidth_bytes_per_s: float | None = None
    """Moving average over recent fetches from other agents; None before the first."""


@dataclass(frozen=True)
class _FileInfo:
    """A committed or preloaded file."""

    key: str
    path: pathlib.Path
    size_bytes: int
    sha256: str | None
    source_digest: str | None
    preloaded: bool = False
    model_uid: str | None = None


@dataclass
class _Flight:
    """One download in progress, shared by everyone waiting for the same model."""

    source: ModelSource
    priority: Priority
    seq: int
    progress: DownloadProgress = field(default_factory=DownloadProgress)
    cancel: threading.Event = field(default_factory=threading.Event)
    running: bool = False
    task: asyncio.Task[pathlib.Path] | None = None
    job_waiters: int = 0
    """Jobs waiting for this download (a released prefetch without them is stopped)."""
    waiters: int = 0
    """Everyone waiting for it, jobs and prefetches: when the last one leaves, it stops."""
    rank_hint_s: float | None = None
    """The highest fleet rank its waiters passed: the new copy starts from it."""
    from_peer: bool = False
    """The file came from another agent, not the source."""


class _PriorityGate:
    """At most `slots` downloads at once, at most `prefetch_slots` of them prefetches,
    started in priority order, first come first served within a priority."""

    def __init__(self, *, slots: int, prefetch_slots: int) -> None:
        self._slots = slots
        self._prefetch_slots = prefetch_slots
        self._cond = asyncio.Condition()
        self._waiting: list[_Flight] = []
        self._running: list[_Flight] = []

    def _may_start(self, flight: _Flight) -> bool:
        if len(self._running) >= self._slots:
            return False
        if flight.priority == Priority.PREFETCH:
            if sum(f.priority == Priority.PREFETCH for f in self._running) >= self._prefetch_slots:
                return False
        eligible = [f for f in self._waiting if f.priority == Priority.JOB or flight.priority == Priority.PREFETCH]
        return min(eligible, key=lambda f: (f.priority, f.seq)) is flight

    async def acquire(self, flight: _Flight) -> None:
        async with self._cond:
            self._waiting.append(flight)
            try:
                await self._cond.wait_for(lambda: self._may_start(flight))
            finally:
                self._waiting.remove(flight)
            self._running.append(flight)
            flight.running = True

    async def release(self, flight: _Flight) -> None:
        async with self._cond:
            self._running.remove(flight)
            flight.running = False
            self._cond.notify_all()

    async def reprioritize(self) -> None:
        async with self._cond:
            self._cond.notify_all()


class DiskStore:
    """The disk tier of one agent. All methods run on the agent's event loop.

    Call `await start()` once before anything else, and `await close()` at exit.
    """

    def __init__(
        self,
        *,
        cache_dir: pathlib.Path,
        budget_bytes: int,
        downloader: Downloader,
        preload_dir: pathlib.Path | None = None,
        metrics: AgentMetrics | None = None,
        max_downloads: int = 2,
        max_prefetches: int = 1,
        verify_on_start: bool = False,
        validate_header: Callable[[pathlib.Path], object] = safetensors_header.read_header,
        clock: Callable[[], float] = time.time,
        health: faults.AgentHealth | None = None,
        download_pool: concurrent.futures.Executor | None = None,
    ) -> None:
        self.cache_dir = pathlib.Path(cache_dir)
        self._download_pool = download_pool
        """Threads the downloads run in (None: asyncio's default pool)."""
        self.models_dir = self.cache_dir / "models"
        self.preload_dir = pathlib.Path(preload_dir) if preload_dir is not None else None
        self._downloader = downloader
        self._metrics = metrics or AgentMetrics()
        self._verify_on_start = verify_on_start
        self._validate_header = validate_header
        self._clock = clock
        self._state = DiskCacheState(budget_bytes=budget_bytes)
        self._files: dict[str, _FileInfo] = {}
        self._parked: dict[str, tuple[str, pathlib.Path]] = {}  # key -> (source digest, data path)
        self._flights: dict[str, _Flight] = {}
        self._gate = _PriorityGate(slots=max_downloads, prefetch_slots=max_prefetches)
        self._seq = itertools.count()
        self._bandwidth_bytes_per_s: float | None = None
        self._peer_bandwidth_bytes_per_s: float | None = None
        self._failures: dict[str, FailureView] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self.health = health or faults.AgentHealth(clock=clock)
        """Local faults of the cache volume (shared with the rest of the agent)."""
        self._full_need_bytes = 0
        """Size of the last download that found the volume full: free space to see before clearing DiskFull."""
        self.peers: PeerFetcher | None = None
        """Fetches from the fleet's other agents before the source (None: the source only)."""
        self.duplicate_discount_s = 0.0
        """How much earlier a copy other agents also hold is evicted (with the peer tier on)."""

    @classmethod
    def from_settings(
        cls, settings: AgentSettings, *, metrics: AgentMetrics | None = None, downloader: Downloader | None = None,
        health: faults.AgentHealth | None = None,
        download_pool: concurrent.futures.Executor | None = None,
    ) -> DiskStore:
        """The disk tier as configured; the caller closes the downloader it passes (or `store.downloader`)."""
        return cls(
            cache_dir=settings.cache_dir,
            budget_bytes=settings.disk_budget_bytes,
            downloader=downloader or Downloader(settings.download_policy()),
            preload_dir=settings.preload_dir,
            metrics=metrics,
            max_downloads=settings.max_downloads,
            max_prefetches=settings.max_prefetches,
            verify_on_start=settings.verify_on_start,
            health=health,
            download_pool=download_pool,
        )

    @property
    def downloader(self) -> Downloader:
        return self._downloader

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the index from disk and scan the preload directory."""
        self._loop = asyncio.get_running_loop()
        found = await asyncio.to_thread(self._scan)
        self._apply_scan(found)
        self._started = True
        self._publish()
        log.info(
            "disk cache ready at %s: %d models, %d bytes used of %d, %d partial downloads kept, %d preloaded",
            self.cache_dir, len(self._files) - found.preloaded_count, self._state.used_bytes,
            self._state.budget_bytes, len(self._parked), found.preloaded_count,
        )

    async def close(self) -> None:
        """Stop downloads (their partial files are kept for a resume) and save the index."""
        flights = list(self._flights.values())
        for flight in flights:
            flight.cancel.set()
        tasks = [f.task for f in flights if f.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._save_index()

    # ---- the main entry points -------------------------------------------

    async def ensure(self, source: ModelSource, *, priority: Priority = Priority.JOB,
                     rank_hint_s: float | None = None) -> pathlib.Path:
        """Path of the verified file for `source`, downloading it if needed.

        `rank_hint_s` is the model's fleet-wide use rank (ModelCache `useRank`) when the
        operator publishes one: a copy downloaded here starts its eviction rank from it.

        Concurrent calls for the same model share one download. Raises
        `DiskStoreError` with a `reason` (e.g. `ChecksumMismatch`,
        `InsufficientCache`, `PickleFormatNotAllowed`).
        """
        self._check_started()
        try:
            self._check_source(source)
        except DiskStoreError as exc:
            self._record_failure(exc)
            raise
        counted = False
        while True:
            path = self._lookup(source)
            if path is not None:
                if not counted:
                    self._metrics.cache_hits.labels(TIER).inc()
                return path
            if not counted:
                self._metrics.cache_misses.labels(TIER).inc()
                counted = True
            flight = self._flights.get(source.key)
            if flight is not None and flight.source.digest != source.digest:
                raise DiskStoreError(
                    "SourceChanged",
                    f"{source.key} is already downloading from another source; retry when that download ends",
                    key=source.key,
                    retryable=True,
                )
            if flight is None:
                flight = self._start_flight(source, priority)
            elif priority < flight.priority:
                flight.priority = priority
                await self._gate.reprioritize()
            if rank_hint_s is not None and (flight.rank_hint_s is None or rank_hint_s > flight.rank_hint_s):
                flight.rank_hint_s = rank_hint_s
            assert flight.task is not None
            flight.job_waiters += priority == Priority.JOB
            flight.waiters += 1
            try:
                # shielded: one caller giving up must not cancel the download for the others
                await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if flight.task.cancelled() and current is not None and not current.cancelling():
                    continue  # the download was abandoned (a released order), not this caller: start again
                raise
            finally:
                flight.job_waiters -= priority == Priority.JOB
                flight.waiters -= 1
                if flight.waiters == 0 and not flight.task.done():
                    # nobody wants it any more (its job was deleted): stop it, keeping the bytes for a resume
                    log.info("stopping the download of %s: nobody waits for it any more", source.key)
                    flight.task.cancel()
            # loop: the file could have been evicted before this waiter resumed

    async def prefetch(self, source: ModelSource, *, rank_hint_s: float | None = None) -> pathlib.Path:
        """`ensure` behind job downloads in priority (for operator orders)."""
        return await self.ensure(source, priority=Priority.PREFETCH, rank_hint_s=rank_hint_s)

    def abandon(self, key: str) -> bool:
        """Stop the download of `key` unless a job waits for it (its order was released).

        The partial file is kept, reserved, for a resume. True when a download was stopped.
        """
        flight = self._flights.get(key)
        if flight is None or flight.job_waiters > 0 or flight.task is None or flight.task.done():
            return False
        log.info("stopping the download of %s: its order was released and no job waits for it", key)
        flight.task.cancel()
        return True

    def is_cached(self, key: str) -> bool:
        return key in self._files

    def verified_path(self, sha256: str) -> pathlib.Path | None:
        """Path of a complete file this agent downloaded and hashed whose content has this
        digest, for the peer server; None when there is none (partial downloads and baked-in
        files, whose digest only the image's manifest vouches for, are never offered).
        Callable from any thread: it reads a copy of the index."""
        for info in list(self._files.values()):
            if not info.preloaded and info.sha256 == sha256:
                return info.path
        return None

    # ---- pins and holds --------------------------------------------------

    def pin(self, key: str) -> None:
        """A job uses `key`: it is not evicted until the matching `unpin`."""
        self._state = self._state.pin(key, now=self._clock())

    def unpin(self, key: str) -> None:
        self._state = self._state.unpin(key, now=self._clock())
        self._save_index()

    def hold(self, key: str) -> None:
        """Operator order: keep `key` on disk (now or once downloaded); never evict it."""
        self._state = self._state.hold(key)

    def release(self, key: str) -> None:
        """Operator order: `key` may be evicted again."""
        self._state = self._state.release(key)

    def set_duplicates(self, keys: frozenset[str]) -> None:
        """Operator's word (spec.duplicates): these copies other agents also hold. With the peer
        tier on, eviction takes them `duplicate_discount_s` earlier than their rank says."""
        if self.peers is None or self.duplicate_discount_s <= 0:
            return
        self._state = self._state.with_duplicates(keys, discount_s=self.duplicate_discount_s)

    # ---- reporting -------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        snap = self._state.snapshot()
        models = tuple(
            ModelView(
                key=e.key,
                size_bytes=e.size_bytes,
                last_used=e.last_used,
                preloaded=e.preloaded,
                held=e.held,
                in_use=e.in_use,
                sha256=self._files[e.key].sha256,
                path=self._files[e.key].path,
                rank_s=e.eviction_rank_s,
                model_uid=self._files[e.key].model_uid,
            )
            for e in snap.entries
        )
        downloads = tuple(
            DownloadView(
                key=f.source.key,
                bytes_done=f.progress.bytes_done,
                total_bytes=f.progress.total_bytes,
                bandwidth_bytes_per_s=f.progress.bandwidth_bytes_per_s,
                priority=f.priority,
                running=f.running,
                attempts=f.progress.attempts,
            )
            for f in sorted(self._flights.values(), key=lambda f: (f.priority, f.seq))
        )
        parked_bytes = sum(
            self._state.reservations[k].size_bytes for k in self._parked if k in self._state.reservations
        )
        return StoreSnapshot(
            budget_bytes=snap.budget_bytes,
            used_bytes=snap.used_bytes,
            reserved_bytes=snap.reserved_bytes,
            free_bytes=snap.free_bytes,
            preloaded_bytes=snap.preloaded_bytes,
            models=models,
            downloads=downloads,
            parked_partial_bytes=parked_bytes,
            download_bandwidth_bytes_per_s=self._bandwidth_bytes_per_s,
            peer_bandwidth_bytes_per_s=self._peer_bandwidth_bytes_per_s,
            failures=tuple(sorted(self._failures.values(), key=lambda f: -f.at)),
        )

    @property
    def state(self) -> DiskCacheState:
        """The current accounting (an immutable value)."""
        return self._state

    # ---- internals: lookups ------------------------------------------------

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("DiskStore.start() must be awaited before use")

    def _check_source(self, source: ModelSource) -> None:
        if source.format != "safetensors":
            raise DiskStoreError(
                "UnsupportedFormat",
                f"{source.key} is in format {source.format!r}; only safetensors files can be loaded: convert it",
                key=source.key,
            )
        if source.format in PICKLE_FORMATS and not source.allow_pickle:
            raise DiskStoreError(
                "PickleFormatNotAllowed",
                f"{source.key} is in the pickle-based format {source.format!r}, which can run code when loaded; "
                f"convert it to safetensors, or set allowPickle: true on the ModelCache if you trust the source",
                key=source.key,
            )
        try:
            check_url(source.url, self._downloader.policy)
        except DownloadError as exc:
            raise DiskStoreError(str(exc.reason), f"{source.key}: {exc.message}", key=source.key) from None

    def _lookup(self, source: ModelSource) -> pathlib.Path | None:
        info = self._files.get(source.key)
        if info is not None and not info.preloaded and info.source_digest != source.digest:
            info = None  # the source changed: the old file does not count (replaced on download)
        if info is not None and info.preloaded and source.sha256 and info.sha256 and info.sha256 != source.sha256:
            info = None
        if info is None and source.sha256:
            info = next(
                (f for f in self._files.values() if f.preloaded and f.sha256 == source.sha256), None
            )
        if info is None:
            return None
        self._state = self._state.touch(info.key, now=self._clock())
        return info.path

    # ---- internals: downloads ----------------------------------------------

    def _start_flight(self, source: ModelSource, priority: Priority) -> _Flight:
        flight = _Flight(source=source, priority=priority, seq=next(self._seq))
        self._flights[source.key] = flight
        flight.task = asyncio.get_running_loop().create_task(self._run_flight(flight), name=f"download {source.key}")
        # failures reach every waiter; this marks them retrieved when nobody waits any more
        flight.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._metrics.downloads_in_progress.set(len(self._flights))
        return flight

    async def _run_flight(self, flight: _Flight) -> pathlib.Path:
        try:
            await self._gate.acquire(flight)
            try:
                return await self._download(flight)
            finally:
                await self._gate.release(flight)
        finally:
            self._flights.pop(flight.source.key, None)
            self._metrics.downloads_in_progress.set(len(self._flights))
            self._publish()

    async def _download(self, flight: _Flight) -> pathlib.Path:
        try:
            path = await self._download_once(flight)
        except DiskStoreError as exc:
            if exc.reason != "Cancelled" and not exc.local:
                self._record_failure(exc)
            raise
        self._failures.pop(flight.source.key, None)
        return path

    def _local_fault(self, key: str, message: str, *, exc: BaseException | None = None,
                     os_errno: int | None = None, need_bytes: int = 0) -> DiskStoreError:
        """A fault of this agent's disk or memory while fetching `key` (see `stoker.agent.faults`)."""
        reason = faults.classify(exc, os_errno=os_errno) or faults.DISK_ERROR
        if reason == faults.DISK_FULL:
            self._full_need_bytes = max(need_bytes, 1 << 20)
        self.health.fault(reason, f"cache volume {self.cache_dir}: {message}")
        self._metrics.count_download_failure(reason)
        log.warning("local fault while fetching %s: %s: %s", key, reason, message)
        return DiskStoreError(
            reason, f"{key}: {message}; a fault of this agent, not of the model's source: {faults.advice(reason)}",
            key=key, retryable=True, local=True)

    async def probe(self) -> bool:
        """Whether the cache volume works again after a local disk fault: enough free space for the
        download that found it full, and a small write and fsync that succeed. Clears the fault if so."""
        need = self._full_need_bytes

        def check() -> None:
            st = os.statvfs(self.cache_dir)
            if self.health.has(faults.DISK_FULL) and st.f_bavail * st.f_frsize < need:
                raise OSError(28, f"{st.f_bavail * st.f_frsize} bytes free, {need} needed")  # ENOSPC
            path = self.cache_dir / ".probe"
            try:
                with open(path, "wb") as fh:
                    fh.write(bytes(64 << 10))
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                path.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(check)
        except OSError as exc:
            self.health.fault(faults.classify(exc) or faults.DISK_ERROR, f"cache volume {self.cache_dir}: {exc}")
            return False
        self.health.clear(faults.DISK_FULL, faults.DISK_ERROR)
        return True

    def _record_failure(self, exc: DiskStoreError) -> None:
        key = exc.key or "?"
        self._failures.pop(key, None)
        self._failures[key] = FailureView(
            key=key, reason=exc.reason, message=exc.message, retryable=exc.retryable, at=self._clock()
        )
        while len(self._failures) > _MAX_FAILURES:
            del self._failures[next(iter(self._failures))]

    async def _download_once(self, flight: _Flight) -> pathlib.Path:
        source = flight.source
        key = source.key
        dest = self.models_dir / source.file_name
        old = self._files.get(key)
        if old is not None and not old.preloaded and old.source_digest != source.digest:
            if self._state.pins.get(key, 0) > 0:
                raise DiskStoreError(
                    "SourceChanged",
                    f"{key} changed (another source, or a new ModelCache of that name) while a job still uses the "
                    "old file; retry when it ends",
                    key=key,
                    retryable=True,
                )
            # Held or not, the old copy is not this model's: the hold (on the name) passes to the new file.
            self._state = self._state.remove(key, force=True)
            self._delete_files(old)
        parked = self._parked.pop(key, None)
        if parked is not None and parked[0] != source.digest:
            self._parked[key] = parked
            self._drop_parked(key)
        elif parked is not None:
            log.info("resuming the interrupted download of %s", key)
        loop = asyncio.get_running_loop()

        announced: list[int] = []

        def on_total(total_bytes: int) -> None:
            announced.append(total_bytes)
            # a claimed size only has to be possible: space is reserved as the bytes arrive
            _call_in_loop(loop, lambda: self._check_fits(key, total_bytes))

        def on_grow(needed_bytes: int) -> int:
            return _call_in_loop(loop, lambda: self._grow(key, needed_bytes, flight.progress.total_bytes))

        def before_rename(part: pathlib.Path, sha256: str) -> None:
            if source.format == "safetensors":
                self._validate_header(part)
            # metadata first: a file in models/ without it is an incomplete download
            self._write_json(
                dest.with_name(dest.name + _META),
                {
                    "key": key,
                    "source": source.digest,
                    "url": redact_url(source.url),
                    "sha256": sha256,
                    "size_bytes": part.stat().st_size,
                    "format": source.format,
                    "uid": source.model_uid,
                },
                fsync=True,
            )

        request = DownloadRequest(
            url=source.url,
            dest=dest,
            sha256=source.sha256,
            size_bytes=source.size_bytes,
            credentials=source.credentials,
            resume_key=source.digest,
        )
        try:
            if source.size_bytes is not None:
                self._check_fits(key, source.size_bytes)
            await asyncio.to_thread(
                self._write_json, dest.with_name(dest.name + _PENDING), {"key": key, "source": source.digest}
            )
            worker = loop.create_task(
                pools.run_in(
                    self._download_pool,
                    self._fetch,
                    flight,
                    request,
                    progress=flight.progress,
                    on_total=on_total,
                    cancel=flight.cancel,
                    before_rename=before_rename,
                    on_grow=on_grow,
                )
            )
            finished_after_cancel = False
            try:
                result = await asyncio.shield(worker)
            except asyncio.CancelledError:
                # the thread cannot be interrupted; stop it and wait, so the budget stays true
                flight.cancel.set()
                try:
                    result = await worker
                except BaseException:
                    raise asyncio.CancelledError() from None
                finished_after_cancel = True  # too late to stop: keep the verified file, then report the cancel
        except asyncio.CancelledError:
            self._park_or_abort(key, dest, source, keep=True)
            raise
        except DownloadError as exc:
            self._park_or_abort(key, dest, source, keep=exc.retryable)
            if exc.reason == DownloadFailure.IO_ERROR:  # writing the file failed here: the disk, not the source
                raise self._local_fault(key, exc.message, os_errno=exc.os_errno,
                                        need_bytes=flight.progress.total_bytes or source.size_bytes or 0) from None
            self._metrics.count_download_failure(exc.reason)
            raise DiskStoreError(str(exc.reason), f"{key}: {exc.message}", key=key, retryable=exc.retryable) from None
        except safetensors_header.HeaderError as exc:
            self._park_or_abort(key, dest, source, keep=False)
            self._metrics.count_download_failure("InvalidSafetensors")
            raise DiskStoreError(
                "InvalidSafetensors",
                f"{key}: the downloaded file is not a valid safetensors file ({exc}); it was discarded. "
                f"Check spec.source.url and spec.format",
                key=key,
            ) from None
        except InsufficientCache as exc:
            self._park_or_abort(key, dest, source, keep=False)
            size = announced[-1] if announced else (source.size_bytes or 0)
            if size > self._state.budget_bytes:  # no eviction can ever make room here
                self._metrics.count_download_failure("ExceedsDiskBudget")
                raise DiskStoreError(
                    "ExceedsDiskBudget",
                    f"{key} is {size} bytes (as its source announced), more than this agent's whole disk budget of "
                    f"{self._state.budget_bytes} bytes; give agents a larger budget or use a smaller model",
                    key=key, retryable=True, size_bytes=size) from None
            self._metrics.count_download_failure(exc.reason)
            raise DiskStoreError(exc.reason, str(exc), key=key, retryable=True) from None
        except (OSError, MemoryError) as exc:  # metadata, sidecar, fsync or rename on this agent's disk
            with contextlib.suppress(OSError):
                self._park_or_abort(key, dest, source, keep=False)
            raise self._local_fault(key, f"{type(exc).__name__}: {exc}", exc=exc,
                                    need_bytes=flight.progress.total_bytes or source.size_bytes or 0) from None
        except BaseException:
            self._park_or_abort(key, dest, source, keep=False)
            raise

        (dest.with_name(dest.name + _PENDING)).unlink(missing_ok=True)
        reservation = self._state.reservations.get(key)
        if reservation is None or result.size_bytes > reservation.size_bytes:
            self._reserve(key, result.size_bytes)  # an empty file, or a resumed file complete before this run
        self._state = self._state.commit(key, now=self._clock(), size_bytes=result.size_bytes,
                                         rank_hint_s=flight.rank_hint_s)
        self._files[key] = _FileInfo(
            key=key, path=dest, size_bytes=result.size_bytes, sha256=result.sha256, source_digest=source.digest,
            model_uid=source.model_uid,
        )
        self.health.clear(faults.DISK_FULL, faults.DISK_ERROR)  # a whole file was written and synced
        if flight.from_peer:
            if result.transferred_bytes > 0 and result.duration_s > 0:
                bw = result.bandwidth_bytes_per_s
                prev = self._peer_bandwidth_bytes_per_s
                self._peer_bandwidth_bytes_per_s = bw if prev is None else prev + _BANDWIDTH_EWMA_WEIGHT * (bw - prev)
        else:
            self._metrics.downloaded_bytes.inc(result.transferred_bytes)
            self._metrics.download_duration.observe(result.duration_s)
        if result.transferred_bytes > 0 and result.duration_s > 0 and not flight.from_peer:
            bw = result.bandwidth_bytes_per_s
            prev = self._bandwidth_bytes_per_s
            self._bandwidth_bytes_per_s = bw if prev is None else prev + _BANDWIDTH_EWMA_WEIGHT * (bw - prev)
            self._metrics.download_bandwidth.set(self._bandwidth_bytes_per_s)
        self._save_index()
        log.info("cached %s: %d bytes at %s", key, result.size_bytes, dest.name)
        if finished_after_cancel:
            raise asyncio.CancelledError()
        return dest

    def _fetch(self, flight: _Flight, request: DownloadRequest, **kwargs: Any) -> DownloadResult:
        """Runs in the download thread: the file from another agent holding a verified copy when
        there is one and a digest to check it against, else from the source (which resumes what a
        peer left when it can). A peer's failure never reaches the caller: only the source's does."""
        source = flight.source
        digest = source.verify_sha256
        if self.peers is not None and digest is not None:
            result = self.peers.fetch(request, model=source.key.rsplit("/", 1)[-1], sha256=digest, **kwargs)
            if result is not None:
                flight.from_peer = True
                return result
        return self._downloader.download(request, **kwargs)

    def _reserve(self, key: str, size_bytes: int) -> None:
        """Reserve (or resize the reservation of) `key`; evicts the lowest-ranked files, then parked partials."""
        now = self._clock()
        while True:
            try:
                if key in self._state.reservations:
                    if self._state.reservations[key].size_bytes == size_bytes:
                        return
                    self._state, victims = self._state.resize_reservation(key, size_bytes, now=now)
                else:
                    self._state, _, victims = self._state.reserve(key, size_bytes, now=now)
                break
            except InsufficientCache as exc:
                # interrupted downloads of other models are the cheapest bytes to give up, but only
                # when giving them up (with the evictable files) actually makes enough room
                others = self._droppable_parked(key)
                droppable = sum(self._state.reservations[k].size_bytes for k in others)
                if not others or exc.free_bytes + exc.evictable_bytes + droppable < exc.needed_bytes:
                    raise
                self._drop_parked(others[0])
        self._evict_files(victims)
        self._publish()

    def _droppable_parked(self, key: str) -> list[str]:
        """Interrupted downloads of other models, oldest first: the cheapest bytes to give up."""
        return sorted((k for k in self._parked if k != key and k not in self._flights and k in self._state.reservations),
                      key=lambda k: self._state.reservations[k].created_at)

    def _check_fits(self, key: str, size_bytes: int) -> None:
        """Raise `InsufficientCache` when `key` could never reach `size_bytes`; evicts and drops nothing."""
        try:
            self._state.check_fits(key, size_bytes)
        except InsufficientCache as exc:
            droppable = sum(self._state.reservations[k].size_bytes for k in self._droppable_parked(key))
            if exc.free_bytes + exc.evictable_bytes + droppable < exc.needed_bytes:
                raise

    def _grow(self, key: str, needed_bytes: int, total_bytes: int | None) -> int:
        """Reserve room for `needed_bytes` of `key` plus a look-ahead (as much again as arrived, at
        most LOOKAHEAD_MAX_BYTES, never past the announced total), so eviction follows the bytes
        that really arrive: a source that claims gigabytes and sends ten bytes evicts ten bytes'
        worth. The download thread asks again only each time its reservation runs out, about
        log2(size) times up to the cap and then once per cap. Returns the bytes now reserved."""
        current = self._state.reservations.get(key)
        have = current.size_bytes if current is not None else 0
        if needed_bytes <= have:
            return have
        target = needed_bytes + min(needed_bytes, LOOKAHEAD_MAX_BYTES)
        if total_bytes is not None:
            target = min(target, max(total_bytes, needed_bytes))
        try:
            self._reserve(key, target)
        except InsufficientCache:
            if target == needed_bytes:
                raise
            self._reserve(key, needed_bytes)  # no room for the look-ahead: only what arrived
            return needed_bytes
        return target

    def _park_or_abort(self, key: str, dest: pathlib.Path, source: ModelSource, *, keep: bool) -> None:
        part = partial_paths(dest)[0]
        size = part.stat().st_size if keep and part.exists() else None
        if size is not None and key in self._state.reservations:
            # only the bytes on disk stay reserved: the look-ahead (or a claimed size) goes back
            self._state, _ = self._state.resize_reservation(key, size, now=self._clock())
            self._parked[key] = (source.digest, dest)
            log.info("kept %d bytes of the interrupted download of %s for a resume", size, key)
        else:
            if key in self._state.reservations:
                self._state = self._state.abort(key)
            for path in (*partial_paths(dest), dest.with_name(dest.name + _PENDING)):
                path.unlink(missing_ok=True)
        self._publish()

    def _drop_parked(self, key: str) -> None:
        _, dest = self._parked.pop(key)
        if key in self._state.reservations:
            self._state = self._state.abort(key)
        for path in (*partial_paths(dest), dest.with_name(dest.name + _PENDING)):
            path.unlink(missing_ok=True)
        log.info("dropped the partial download of %s", key)

    def _evict_files(self, victims: tuple[str, ...]) -> None:
        for key in victims:
            info = self._files.get(key)
            if info is not None:
                self._delete_files(info)
                log.info("evicted %s (%d bytes, lowest use rank)", key, info.size_bytes)
            self._metrics.evictions.labels(TIER).inc()
        if victims:
            self._save_index()

    def _delete_files(self, info: _FileInfo) -> None:
        self._files.pop(info.key, None)
        if info.preloaded:
            return
        info.path.with_name(info.path.name + _META).unlink(missing_ok=True)
        info.path.unlink(missing_ok=True)

    # ---- internals: index and start-up scan --------------------------------

    def _publish(self) -> None:
        self._metrics.used_bytes.labels(TIER).set(self._state.used_bytes)
        self._metrics.reserved_bytes.labels(TIER).set(self._state.reserved_bytes)
        self._metrics.budget_bytes.labels(TIER).set(self._state.budget_bytes)

    def _save_index(self) -> None:
        entries = [e for e in self._state.entries.values() if not e.preloaded]
        # Version 2 added "rank" and "evicted"; a version 1 index (without them) still loads, and
        # an older agent reading this one ignores them.
        index = {
            "version": 2,
            "last_used": {e.key: e.last_used for e in entries},
            "previous_use": {e.key: e.previous_use for e in entries if e.previous_use is not None},
            "used": sorted(e.key for e in entries if e.used),
            "rank": {e.key: e.rank_s for e in entries if e.rank_s is not None},
            "evicted": dict(self._state.evicted),
        }
        with contextlib.suppress(OSError):
            self._write_json(self.cache_dir / _INDEX, index)

    @staticmethod
    def _write_json(path: pathlib.Path, data: dict[str, Any], *, fsync: bool = False) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _scan(self) -> _ScanResult:
        """Runs in a worker thread: read the directory, delete what cannot be trusted."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        result = _ScanResult()
        try:
            index = _read_json(self.cache_dir / _INDEX)
            if not isinstance(index, dict):
                index = {}
        except (OSError, ValueError):
            index = {}

        def times(name: str) -> dict[str, float]:
            raw = index.get(name)
            if not isinstance(raw, dict):
                return {}
            return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and math.isfinite(v)}

        result.last_used = times("last_used")
        result.previous_use = times("previous_use")
        result.rank = times("rank")
        result.evicted = times("evicted")
        used = index.get("used")
        result.used = {k for k in used if isinstance(k, str)} if isinstance(used, list) else set()
        names = {p.name for p in self.models_dir.iterdir()}
        claimed: set[str] = set()
        for name in sorted(names):
            if name.endswith(".tmp"):
                (self.models_dir / name).unlink(missing_ok=True)
                claimed.add(name)
            if not name.endswith(_META):
                continue
            data_name = name[: -len(_META)]
            claimed |= {name, data_name}
            info = self._check_committed(self.models_dir / data_name, self.models_dir / name)
            if info is None:
                (self.models_dir / name).unlink(missing_ok=True)
                (self.models_dir / data_name).unlink(missing_ok=True)
                continue
            previous = result.files.get(info.key)
            if previous is not None:
                # two files for one key (its source changed): keep the more recent download
                loser = min(previous, info, key=lambda i: i.path.stat().st_mtime)
                loser.path.unlink(missing_ok=True)
                loser.path.with_name(loser.path.name + _META).unlink(missing_ok=True)
                info = previous if loser is info else info
            result.files[info.key] = info
        for name in sorted(names):
            if not name.endswith(_PENDING):
                continue
            data_name = name[: -len(_PENDING)]
            part, sidecar = partial_paths(self.models_dir / data_name)
            claimed |= {name, part.name, sidecar.name}
            try:
                pending = _read_json(self.models_dir / name)
                meta = _read_json(sidecar)
                total = meta.get("total_bytes")
                usable = part.exists() and isinstance(total, int) and part.stat().st_size <= total
                key, digest = pending["key"], pending["source"]
            except (OSError, ValueError, KeyError, TypeError):
                usable = False
            if usable and key not in result.files:
                result.partials.append((key, digest, self.models_dir / data_name, part.stat().st_size))
            else:
                for path in (self.models_dir / name, part, sidecar):
                    path.unlink(missing_ok=True)
        for name in sorted(names - claimed):
            path = self.models_dir / name
            log.warning("removing %s from the cache directory: it has no metadata (an incomplete download)", name)
            if not path.is_dir() or path.is_symlink():  # files, links, and FIFOs or sockets someone left
                path.unlink(missing_ok=True)
        if self.preload_dir is not None:
            for info in self._scan_preload(self.preload_dir, self._validate_header):
                result.files.setdefault(info.key, info)
                result.preloaded_count += 1
        return result

    def _check_committed(self, data: pathlib.Path, meta_path: pathlib.Path) -> _FileInfo | None:
        try:
            meta = _read_json(meta_path)
            key, size, digest = meta["key"], int(meta["size_bytes"]), meta.get("sha256")
            source = meta["source"]
            stat = data.stat()
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("removing %s: its metadata is unreadable or the file is missing", data.name)
            return None
        if stat.st_size != size or not digest:
            log.warning("removing %s (%s): size %d, expected %d", data.name, key, stat.st_size, size)
            return None
        if meta.get("format", "safetensors") == "safetensors":
            try:
                self._validate_header(data)
            except (safetensors_header.HeaderError, OSError) as exc:
                log.warning("removing %s (%s): its safetensors header does not validate (%s)", data.name, key, exc)
                return None
        if self._verify_on_start and _sha256_file(data) != digest:
            log.warning("removing %s (%s): sha256 does not match what was downloaded", data.name, key)
            return None
        uid = meta.get("uid")
        return _FileInfo(key=key, path=data, size_bytes=size, sha256=digest, source_digest=source,
                         model_uid=uid if isinstance(uid, str) else None)

    @staticmethod
    def _scan_preload(preload_dir: pathlib.Path,
                      validate_header: Callable[[pathlib.Path], object] = safetensors_header.read_header) -> list[_FileInfo]:
        manifest_path = preload_dir / _MANIFEST
        if not manifest_path.exists():
            if preload_dir.exists() and any(preload_dir.iterdir()):
                log.warning("preload directory %s has no %s; its files are ignored", preload_dir, _MANIFEST)
            return []
        try:
            entries = _read_json(manifest_path)["models"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring preloaded models: cannot read %s (%s)", manifest_path, exc)
            return []
        found: list[_FileInfo] = []
        root = preload_dir.resolve()
        for entry in entries:
            try:
                file_name = str(entry["file"])
                sha = entry.get("sha256")
                key = str(entry.get("key") or f"preload:{file_name}")
            except (KeyError, TypeError, AttributeError):
                log.error("ignoring a malformed entry in %s: %r", manifest_path, entry)
                continue
            path = (preload_dir / file_name).resolve()
            if "/" in file_name or file_name in ("", ".", "..") or path.parent != root or not path.is_file():
                log.error("ignoring preloaded %s: %r is not a file directly inside %s", key, file_name, preload_dir)
                continue
            if str(entry.get("format") or path.suffix.lstrip(".") or "safetensors") == "safetensors":
                try:
                    validate_header(path)  # baked into the image, but checked like any download
                except (safetensors_header.HeaderError, OSError) as exc:
                    log.error("ignoring preloaded %s: %s does not validate as safetensors (%s)", key, file_name, exc)
                    continue
            found.append(
                _FileInfo(
                    key=key, path=path, size_bytes=path.stat().st_size, sha256=sha, source_digest=None, preloaded=True
                )
            )
        return found

    def _apply_scan(self, found: _ScanResult) -> None:
        now = self._clock()
        budget = self._state.budget_bytes
        state = DiskCacheState(budget_bytes=2**63)
        for info in found.files.values():
            if info.preloaded:
                state = state.add_preloaded(info.key, info.size_bytes, now=now)
            else:
                state, _, _ = state.reserve(info.key, info.size_bytes, now=now)
                state = state.commit(info.key, now=found.last_used.get(info.key, 0.0))
                state = state.with_history(info.key, previous_use=found.previous_use.get(info.key),
                                           used=info.key in found.used, rank_s=found.rank.get(info.key))
        state = state.with_evicted_ranks(found.evicted)
        self._files = dict(found.files)
        # a smaller budget than last time evicts the lowest-ranked files
        state, victims = state.with_budget(budget)
        for key in victims:
            self._delete_files(self._files[key])
        for key, digest, dest, size in found.partials:  # the bytes on disk stay reserved, no more
            if key in state.entries or state.free_bytes < size:
                for path in (*partial_paths(dest), dest.with_name(dest.name + _PENDING)):
                    path.unlink(missing_ok=True)
                continue
            state, _, _ = state.reserve(key, size, now=now)
            self._parked[key] = (digest, dest)
        self._state = state
        self._save_index()


@dataclass
class _ScanResult:
    files: dict[str, _FileInfo] = field(default_factory=dict)
    partials: list[tuple[str, str, pathlib.Path, int]] = field(default_factory=list)
    last_used: dict[str, float] = field(default_factory=dict)
    previous_use: dict[str, float] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    rank: dict[str, float] = field(default_factory=dict)
    evicted: dict[str, float] = field(default_factory=dict)
    """Ranks of models evicted before the restart."""
    preloaded_count: int = 0


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], *, timeout_s: float = 60.0) -> T:
    """Run `fn` on the event loop from a worker thread and return its result."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return future.result(timeout=timeout_s)


def _read_json(path: pathlib.Path) -> Any:
    """The JSON in `path`, which must be a regular file: a FIFO or device left in the cache folder
    fails the read (OSError) instead of blocking the scan."""
    fd = safetensors_header.open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        return json.loads(fh.read(16 << 20))


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)

