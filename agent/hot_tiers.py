"""RAM and VRAM tiers: loaded models kept warm under byte budgets, least recently used out first.

* ``RamTier`` keeps page-locked host copies of models' data regions. Moving one to a GPU is
  a single asynchronous copy of one buffer at PCIe speed, then tensor views over it.
* ``VramTier`` keeps loaded state dicts on the GPU. A model is in use between
  ``acquire`` and the end of its ``with`` block and is never evicted while in use.

Both choose victims with the disk tier's pure ``plan_eviction`` so that every tier follows
one policy. Space is reserved before a load starts (sizes come from the safetensors
header), so two concurrent loads can never overshoot the budget together, and concurrent
requests for the same model share one load. Time comes from an injectable clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stoker.agent import safetensors_header
from stoker.agent.disk_cache import CachedItem, InsufficientCache, plan_eviction
from stoker.agent.loader import (
    DeviceOutOfMemory,
    FileIdentity,
    LoadedModel,
    Loader,
    LoadSource,
    LoadTimings,
    allocate_host_buffer,
    build_views,
)

if TYPE_CHECKING:
    from os import PathLike

__all__ = [
    "ModelInUse",
    "NotResident",
    "RamTier",
    "TierEntry",
    "TierError",
    "TierSnapshot",
    "VramTier",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class TierError(Exception):
    """Root of the RAM/VRAM tier errors (budget shortfalls raise disk_cache.InsufficientCache)."""


class NotResident(TierError, KeyError):
    """The model is not held by this tier and no way to load it was given."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ModelInUse(TierError):
    """The model cannot be evicted: a job is using it."""


@dataclass(frozen=True, slots=True)
class TierEntry:
    """One model held by a tier, as reported in the CacheAgent status."""

    key: str
    size_bytes: int
    last_used: float
    in_use: int
    """How many holders are using it now (never evicted while above zero)."""


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    """A tier's occupancy; entries most recently used first."""

    tier: str
    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    entries: tuple[TierEntry, ...]

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes - self.reserved_bytes


@dataclass(eq=False, slots=True)
class _Entry:
    key: str
    model: LoadedModel
    size_bytes: int
    last_used: float
    refs: int = 0

    @property
    def identity(self) -> FileIdentity | None:
        return self.model.identity


def _matches(entry: _Entry, identity: FileIdentity | None) -> bool:
    """Whether ``entry`` may serve a request for the file with ``identity`` (None: any)."""
    return identity is None or entry.identity is None or entry.identity == identity


