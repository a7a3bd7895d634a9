"""Disk cache accounting and eviction choice: pure code, no I/O, no clock.

The byte budget covers committed files plus reservations for downloads in flight,
so the budget holds even while several downloads run at once. Models in use by a
job (pins), models held by operator orders (holds) and baked-in models
(preloaded: read-only, free of budget) are never evicted. Eviction happens only
when it actually makes enough room.

The disk tier evicts by frequency with exponential decay (LRFU): an entry's rank is
the use-frequency rank of `stoker.userank` over the jobs that used it (seconds on the
caller's clock; the agent's is Unix time), `h * log2(sum of 2 ** (t / h))` over the use
times `t`, `h` being `half_life_s`. Used once, an entry ranks by that use, as in LRU;
every further use moves it later, by `h` for a second use at the same time and by less
for older ones, so `n` recent uses count like one use `h * log2(n)` later.
The lowest rank goes first. A model fetched for one job (the long tail of a Zipf
catalog) so goes before a model in steady use instead of pushing it out as LRU
does, while a model that stopped being used still ages out: its uses lose half
their weight every `h`. Ranking by use count regardless of size is what minimises
bytes downloaded (GDSF with a cost proportional to size). Evicted keys keep their
rank (a bounded history of the most valuable ones), so a model that comes back is
not treated as new; a download can also start from the operator's rank of the model
over the whole fleet (`commit(rank_hint_s=)`). The rank needs no clock: decay is
relative, so comparing ranks compares decayed counts at any time. `half_life_s=None`
gives plain LRU. In the fleet simulation this cuts re-downloads after eviction against
LRU and LRU-2 (see BENCHMARKS.md), which is why the disk tier deviates from plain LRU.

`plan_eviction` is the shared policy; the RAM/VRAM tiers and the fleet simulator
call it with their own items. `DiskCacheState` is an immutable value: every
operation returns a new state, and `now` is always an argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stoker.userank import DEFAULT_HALF_LIFE_S, add_use

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
    "eviction_rank",
    "plan_eviction",
]

EVICTION_HISTORY = 4096
"""Evicted keys whose rank is remembered (the highest ranks are kept)."""


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
    rank_s: float | None = None
    """Frequency rank (module docstring); None ranks by `last_used` alone (plain LRU)."""
    discount_s: float = 0.0
    """Seconds taken off the rank: a copy another agent also holds goes earlier (see
    `DiskCacheState.with_duplicates`)."""


def eviction_rank(item: CachedItem) -> tuple[float, float, str]:
    """Sort key of eviction, first evicted first: the frequency rank, never below the last
    use (a lookup makes an entry at least as safe as one use then), less the item's
    discount, then the last use."""
    rank = item.last_used if item.rank_s is None else max(item.rank_s, item.last_used)
    return (rank - item.discount_s, item.last_used, item.key)


def plan_eviction(items: Iterable[CachedItem], *, need_bytes: int, free_bytes: int) -> tuple[str, ...]:
    """Keys to evict, lowest `eviction_rank` first, so that `need_bytes` fit.

    Items without a frequency rank go least recently used first. Returns () when
    `free_bytes >= need_bytes`. Stops at the first prefix of that order that makes
    room, so nothing is evicted without need. Raises `InsufficientCache` (and plans
    nothing) when evicting every unpinned item would still not make room. Ties break
    by key, so the plan is deterministic.
    """
    if need_bytes < 0:
        raise ValueError(f"need_bytes must be >= 0, got {need_bytes}")
    if free_bytes >= need_bytes:
        return ()
    materialized = list(items)
    candidates = sorted((i for i in materialized if not i.pinned), key=eviction_rank)
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
    previous_use: float | None = None
    """Time of the use before the latest one; None when used once (or never)."""
    used: bool = False
    """A job has used it (a prefetched file has not yet)."""
    rank_s: float | None = None
    """Frequency rank of its uses (module docstring); None before the first use."""

    def with_use(self, now: float, *, half_life_s: float | None = DEFAULT_HALF_LIFE_S) -> CacheEntry:
        rank = add_use(self.rank_s, now, half_life_s=half_life_s) if half_life_s is not None else None
        if not self.used:
            return dataclasses.replace(self, used=True, last_used=max(self.last_used, now), rank_s=rank)
        return dataclasses.replace(self, previous_use=self.last_used, last_used=max(self.last_used, now), rank_s=rank)


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
    rank_s: float | None = None
    """Frequency rank (module docstring); what an agent saves to restore it after a restart."""
    eviction_rank_s: float | None = None
    """Where eviction puts it (`eviction_rank`, lowest first): what an agent reports and
    placement reads; None for a preloaded entry, which is never evicted."""

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
    """Immutable accounting of a byte-budgeted cache with frequency-ranked eviction.

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
    half_life_s: float | None = DEFAULT_HALF_LIFE_S
    """Decay of the frequency rank (module docstring); None for plain LRU."""
    evicted: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Rank of evicted keys (their last use under plain LRU): the `EVICTION_HISTORY`
    highest are kept, and up to a quarter more between trims."""
    duplicates: frozenset[str] = frozenset()
    """Keys that other agents of the fleet also hold, which a peer can give back (see
    `with_duplicates`)."""
    duplicate_discount_s: float = 0.0
    """How much earlier a duplicate goes than its rank says (0: no difference)."""

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {self.budget_bytes}")
        if self.half_life_s is not None and not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0 or None (plain LRU), got {self.half_life_s}")

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
            CachedItem(key=e.key, size_bytes=e.size_bytes, last_used=e.last_used, pinned=self.is_pinned(e.key),
                       rank_s=e.rank_s if self.half_life_s is not None else None,
                       discount_s=self.duplicate_discount_s if e.key in self.duplicates else 0.0)
            for e in self.entries.values()
            if not e.preloaded
        )

    def has(self, key: str) -> bool:
        return key in self.entries

    # ---- operations ------------------------------------------------------

    def _replace(self, **changes: object) -> DiskCacheState:
        for name in ("entries", "reservations", "pins", "evicted"):
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

    def _without(self, victims: tuple[str, ...]) -> dict[str, object]:
        """`entries` minus the victims, and the history that remembers their rank."""
        if not victims:
            return {"entries": self.entries}
        history = dict(self.evicted)
        for key in victims:
            entry = self.entries[key]
            history[key] = entry.last_used if entry.rank_s is None or self.half_life_s is None else entry.rank_s
        if len(history) > EVICTION_HISTORY + EVICTION_HISTORY // 4:
            # Trimmed in batches so that an eviction does not sort the history every time.
            history = dict(sorted(history.items(), key=lambda kv: (kv[1], kv[0]))[-EVICTION_HISTORY:])
        return {"entries": {k: v for k, v in self.entries.items() if k not in victims}, "evicted": history}

    def add_preloaded(self, key: str, size_bytes: int, *, now: float) -> DiskCacheState:
        """Register a baked-in model: held, free of budget, never evicted."""
        _check_size(size_bytes)
        if key in self.entries or key in self.reservations:
            raise KeyConflict(f"cannot register preloaded model {key!r}: the key is already cached or downloading")
        entries = dict(self.entries)
        entries[key] = CacheEntry(key=key, size_bytes=size_bytes, last_used=now, preloaded=True)
        return self._replace(entries=entries)

    def reserve(self, key: str, size_bytes: int, *, now: float) -> tuple[DiskCacheState, Reservation, tuple[str, ...]]:
        """Set budget aside for downloading `key`, evicting entries if needed.

        Returns the new state, the reservation and the evicted keys (the caller
        deletes their files). Raises `InsufficientCache` with nothing changed.
        """
        _check_size(size_bytes)
        if key in self.entries or key in self.reservations:
            raise KeyConflict(f"cannot reserve space for {key!r}: it is already cached or downloading")
        victims = self._make_room(key=key, need_bytes=size_bytes, free_bytes=self.free_bytes)
        reservations = dict(self.reservations)
        reservation = Reservation(key=key, size_bytes=size_bytes, created_at=now)
        reservations[key] = reservation
        return self._replace(reservations=reservations, **self._without(victims)), reservation, victims

    def check_fits(self, key: str, size_bytes: int) -> None:
        """Raise `InsufficientCache` when `key` could not reach `size_bytes` even by evicting every
        evictable entry; changes nothing (a size a server only claims must not evict anything)."""
        _check_size(size_bytes)
        current = self.reservations.get(key)
        growth = size_bytes - (current.size_bytes if current is not None else 0)
        if growth > 0:
            self._make_room(key=key, need_bytes=growth, free_bytes=self.free_bytes)

    def resize_reservation(self, key: str, size_bytes: int, *, now: float) -> tuple[DiskCacheState, tuple[str, ...]]:
        """Change a reservation's size (the server's size differs from the hint)."""
        _check_size(size_bytes)
        current = self._reservation(key)
        growth = size_bytes - current.size_bytes
        victims = self._make_room(key=key, need_bytes=max(growth, 0), free_bytes=self.free_bytes) if growth > 0 else ()
        reservations = dict(self.reservations)
        reservations[key] = dataclasses.replace(current, size_bytes=size_bytes)
        return self._replace(reservations=reservations, **self._without(victims)), victims

    def commit(
        self, key: str, *, now: float, size_bytes: int | None = None, rank_hint_s: float | None = None
    ) -> DiskCacheState:
        """Turn a finished download's reservation into a cached entry.

        `size_bytes` is the final file size; it may not exceed the reservation
        (grow it first with `resize_reservation`). `rank_hint_s` is the key's rank
        over the whole fleet (every job that used it anywhere, counted as this module
        counts uses, with the same half-life), when the operator publishes one: a model
        new to this agent but in steady use elsewhere then ranks by that use instead of
        as a one-off, which matters most after an interruption moved it here.
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
        # A key seen before it was evicted comes back with its rank; a job already
        # waiting on the download makes this a use.
        rank = self.evicted.get(key) if self.half_life_s is not None else None
        waiting = self.pins.get(key, 0) > 0
        if waiting and self.half_life_s is not None:
            rank = add_use(rank, now, half_life_s=self.half_life_s)
        if rank_hint_s is not None and self.half_life_s is not None:
            rank = rank_hint_s if rank is None else max(rank, rank_hint_s)
        entries[key] = CacheEntry(key=key, size_bytes=final, last_used=now, used=waiting or rank is not None, rank_s=rank)
        evicted = {k: v for k, v in self.evicted.items() if k != key}
        return self._replace(entries=entries, reservations=reservations, evicted=evicted)

    def with_history(
        self, key: str, *, previous_use: float | None, used: bool, rank_s: float | None = None
    ) -> DiskCacheState:
        """Restore an entry's use history (read back from the agent's index after a restart).

        `rank_s` is the entry's frequency rank as it was saved; an index that has none
        (older agents saved only the last two uses) gets the rank of those two uses.
        """
        entry = self._entry(key)
        if previous_use is not None:
            previous_use = min(previous_use, entry.last_used)
        if rank_s is None and (used or previous_use is not None) and self.half_life_s is not None:
            rank_s = add_use(previous_use, entry.last_used, half_life_s=self.half_life_s)
        entries = dict(self.entries)
        entries[key] = dataclasses.replace(
            entry, previous_use=previous_use, used=used or previous_use is not None or rank_s is not None, rank_s=rank_s
        )
        return self._replace(entries=entries)

    def with_evicted_ranks(self, ranks: Mapping[str, float]) -> DiskCacheState:
        """Restore the ranks of evicted keys (`evicted`, saved by the agent) after a restart;
        keys cached now are skipped and only the `EVICTION_HISTORY` highest are kept."""
        history = {**{k: float(v) for k, v in ranks.items() if k not in self.entries}, **self.evicted}
        if len(history) > EVICTION_HISTORY:
            history = dict(sorted(history.items(), key=lambda kv: (kv[1], kv[0]))[-EVICTION_HISTORY:])
        return self._replace(evicted=history)

    def abort(self, key: str) -> DiskCacheState:
        """Drop a reservation (the download failed or was cancelled)."""
        self._reservation(key)
        return self._replace(reservations={k: v for k, v in self.reservations.items() if k != key})

    def touch(self, key: str, *, now: float) -> DiskCacheState:
        """Refresh `key`'s last use (a lookup, or the end of a job's use), not a new use."""
        entry = self._entry(key)
        entries = dict(self.entries)
        entries[key] = dataclasses.replace(entry, last_used=max(entry.last_used, now))
        return self._replace(entries=entries)

    def pin(self, key: str, *, now: float) -> DiskCacheState:
        """A job starts using `key`: never evict it until the matching `unpin`."""
        pins = dict(self.pins)
        pins[key] = pins.get(key, 0) + 1
        if key not in self.entries:
            return self._replace(pins=pins)
        entries = dict(self.entries)
        entries[key] = entries[key].with_use(now, half_life_s=self.half_life_s)  # each job counts once, here
        return self._replace(pins=pins, entries=entries)

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

    def with_duplicates(self, keys: frozenset[str], *, discount_s: float) -> DiskCacheState:
        """Which of the keys other agents also hold (they can be fetched back from a peer, not
        only from the source): eviction takes `discount_s` off their rank, so with a discount of
        several half-lives a duplicate goes before any copy that is the fleet's last."""
        if discount_s < 0:
            raise ValueError(f"discount_s must be >= 0, got {discount_s}")
        return dataclasses.replace(self, duplicates=frozenset(keys), duplicate_discount_s=discount_s)

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
        """Change the budget, evicting entries to fit under a smaller one."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        shrunk = dataclasses.replace(self, budget_bytes=budget_bytes)
        victims = shrunk._make_room(key="(budget change)", need_bytes=0, free_bytes=shrunk.free_bytes)
        return shrunk._replace(**shrunk._without(victims)), victims

    def snapshot(self) -> CacheSnapshot:
        order = {i.key: eviction_rank(i)[0] for i in self.items()}
        views = tuple(
            EntryView(
                key=e.key,
                size_bytes=e.size_bytes,
                last_used=e.last_used,
                preloaded=e.preloaded,
                held=e.preloaded or e.key in self.held,
                in_use=self.pins.get(e.key, 0),
                rank_s=e.rank_s,
                eviction_rank_s=order.get(e.key),
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
