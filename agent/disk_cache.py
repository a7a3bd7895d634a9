"""Disk cache accounting and eviction choice: pure code, no I/O, no clock.

The byte budget covers committed files plus reservations for downloads in flight,
so the budget holds even while several downloads run at once. Models in use by a
job (pins), models held by operator orders (holds) and baked-in models
(preloaded: read-only, free of budget) are never evicted. Eviction is least
recently used first, and happens only when it actually makes enough room.

`plan_eviction` is the shared policy; the RAM/VRAM tiers and the fleet simulator
call it with their own items. `DiskCacheState` is an immutable value: every
operation returns a new state, and `now` is always an argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "CacheEntry",
    "CacheSnapshot",
    "CachedItem",
    "DiskCacheError",
    "DiskCacheState",
    "InsufficientCache",
    "KeyConflict",
    "NotCached",
    "Reservation",
    "plan_eviction",
]


class DiskCacheError(Exception):
    """Root of the cache accounting errors."""


class InsufficientCache(DiskCacheError):
    """Even evicting every evictable item would not make room for the request."""

    def __init__(
        self,
        *,
        needed_bytes: int,
        free_bytes: int,
        evictable_bytes: int,
        pinned_bytes: int,
        budget_bytes: int | None = None,
        reserved_bytes: int | None = None,
        key: str | None = None,
        tier: str = "cache",
    ) -> None:
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.evictable_bytes = evictable_bytes
        self.pinned_bytes = pinned_bytes
        self.budget_bytes = budget_bytes
        self.reserved_bytes = reserved_bytes
        self.key = key
        self.tier = tier
        what = f"model {key!r}" if key else "the request"
        budget = f", budget {_fmt(budget_bytes)}" if budget_bytes is not None else ""
        reserved = f", reserved by downloads {_fmt(reserved_bytes)}" if reserved_bytes else ""
        super().__init__(
            f"not enough {tier} space for {what}: needs {_fmt(needed_bytes)}, "
            f"free {_fmt(free_bytes)}, evictable {_fmt(evictable_bytes)}, "
            f"pinned (in use or held) {_fmt(pinned_bytes)}{reserved}{budget}; "
            f"raise the {tier} budget, release held models, or wait for running jobs "
            f"and downloads to finish"
        )

    reason = "InsufficientCache"


class KeyConflict(DiskCacheError):
    """The key is already cached or already has a download reservation."""

    reason = "KeyConflict"


class NotCached(DiskCacheError):
    """The operation needs a cached entry or a reservation that does not exist."""

    reason = "NotCached"


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


@dataclass(frozen=True)
class CachedItem:
    """What eviction needs to know about one cached item."""

    key: str
    size_bytes: int
    last_used: float
    pinned: bool


def plan_eviction(items: Iterable[CachedItem], *, need_bytes: int, free_bytes: int) -> tuple[str, ...]:
    """Keys to evict, least recently used first, so that `need_bytes` fit.

    Returns () when `free_bytes >= need_bytes`. Stops at the first prefix of the
    LRU order that makes room, so nothing is evicted without need. Raises
    `InsufficientCache` (and plans nothing) when evicting every unpinned item
    would still not make room. Ties in `last_used` break by key, so the plan is
    deterministic.
    """
    if need_bytes < 0:
        raise ValueError(f"need_bytes must be >= 0, got {need_bytes}")
    if free_bytes >= need_bytes:
        return ()
    materialized = list(items)
    candidates = sorted((i for i in materialized if not i.pinned), key=lambda i: (i.last_used, i.key))
    victims: list[str] = []
    freed = free_bytes
    for item in candidates:
        if freed >= need_bytes:
            break
        victims.append(item.key)
        freed += item.size_bytes
    if freed < need_bytes:
        raise InsufficientCache(
            needed_bytes=need_bytes,
            free_bytes=free_bytes,
            evictable_bytes=sum(i.size_bytes for i in candidates),
            pinned_bytes=sum(i.size_bytes for i in materialized if i.pinned),
        )
    return tuple(victims)


@dataclass(frozen=True)
class CacheEntry:
    """One committed file in the cache (or a baked-in preloaded one)."""

    key: str
    size_bytes: int
    last_used: float
    preloaded: bool = False


@dataclass(frozen=True)
class Reservation:
    """Budget set aside for a download before its first byte is written."""

    key: str
    size_bytes: int
    created_at: float


@dataclass(frozen=True)
class EntryView:
    """One cached model as reported: the entry plus its pin and hold state."""

    key: str
    size_bytes: int
    last_used: float
    preloaded: bool
    held: bool
    in_use: int

    @property
    def pinned(self) -> bool:
        return self.preloaded or self.held or self.in_use > 0


@dataclass(frozen=True)
class CacheSnapshot:
    """Everything the status report needs about the accounting, in one value."""

    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    free_bytes: int
    pinned_bytes: int
    preloaded_bytes: int
    entries: tuple[EntryView, ...]
    reservations: tuple[Reservation, ...]
    held_keys: tuple[str, ...]


def _frozen(mapping: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class DiskCacheState:
    """Immutable accounting of a byte-budgeted LRU cache.

    Invariant: `used_bytes + reserved_bytes <= budget_bytes`. Preloaded entries
    cost no budget. Holds and pins may name keys that are not cached yet (an
    order to hold a model arrives before its download), and apply as soon as
    the entry exists.
    """

    budget_bytes: int
    entries: Mapping[str, CacheEntry] = field(default_factory=lambda: MappingProxyType({}))
    reservations: Mapping[str, Reservation] = field(default_factory=lambda: MappingProxyType({}))
    pins: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    held: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {self.budget_bytes}")

    # ---- derived figures -------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries.values() if not e.preloaded)

    @property
    def reserved_bytes(self) -> int:
        return sum(r.size_bytes for r in self.reservations.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes - self.reserved_bytes

    def is_pinned(self, key: str) -> bool:
        entry = self.entries.get(key)
        return (entry is not None and entry.preloaded) or key in self.held or self.pins.get(key, 0) > 0

    def items(self) -> tuple[CachedItem, ...]:
        """Budgeted entries as `plan_eviction` input (preloaded ones cost nothing to keep)."""
        return tuple(
            CachedItem(key=e.key, size_bytes=e.size_bytes, last_used=e.last_used, pinned=self.is_pinned(e.key))
            for e in self.entries.values()
            if not e.preloaded
        )

    def has(self, key: str) -> bool:
        return key in self.entries

    # ---- operations ------------------------------------------------------

    def _replace(self, **changes: object) -> DiskCacheState:
        for name in ("entries", "reservations", "pins"):
            if name in changes:
                changes[name] = _frozen(changes[name])  # type: ignore[arg-type]
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def _make_room(self, *, key: str, need_bytes: int, free_bytes: int) -> tuple[str, ...]:
        try:
            return plan_eviction(self.items(), need_bytes=need_bytes, free_bytes=free_bytes)
        except InsufficientCache as exc:
            raise InsufficientCache(
                needed_bytes=exc.needed_bytes,
                free_bytes=exc.free_bytes,
                evictable_bytes=exc.evictable_bytes,
                pinned_bytes=exc.pinned_bytes,
                budget_bytes=self.budget_bytes,
                reserved_bytes=self.reserved_bytes,
                key=key,
                tier="disk cache",
            ) from None

    def add_preloaded(self, key: str, size_bytes: int, *, now: float) -> DiskCacheState:
        """Register a baked-in model: held, free of budget, never evicted."""
        _check_size(size_bytes)
        if key in self.entries or key in self.reservations:
            raise KeyConflict(f"cannot register preloaded model {key!r}: the key is already cached or downloading")
        entries = dict(self.entries)
        entries[key] = CacheEntry(key=key, size_bytes=size_bytes, last_used=now, preloaded=True)
        return self._replace(entries=entries)

    def reserve(self, key: str, size_bytes: int, *, now: float) -> tuple[DiskCacheState, Reservation, tuple[str, ...]]:
        """Set budget aside for downloading `key`, evicting LRU entries if needed.

        Returns the new state, the reservation and the evicted keys (the caller
        deletes their files). Raises `InsufficientCache` with nothing changed.
        """
        _check_size(size_bytes)
        if key in self.entries or key in self.reservations:
            raise KeyConflict(f"cannot reserve space for {key!r}: it is already cached or downloading")
        victims = self._make_room(key=key, need_bytes=size_bytes, free_bytes=self.free_bytes)
        entries = {k: v for k, v in self.entries.items() if k not in victims}
        reservations = dict(self.reservations)
        reservation = Reservation(key=key, size_bytes=size_bytes, created_at=now)
        reservations[key] = reservation
        return self._replace(entries=entries, reservations=reservations), reservation, victims

    def resize_reservation(self, key: str, size_bytes: int, *, now: float) -> tuple[DiskCacheState, tuple[str, ...]]:
        """Change a reservation's size (the server's size differs from the hint)."""
        _check_size(size_bytes)
        current = self._reservation(key)
        growth = size_bytes - current.size_bytes
        victims = self._make_room(key=key, need_bytes=max(growth, 0), free_bytes=self.free_bytes) if growth > 0 else ()
        entries = {k: v for k, v in self.entries.items() if k not in victims}
        reservations = dict(self.reservations)
        reservations[key] = dataclasses.replace(current, size_bytes=size_bytes)
        return self._replace(entries=entries, reservations=reservations), victims

    def commit(self, key: str, *, now: float, size_bytes: int | None = None) -> DiskCacheState:
        """Turn a finished download's reservation into a cached entry.

        `size_bytes` is the final file size; it may not exceed the reservation
        (grow it first with `resize_reservation`).
        """
        reservation = self._reservation(key)
        final = reservation.size_bytes if size_bytes is None else size_bytes
        _check_size(final)
        if final > reservation.size_bytes:
            raise ValueError(
                f"cannot commit {key!r}: file is {final} bytes but only {reservation.size_bytes} were reserved; "
                f"call resize_reservation first"
            )
        reservations = {k: v for k, v in self.reservations.items() if k != key}
        entries = dict(self.entries)
        entries[key] = CacheEntry(key=key, size_bytes=final, last_used=now)
        return self._replace(entries=entries, reservations=reservations)

    def abort(self, key: str) -> DiskCacheState:
        """Drop a reservation (the download failed or was cancelled)."""
        self._reservation(key)
        return self._replace(reservations={k: v for k, v in self.reservations.items() if k != key})

    def touch(self, key: str, *, now: float) -> DiskCacheState:
        """Record a use of `key` (moves it to the most recently used end)."""
        entry = self._entry(key)
        entries = dict(self.entries)
        entries[key] = dataclasses.replace(entry, last_used=max(entry.last_used, now))
        return self._replace(entries=entries)

    def pin(self, key: str, *, now: float) -> DiskCacheState:
        """A job starts using `key`: never evict it until the matching `unpin`."""
        pins = dict(self.pins)
        pins[key] = pins.get(key, 0) + 1
        state = self._replace(pins=pins)
        return state.touch(key, now=now) if key in self.entries else state

    def unpin(self, key: str, *, now: float) -> DiskCacheState:
        """A job stopped using `key`; counts as a use."""
        count = self.pins.get(key, 0)
        if count <= 0:
            raise NotCached(f"cannot unpin {key!r}: it is not pinned")
        pins = dict(self.pins)
        if count == 1:
            del pins[key]
        else:
            pins[key] = count - 1
        state = self._replace(pins=pins)
        return state.touch(key, now=now) if key in self.entries else state

    def hold(self, key: str) -> DiskCacheState:
        """Operator order: keep `key` (cached now or later) and never evict it."""
        return self._replace(held=self.held | {key})

    def release(self, key: str) -> DiskCacheState:
        """Operator order: `key` may be evicted again (no-op when not held)."""
        return self._replace(held=self.held - {key})

    def remove(self, key: str, *, force: bool = False) -> DiskCacheState:
        """Forget an entry (its file is gone or failed verification).

        Refuses a pinned entry unless `force`: a file that is known bad is
        dropped even when held, because keeping it helps nobody.
        """
        self._entry(key)
        if self.is_pinned(key) and not force:
            raise DiskCacheError(f"cannot remove {key!r}: it is in use, held or preloaded")
        return self._replace(entries={k: v for k, v in self.entries.items() if k != key})

    def with_budget(self, budget_bytes: int) -> tuple[DiskCacheState, tuple[str, ...]]:
        """Change the budget, evicting LRU entries to fit under a smaller one."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        shrunk = dataclasses.replace(self, budget_bytes=budget_bytes)
        victims = shrunk._make_room(key="(budget change)", need_bytes=0, free_bytes=shrunk.free_bytes)
        entries = {k: v for k, v in self.entries.items() if k not in victims}
        return shrunk._replace(entries=entries), victims

    def snapshot(self) -> CacheSnapshot:
        views = tuple(
            EntryView(
                key=e.key,
                size_bytes=e.size_bytes,
                last_used=e.last_used,
                preloaded=e.preloaded,
                held=e.preloaded or e.key in self.held,
                in_use=self.pins.get(e.key, 0),
            )
            for e in sorted(self.entries.values(), key=lambda e: (-e.last_used, e.key))
        )
        return CacheSnapshot(
            budget_bytes=self.budget_bytes,
            used_bytes=self.used_bytes,
            reserved_bytes=self.reserved_bytes,
            free_bytes=self.free_bytes,
            pinned_bytes=sum(v.size_bytes for v in views if v.pinned and not v.preloaded),
            preloaded_bytes=sum(v.size_bytes for v in views if v.preloaded),
            entries=views,
            reservations=tuple(sorted(self.reservations.values(), key=lambda r: r.key)),
            held_keys=tuple(sorted(self.held)),
        )

    # ---- lookups ---------------------------------------------------------

    def _entry(self, key: str) -> CacheEntry:
        try:
            return self.entries[key]
        except KeyError:
            raise NotCached(f"{key!r} is not in the disk cache") from None

    def _reservation(self, key: str) -> Reservation:
        try:
            return self.reservations[key]
        except KeyError:
            raise NotCached(f"{key!r} has no download reservation") from None


def _check_size(size_bytes: int) -> None:
    if size_bytes < 0:
        raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
