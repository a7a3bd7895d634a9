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
from stoker.agent.loader import LoadedModel, Loader, LoadSource, LoadTimings, allocate_host_buffer, build_views

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
    model: LoadedModel
    size_bytes: int
    last_used: float
    refs: int = 0


class _Tier:
    """Budgeted LRU map of key -> LoadedModel with reservations and shared in-flight loads."""

    name = "tier"

    def __init__(self, budget_bytes: int, *, clock: Clock = time.time) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, int] = {}  # key -> reserved bytes of loads in flight

    # -- reporting

    def __contains__(self, key: object) -> bool:
        with self._cond:
            return key in self._entries

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return sum(e.size_bytes for e in self._entries.values())

    def snapshot(self) -> TierSnapshot:
        with self._cond:
            entries = tuple(
                TierEntry(key=k, size_bytes=e.size_bytes, last_used=e.last_used, in_use=e.refs)
                for k, e in sorted(self._entries.items(), key=lambda kv: (-kv[1].last_used, kv[0]))
            )
            return TierSnapshot(
                tier=self.name,
                budget_bytes=self.budget_bytes,
                used_bytes=sum(e.size_bytes for e in entries),
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
        """Called outside the lock with what eviction removed."""
        for key, entry in victims:
            log.info("evicted %s (%d bytes) from the %s tier", key, entry.size_bytes, self.name)

    def _take_room_locked(self, key: str, need_bytes: int) -> list[tuple[str, _Entry]]:
        used = sum(e.size_bytes for e in self._entries.values()) + sum(self._loading.values())
        items = [CachedItem(key=k, size_bytes=e.size_bytes, last_used=e.last_used, pinned=e.refs > 0) for k, e in self._entries.items()]
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

    # -- admission

    def _get_or_admit(self, key: str, *, size_bytes: int | None, produce: Callable[[], LoadedModel] | None, hold: bool) -> LoadedModel:
        """The model under ``key``, produced (once, even under concurrency) if absent.

        With ``hold`` the caller must ``_release(key)`` later.
        """
        while True:
            with self._cond:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.last_used = self._clock()
                    entry.refs += hold
                    return entry.model
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
            self._entries[key] = _Entry(model=model, size_bytes=model.size_bytes, last_used=self._clock(), refs=int(hold))
            self._cond.notify_all()
        return model

    def _release(self, key: str) -> None:
        with self._cond:
            entry = self._entries[key]
            entry.refs -= 1
            entry.last_used = self._clock()


class VramTier(_Tier):
    """Loaded models on one GPU under a VRAM byte budget, LRU, never evicting one in use.

    ``on_evict(key, model)`` runs (outside the tier's lock) for every model evicted, e.g. to
    demote it into the RAM tier. Device memory returns to torch's allocator once nobody
    references the evicted tensors any more.
    """

    name = "VRAM"

    def __init__(self, budget_bytes: int, *, clock: Clock = time.time, on_evict: Callable[[str, LoadedModel], None] | None = None) -> None:
        super().__init__(budget_bytes, clock=clock)
        self._on_evict = on_evict

    @contextmanager
    def acquire(self, key: str, *, load: Callable[[], LoadedModel] | None = None, size_bytes: int | None = None) -> Iterator[LoadedModel]:
        """Use the model under ``key`` for the duration of the ``with`` block.

        When it is not resident and ``load`` is given, room for ``size_bytes`` (the
        header's data size) is made first, then ``load()`` runs once even if several
        callers ask at the same time. Raises NotResident without ``load``, and
        InsufficientCache when models in use leave too little room.
        """
        model = self._get_or_admit(key, size_bytes=size_bytes, produce=load, hold=True)
        try:
            yield model
        finally:
            self._release(key)

    def put(self, key: str, model: LoadedModel) -> None:
        """Admit a model loaded elsewhere, evicting least recently used ones to fit."""
        self._get_or_admit(key, size_bytes=model.size_bytes, produce=lambda: model, hold=False)

    def _evicted(self, victims: list[tuple[str, _Entry]]) -> None:
        super()._evicted(victims)
        if self._on_evict is not None:
            for key, entry in victims:
                try:
                    self._on_evict(key, entry.model)
                except Exception as err:  # demotion is best effort: the disk copy remains
                    log.warning("could not hand evicted %s on (%s); it is dropped from memory", key, err)


class RamTier(_Tier):
    """Page-locked host copies of models under a RAM byte budget, LRU.

    On a machine without a GPU the copies are ordinary host memory.
    """

    name = "RAM"

    def __init__(self, budget_bytes: int, *, clock: Clock = time.time) -> None:
        super().__init__(budget_bytes, clock=clock)
        self._streams: dict[int, torch.cuda.Stream] = {}

    def put(self, key: str, model: LoadedModel) -> None:
        """Keep a host copy of ``model`` (adopted as is when it is already a pinned host buffer)."""
        self._get_or_admit(key, size_bytes=model.size_bytes, produce=lambda: _host_copy(model), hold=False)

    def put_file(self, key: str, path: str | PathLike[str], *, loader: Loader) -> None:
        """Read a safetensors file straight into pinned host memory and keep it."""
        size = safetensors_header.read_header(path).data_size_bytes
        self._get_or_admit(key, size_bytes=size, produce=lambda: loader.load(path, device="cpu", pin_memory=True), hold=False)

    def to_device(self, key: str, device: str | torch.device) -> LoadedModel:
        """The model under ``key`` on ``device``: one async host-to-device copy, then views.

        The host copy stays in the tier. Raises NotResident when it is not held.
        """
        target = torch.device(device)
        host = self._get_or_admit(key, size_bytes=None, produce=None, hold=True)
        try:
            t0 = time.perf_counter()
            if target.type == "cpu":
                tensors, cloned = dict(host.tensors), host.cloned
                dest, method, t1 = host.buffer, "ram-view", t0
            else:
                if target.index is None:
                    target = torch.device("cuda", torch.cuda.current_device())
                dest = torch.empty(host.size_bytes, dtype=torch.uint8, device=target)
                t1 = time.perf_counter()
                stream = self._stream(target)
                stream.wait_stream(torch.cuda.current_stream(target))  # dest's allocation is ordered first
                with torch.cuda.stream(stream):
                    dest.copy_(host.buffer, non_blocking=host.pinned)
                stream.synchronize()
                tensors, cloned = build_views(dest, host.header)
                method = "ram-copy"
            t2 = time.perf_counter()
        finally:
            self._release(key)
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
        _keepalive=(pin,) if pin else (),
    )