class _Tier:
    """Budgeted LRU map of key -> LoadedModel with reservations and shared in-flight loads.

    Requests may name the ``FileIdentity`` of the file they want: an entry read from
    another file (the source changed and was downloaded again) is stale and never served.
    A stale entry nobody uses is dropped at once; one still in use is retired: it keeps
    its bytes counted against the budget, is no longer listed, and goes when released.
    """

    name = "tier"

    def __init__(
        self,
        budget_bytes: int,
        *,
        clock: Clock = time.time,
        on_evict: Callable[[str, LoadedModel], None] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._on_evict = on_evict
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._retired: list[_Entry] = []  # stale entries still in use
        self._loading: dict[str, int] = {}  # key -> reserved bytes of loads in flight

    # -- reporting

    def __contains__(self, key: object) -> bool:
        with self._cond:
            return key in self._entries

    def holds(self, key: str, identity: FileIdentity | None = None) -> bool:
        """Whether ``key`` is resident (read from the file with ``identity``, when given)."""
        with self._cond:
            entry = self._entries.get(key)
            return entry is not None and _matches(entry, identity)

    def loading(self, key: str) -> bool:
        """Whether a load of ``key`` into this tier is in flight."""
        with self._cond:
            return key in self._loading

    def _used_locked(self) -> int:
        return sum(e.size_bytes for e in self._entries.values()) + sum(e.size_bytes for e in self._retired)

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self._used_locked()

    def snapshot(self) -> TierSnapshot:
        """Occupancy; ``used_bytes`` includes retired (stale, still in use) entries, which are not listed."""
        with self._cond:
            entries = tuple(
                TierEntry(key=k, size_bytes=e.size_bytes, last_used=e.last_used, in_use=e.refs)
                for k, e in sorted(self._entries.items(), key=lambda kv: (-kv[1].last_used, kv[0]))
            )
            return TierSnapshot(
                tier=self.name,
                budget_bytes=self.budget_bytes,
                used_bytes=self._used_locked(),
                reserved_bytes=sum(self._loading.values()),
                entries=entries,
            )

    # -- eviction

    def evict(self, key: str) -> bool:
        """Drop ``key``; False if it was not held. Raises ModelInUse while a job uses it."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.refs:
                raise ModelInUse(
                    f"cannot evict {key!r} from the {self.name} tier: {entry.refs} job(s) are using it; "
                    "retry after they finish"
                )
            del self._entries[key]
        self._evicted([(key, entry)])
        return True

    def _evicted(self, victims: list[tuple[str, _Entry]]) -> None:
        """Called outside the lock with what eviction removed to make room (or ``evict``);
        hands each victim to ``on_evict(key, model)``."""
        for key, entry in victims:
            log.info("evicted %s (%d bytes) from the %s tier", key, entry.size_bytes, self.name)
            if self._on_evict is not None:
                try:
                    self._on_evict(key, entry.model)
                except Exception as err:  # best effort (a demotion, a metric): the disk copy remains
                    log.warning("could not hand evicted %s on (%s); it is dropped from memory", key, err)

    def _went_stale(self, key: str, entry: _Entry) -> None:
        """Called outside the lock with an entry found to be read from a file since replaced.

        It is already unlisted; its memory goes when the last user releases it.
        """
        log.info("dropped %s (%d bytes, %d user(s)) from the %s tier: its file changed",
                 key, entry.size_bytes, entry.refs, self.name)

    def _take_room_locked(self, key: str, need_bytes: int) -> list[tuple[str, _Entry]]:
        used = self._used_locked() + sum(self._loading.values())
        items = [CachedItem(key=k, size_bytes=e.size_bytes, last_used=e.last_used, pinned=e.refs > 0) for k, e in self._entries.items()]
        items += [CachedItem(key=f"{e.key} (previous file)", size_bytes=e.size_bytes, last_used=e.last_used, pinned=True) for e in self._retired]
        try:
            victims = plan_eviction(items, need_bytes=need_bytes, free_bytes=self.budget_bytes - used)
        except InsufficientCache as err:
            raise InsufficientCache(
                needed_bytes=err.needed_bytes,
                free_bytes=err.free_bytes,
                evictable_bytes=err.evictable_bytes,
                pinned_bytes=err.pinned_bytes,
                budget_bytes=self.budget_bytes,
                reserved_bytes=sum(self._loading.values()),
                key=key,
                tier=self.name,
            ) from None
        return [(v, self._entries.pop(v)) for v in victims]

    def _retire_if_stale_locked(self, key: str, identity: FileIdentity | None) -> _Entry | None:
        """Unlist ``key``'s entry if it was read from another file and return it.

        One still in use is retired: counted until its last user releases it.
        """
        entry = self._entries.get(key)
        if entry is None or _matches(entry, identity):
            return None
        del self._entries[key]
        if entry.refs:
            self._retired.append(entry)
        return entry

    # -- admission

    def _get_or_admit(
        self,
        key: str,
        *,
        size_bytes: int | None,
        produce: Callable[[], LoadedModel] | None,
        hold: bool,
        identity: FileIdentity | None = None,
    ) -> _Entry:
        """The entry under ``key`` (read from ``identity``'s file when given), produced
        (once, even under concurrency) if absent.

        With ``hold`` the caller must ``_release(entry)`` later.
        """
        stale: list[_Entry] = []
        try:
            while True:
                with self._cond:
                    dropped = self._retire_if_stale_locked(key, identity)
                    if dropped is not None:
                        stale.append(dropped)
                    entry = self._entries.get(key)
                    if entry is not None:
                        entry.last_used = self._clock()
                        entry.refs += hold
                        return entry
                    if key in self._loading:
                        self._cond.wait_for(lambda: key not in self._loading)
                        continue  # the other load finished (or failed): look again
                    if produce is None:
                        raise NotResident(f"model {key!r} is not in the {self.name} tier; load it first")
                    if size_bytes is None or size_bytes < 0:
                        raise ValueError(f"loading {key!r} into the {self.name} tier needs its size_bytes to reserve room")
                    victims = self._take_room_locked(key, size_bytes)
                    self._loading[key] = size_bytes
                break
        finally:
            for entry in stale:
                self._went_stale(key, entry)
        self._evicted(victims)
        try:
            model = produce()
        except BaseException:
            with self._cond:
                del self._loading[key]
                self._cond.notify_all()
            raise
        with self._cond:
            del self._loading[key]
            if model.size_bytes > size_bytes:
                log.warning("%s: loaded %d bytes but reserved %d; the budget may be exceeded until the next eviction",
                            key, model.size_bytes, size_bytes)
            entry = _Entry(key=key, model=model, size_bytes=model.size_bytes, last_used=self._clock(), refs=int(hold))
            self._entries[key] = entry
            self._cond.notify_all()
        return entry

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.refs -= 1
            entry.last_used = self._clock()
            if entry.refs == 0 and entry in self._retired:
                self._retired.remove(entry)  # its memory goes with the last reference


class VramTier(_Tier):
    """Loaded models on one GPU under a VRAM byte budget, LRU, never evicting one in use.

    ``on_evict(key, model)`` runs (outside the tier's lock) for every model evicted to
    make room or by ``evict``, e.g. to demote it into the RAM tier; ``on_stale(key, model)``
    for every model dropped because its file changed (not worth keeping anywhere; a job
    still using it keeps it until the job ends).
    Device memory returns to torch's allocator once nobody references the tensors any more.
    """

    name = "VRAM"

    def __init__(
        self,
        budget_bytes: int,
        *,
        clock: Clock = time.time,
        on_evict: Callable[[str, LoadedModel], None] | None = None,
        on_stale: Callable[[str, LoadedModel], None] | None = None,
    ) -> None:
        super().__init__(budget_bytes, clock=clock, on_evict=on_evict)
        self._on_stale = on_stale

    @contextmanager
    def acquire(
        self,
        key: str,
        *,
        load: Callable[[], LoadedModel] | None = None,
        size_bytes: int | None = None,
        identity: FileIdentity | None = None,
    ) -> Iterator[LoadedModel]:
        """Use the model under ``key`` for the duration of the ``with`` block.

        When it is not resident (or was read from a file other than ``identity``) and
        ``load`` is given, room for ``size_bytes`` (the header's data size) is made first,
        then ``load()`` runs once even if several callers ask at the same time. Raises
        NotResident without ``load``, and InsufficientCache when models in use leave too
        little room.
        """
        entry = self._get_or_admit(key, size_bytes=size_bytes, produce=load, hold=True, identity=identity)
        try:
            yield entry.model
        finally:
            self._release(entry)

    def put(self, key: str, model: LoadedModel) -> None:
        """Admit a model loaded elsewhere, evicting least recently used ones to fit."""
        self._get_or_admit(key, size_bytes=model.size_bytes, produce=lambda: model, hold=False, identity=model.identity)

    def _went_stale(self, key: str, entry: _Entry) -> None:
        super()._went_stale(key, entry)
        if self._on_stale is not None:
            try:
                self._on_stale(key, entry.model)
            except Exception as err:  # noqa: BLE001 - a callback failure must not fail the load
                log.warning("on_stale callback for %s failed: %s", key, err)


class RamTier(_Tier):
    """Page-locked host copies of models under a RAM byte budget, LRU.

    On a machine without a GPU the copies are ordinary host memory. ``on_evict(key,
    model)`` runs (outside the tier's lock) for every copy evicted.
    """

    name = "RAM"

    def __init__(
        self,
        budget_bytes: int,
        *,
        clock: Clock = time.time,
        on_evict: Callable[[str, LoadedModel], None] | None = None,
    ) -> None:
        super().__init__(budget_bytes, clock=clock, on_evict=on_evict)
        self._streams: dict[int, torch.cuda.Stream] = {}

    def put(self, key: str, model: LoadedModel) -> None:
        """Keep a host copy of ``model`` (adopted as is when it is already a pinned host buffer)."""
        self._get_or_admit(key, size_bytes=model.size_bytes, produce=lambda: _host_copy(model), hold=False, identity=model.identity)

    def put_file(
        self, key: str, path: str | PathLike[str], *, loader: Loader, identity: FileIdentity | None = None
    ) -> None:
        """Read a safetensors file straight into pinned host memory and keep it.

        A copy already held from the same file is kept; one from another file is replaced.
        """
        identity = identity or FileIdentity.of(path)
        size = safetensors_header.read_header(path).data_size_bytes
        self._get_or_admit(
            key, size_bytes=size, produce=lambda: loader.load(path, device="cpu", pin_memory=True), hold=False, identity=identity
        )

    @contextmanager
    def keep(
        self, key: str, path: str | PathLike[str], *, loader: Loader, identity: FileIdentity | None = None
    ) -> Iterator[None]:
        """Like ``put_file``, and the copy is never evicted until the ``with`` block ends
        (a hot replica held in RAM)."""
        identity = identity or FileIdentity.of(path)
        size = safetensors_header.read_header(path).data_size_bytes
        entry = self._get_or_admit(
            key, size_bytes=size, produce=lambda: loader.load(path, device="cpu", pin_memory=True), hold=True, identity=identity
        )
        try:
            yield
        finally:
            self._release(entry)

    def to_device(self, key: str, device: str | torch.device, *, identity: FileIdentity | None = None) -> LoadedModel:
        """The model under ``key`` on ``device``: one async host-to-device copy, then views.

        The host copy stays in the tier. Raises NotResident when it is not held (or was
        read from a file other than ``identity``), DeviceOutOfMemory when the GPU is full.
        """
        target = torch.device(device)
        entry = self._get_or_admit(key, size_bytes=None, produce=None, hold=True, identity=identity)
        host = entry.model
        try:
            t0 = time.perf_counter()
            if target.type == "cpu":
                tensors, cloned = dict(host.tensors), host.cloned
                dest, method, t1 = host.buffer, "ram-view", t0
                keepalive: tuple[object, ...] = (host,)  # the views share the host copy (and its pin)
            else:
                if target.index is None:
                    target = torch.device("cuda", torch.cuda.current_device())
                try:
                    dest = torch.empty(host.size_bytes, dtype=torch.uint8, device=target)
                except torch.OutOfMemoryError as err:
                    raise DeviceOutOfMemory(
                        f"out of memory on {target}: copying {key!r} from the RAM tier needs {host.size_bytes} bytes "
                        f"({err}); lower the VRAM budget or free the GPU"
                    ) from err
                t1 = time.perf_counter()
                stream = self._stream(target)
                stream.wait_stream(torch.cuda.current_stream(target))  # dest's allocation is ordered first
                with torch.cuda.stream(stream):
                    dest.copy_(host.buffer, non_blocking=host.pinned)
                stream.synchronize()
                tensors, cloned = build_views(dest, host.header)
                method, keepalive = "ram-copy", ()
            t2 = time.perf_counter()
        finally:
            self._release(entry)
        return LoadedModel(
            tensors=tensors,
            header=host.header,
            buffer=dest,
            device=target,
            source=LoadSource.RAM,
            method=method,
            timings=LoadTimings(allocate_s=t1 - t0, data_s=t2 - t1, total_s=t2 - t0),
            path=host.path,
            pinned=host.pinned and target.type == "cpu",
            cloned=cloned,
            identity=host.identity,
            _keepalive=keepalive,
        )

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream


def _host_copy(model: LoadedModel) -> LoadedModel:
    """A host copy of ``model``'s buffer in page-locked memory where possible."""
    if model.device.type == "cpu" and (model.pinned or not torch.cuda.is_available()) and model.method != "mmap":
        return model  # already the kind of memory this tier keeps
    t0 = time.perf_counter()
    buf, pin = allocate_host_buffer(model.size_bytes, pinned=True)
    buf.copy_(model.buffer)  # device-to-host copies synchronise here
    tensors, cloned = build_views(buf, model.header)
    return LoadedModel(
        tensors=tensors,
        header=model.header,
        buffer=buf,
        device=torch.device("cpu"),
        source=LoadSource.RAM,
        method="host-copy",
        timings=LoadTimings(data_s=time.perf_counter() - t0, total_s=time.perf_counter() - t0),
        path=model.path,
        pinned=pin is not None,
        cloned=cloned,
        identity=model.identity,
        _keepalive=(pin,) if pin else (),
    )
