"""Warm replicas: how many copies of each model to keep, and on which agents (pure, no I/O).

For every ModelCache the plan keeps at least `replicas` Ready agents holding it on
disk and `hot_replicas` of them holding it loaded. Which agents (`_addition_key`):

1. Copies that already exist count first: an agent that has the model on disk (baked
   in, or cached by LRU) on a node without a copy yet is taken before any download,
   whatever its zone, because moving bytes is what costs most.
2. The first min(`replicas`, zones) copies are spread across zones, then every base
   copy across nodes (one node or zone interruption must not take them all).
3. Copies beyond `replicas` (added by autoscale for throughput) go where they are
   cheapest: copy on disk > download in progress > fastest download; spread only
   breaks ties.

Copies above target are released (see `_release_order` for which). With autoscale
the target follows demand in jobs per minute per copy, measured with an
exponentially decaying rate (`DemandCounter`), so it rises quickly with a burst and
decays after it.

Budgets: the bytes an agent is ordered to hold (baked-in models excluded, they are
free) never exceed `hold_budget_fraction` of its disk budget, so that held copies
leave room for the LRU cache that serves everything else; hot copies never exceed
`hot_budget_fraction` of its VRAM. This holds for existing holds too: an agent whose
holds exceed its budget (its disk shrank, sizes were learned late) has holds
released first, where other copies exist first, and the planner re-places those
copies on agents with room.

The plan is declarative: for every Ready agent it lists the full set of holds the
agent should have (what CacheAgent spec.holds carries), plus the differences from
what it holds now (prefetch, release, load_hot, unload_hot) for events and metrics.
NotReady agents get no orders and their copies are not counted.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from stoker.operator.placement import AgentView

__all__ = [
    "AgentOrders",
    "Autoscale",
    "DemandCounter",
    "HoldTier",
    "ModelReplicaStatus",
    "ModelTarget",
    "ReplicaError",
    "ReplicaPlan",
    "ReplicaSettings",
    "desired_replicas",
    "plan_demand",
    "plan_replicas",
]

_LN2 = math.log(2.0)


class ReplicaError(ValueError):
    """Root of this module's errors: a model target or setting that cannot be planned."""


class HoldTier(enum.StrEnum):
    """disk: keep it on disk, never evicted; vram: also keep it loaded."""

    DISK = "disk"
    VRAM = "vram"


@dataclass(frozen=True, slots=True)
class Autoscale:
    """Add copies as demand rises: one copy per `target_jobs_per_minute` of demand."""

    max_replicas: int
    target_jobs_per_minute: float = 6.0

    def __post_init__(self) -> None:
        if self.max_replicas < 0:
            raise ReplicaError(f"autoscale max_replicas must be >= 0, got {self.max_replicas}")
        if not self.target_jobs_per_minute > 0:
            raise ReplicaError(f"autoscale target_jobs_per_minute must be > 0, got {self.target_jobs_per_minute}")


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """One ModelCache as the planner sees it."""

    key: str
    size_bytes: int
    replicas: int = 0
    hot_replicas: int = 0
    autoscale: Autoscale | None = None
    demand_per_minute: float = 0.0
    """Current demand (e.g. `DemandCounter.rate_per_minute`); drives autoscale."""
    failed: bool = False
    """The source is bad (ModelCache condition Failed): order no new copies."""

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.hot_replicas < 0:
            raise ReplicaError(f"model {self.key!r}: replicas and hot_replicas must be >= 0")
        if self.size_bytes < 0:
            raise ReplicaError(f"model {self.key!r}: size_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """Knobs of the replica planner."""

    hold_budget_fraction: float = 0.8
    """Share of an agent's disk budget that held copies may use; the rest stays LRU cache."""
    hot_budget_fraction: float = 0.75
    """Share of an agent's VRAM that hot copies may use; the rest serves other jobs."""
    max_new_holds_per_agent: int = 2
    """New downloads ordered per agent per plan, so prefetches trickle in behind jobs."""
    scale_down_hysteresis: float = 0.25
    """A copy added by autoscale is released only when demand drops this far below what
    the remaining copies can serve, so the target does not flap around a boundary."""
    half_life_s: float = 300.0
    """Half-life of the demand rate (used by callers through `DemandCounter`)."""
    default_download_bps: float = 200e6


@dataclass(frozen=True, slots=True)
class DemandCounter:
    """Exponentially decaying count of job arrivals for one model.

    `value` is the decayed number of arrivals as of `at`; the rate it implies is
    value * ln2 / half_life (an unbiased estimate of a steady Poisson rate)."""

    value: float = 0.0
    at: float = 0.0

    def observe(self, *, count: float = 1.0, now: float, half_life_s: float) -> DemandCounter:
        """The counter after `count` arrivals at `now`."""
        return DemandCounter(self.decayed(now=now, half_life_s=half_life_s) + count, max(now, self.at))

    def decayed(self, *, now: float, half_life_s: float) -> float:
        dt = max(0.0, now - self.at)
        return self.value * math.exp(-_LN2 * dt / half_life_s)

    def rate_per_minute(self, *, now: float, half_life_s: float) -> float:
        return self.decayed(now=now, half_life_s=half_life_s) * _LN2 / half_life_s * 60.0


def plan_demand(event_times_s: Iterable[float], *, now: float, half_life_s: float) -> float:
    """Demand in jobs per minute from arrival times, weighting each by its age (same
    estimate as feeding the times into a `DemandCounter`). Future times count as now."""
    if not half_life_s > 0:
        raise ReplicaError(f"half_life_s must be > 0, got {half_life_s}")
    k = _LN2 / half_life_s
    return sum(math.exp(-k * max(0.0, now - t)) for t in event_times_s) * k * 60.0


def desired_replicas(model: ModelTarget, *, current: int, settings: ReplicaSettings = ReplicaSettings()) -> int:
    """Disk copies wanted for `model`: `replicas`, raised by autoscale up to `max_replicas`.

    `current` is the number of copies held now; with autoscale it is kept while the
    demand still needs more than `current - 1` copies after hysteresis."""
    floor = max(model.replicas, model.hot_replicas)
    scale = model.autoscale
    if scale is None:
        return floor
    per_copy = scale.target_jobs_per_minute
    up = math.ceil(model.demand_per_minute / per_copy - 1e-9)
    keep = math.ceil(model.demand_per_minute / (per_copy * (1.0 - settings.scale_down_hysteresis)) - 1e-9)
    wanted = max(up, min(current, keep))
    return max(floor, min(wanted, max(scale.max_replicas, floor)))


@dataclass(frozen=True, slots=True)
class AgentOrders:
    """The holds one Ready agent should have, and how they differ from its current ones."""

    agent: str
    holds: tuple[tuple[str, HoldTier], ...]
    """Full declarative list (model key, tier), sorted by key: CacheAgent spec.holds."""
    prefetch: tuple[str, ...] = ()
    """Newly held models the agent does not have on disk yet (it downloads them)."""
    hold: tuple[str, ...] = ()
    """Newly held models it already has on disk (no transfer)."""
    release: tuple[str, ...] = ()
    """Models no longer held: the agent may evict them (LRU), it need not delete them."""
    load_hot: tuple[str, ...] = ()
    unload_hot: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.prefetch or self.hold or self.release or self.load_hot or self.unload_hot)


@dataclass(frozen=True, slots=True)
class ModelReplicaStatus:
    """Per-model summary for ModelCache status (Ready agents only)."""

    key: str
    desired: int
    desired_hot: int
    on_disk: int
    in_ram: int
    in_vram: int
    held: int
    """Agents ordered to hold it (after this plan)."""
    agents: tuple[str, ...]
    """Agents with a copy on disk, sorted."""
    shortfall: int
    """Held copies not yet on disk plus copies no agent could take (budget, spread)."""
    hot_shortfall: int
    demand_per_minute: float

    @property
    def ready(self) -> bool:
        """The target is met: enough held copies are on disk and loaded."""
        return self.shortfall == 0 and self.hot_shortfall == 0

    @property
    def available(self) -> bool:
        return self.on_disk > 0


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    orders: tuple[AgentOrders, ...]
    models: tuple[ModelReplicaStatus, ...]
    unplaced: tuple[tuple[str, str], ...] = field(default=())
    """(model key, why) for copies no agent could take."""

    def orders_for(self, agent: str) -> AgentOrders | None:
        return next((o for o in self.orders if o.agent == agent), None)

    def status_for(self, key: str) -> ModelReplicaStatus | None:
        return next((m for m in self.models if m.key == key), None)


class _Agent:
    """Virtual holding state of one Ready agent while the plan is built."""

    __slots__ = ("view", "name", "disk", "preloaded", "holds", "hot", "budget", "held_bytes",
                 "vram_budget", "hot_bytes", "new_downloads", "dl")

    def __init__(self, view: AgentView, sizes: dict[str, int], settings: ReplicaSettings) -> None:
        self.view = view
        self.name = view.name
        self.disk = view.disk | view.preloaded
        self.preloaded = view.preloaded
        # Holds of models nobody asks for any more are dropped here (released below).
        self.holds: set[str] = {k for k in view.held | view.held_hot if k in sizes}
        self.hot: set[str] = {k for k in view.held_hot if k in sizes}
        cap = view.disk_capacity_bytes
        self.budget = math.inf if cap is None else cap * settings.hold_budget_fraction
        self.held_bytes = sum(sizes[k] for k in self.holds if k not in self.preloaded)
        vcap = view.vram_capacity_bytes
        self.vram_budget = math.inf if vcap is None else vcap * settings.hot_budget_fraction
        self.hot_bytes = sum(sizes[k] for k in self.hot)
        self.new_downloads = 0
        self.dl = view.download_bps or settings.default_download_bps

    def has_copy(self, key: str) -> bool:
        return key in self.disk


def plan_replicas(
    models: Iterable[ModelTarget],
    agents: Iterable[AgentView],
    *,
    now: float,
    settings: ReplicaSettings = ReplicaSettings(),
) -> ReplicaPlan:
    """Orders that bring every model to its replica targets. `now` is accepted for
    symmetry with the other planners and future time-based rules; the plan itself
    depends only on the observed state."""
    del now
    model_list = sorted(models, key=lambda m: (-m.demand_per_minute, m.key))
    sizes = {m.key: m.size_bytes for m in model_list}
    if len(sizes) != len(model_list):
        raise ReplicaError("plan_replicas got the same model key twice; pass each ModelCache once")
    views = [v for v in agents if v.ready]
    states = {v.name: _Agent(v, sizes, settings) for v in views}
    if len(states) != len(views):
        raise ReplicaError("plan_replicas got the same agent name twice; pass each CacheAgent once")
    ordered = sorted(states.values(), key=lambda a: a.name)
    holders: dict[str, list[_Agent]] = {k: [] for k in sizes}
    for a in ordered:
        for k in a.holds:
            holders[k].append(a)

    targets: dict[str, tuple[int, int]] = {}
    for m in model_list:
        desired = desired_replicas(m, current=len(holders[m.key]), settings=settings)
        hot = min(m.hot_replicas, desired)
        if m.failed:
            desired, hot = min(desired, len(holders[m.key])), min(hot, len(holders[m.key]))
        targets[m.key] = (desired, hot)

    # Releases first, so that the budget they free is available to additions.
    for m in model_list:
        desired, hot = targets[m.key]
        current = holders[m.key]
        hot_now = [a for a in current if m.key in a.hot]
        for a in _release_order(hot_now, m.key, count=len(hot_now) - hot):
            a.hot.discard(m.key)
            a.hot_bytes -= m.size_bytes
        releasable = [a for a in current if m.key not in a.preloaded]
        excess = len(current) - desired
        released = _release_order(releasable, m.key, count=excess)
        for a in released:
            _drop(a, m.key, m.size_bytes)
        if released:
            gone = {a.name for a in released}
            current[:] = [a for a in current if a.name not in gone]

    # Then budgets: existing holds beyond an agent's budget are released (re-placed below).
    for a in ordered:
        _trim_to_budget(a, sizes, holders)

    unplaced: list[tuple[str, str]] = []
    zones_total = len({a.view.zone for a in ordered if not a.view.cordoned})
    for m in model_list:
        desired, hot = targets[m.key]
        current = holders[m.key]
        base = max(m.replicas, m.hot_replicas)
        while len(current) < desired:
            choice = _cheapest_addition(m, ordered, current, settings, base=base, zones_total=zones_total)
            if choice is None:
                unplaced.append((m.key, _why_unplaced(m, ordered, current)))
                break
            choice.holds.add(m.key)
            if m.key not in choice.preloaded:
                choice.held_bytes += m.size_bytes
            if not choice.has_copy(m.key) and m.key not in choice.view.downloading:
                choice.new_downloads += 1
            current.append(choice)
        hot_now = [a for a in current if m.key in a.hot]
        while len(hot_now) < hot:
            pick = _cheapest_hot(m, current, hot_now, zones_total=len({a.view.zone for a in current}))
            if pick is None:
                unplaced.append((m.key, f"no holder of {m.key} has {m.size_bytes / 1e9:.1f} GB of VRAM budget left for a hot copy"))
                break
            pick.hot.add(m.key)
            pick.hot_bytes += m.size_bytes
            hot_now.append(pick)

    orders = tuple(_orders(a) for a in ordered)
    copies: dict[str, list[_Agent]] = {}
    for a in ordered:
        for k in a.disk | a.view.ram | a.view.vram:
            copies.setdefault(k, []).append(a)
    statuses = tuple(
        _status(m, targets[m.key], holders[m.key], copies.get(m.key, [])) for m in sorted(model_list, key=lambda m: m.key)
    )
    return ReplicaPlan(orders, statuses, tuple(unplaced))


def _drop(a: _Agent, key: str, size_bytes: int) -> None:
    a.holds.discard(key)
    if key in a.hot:
        a.hot.discard(key)
        a.hot_bytes -= size_bytes
    if key not in a.preloaded:
        a.held_bytes -= size_bytes


def _release_order(candidates: Sequence[_Agent], key: str, *, count: int) -> list[_Agent]:
    """The `count` copies to release, in order.

    Keep spread: release from the zone, then the node, with the most copies. Then
    prefer copies that are not doing anything (not in use, not loaded, not mid-download:
    releasing those loses nothing now), then the agent with the least free disk (most
    pressure on its LRU cache), then the name for determinism. Releasing only lets the
    agent evict the copy later; it does not delete it.
    """
    if count <= 0:
        return []

    def quiet_first(a: _Agent) -> tuple[bool, bool, bool, int, str]:
        view = a.view
        # Mid-download copies are kept: the bytes are on their way.
        return (key in view.in_use, key in view.vram or key in view.ram, key not in view.disk, view.disk_free_bytes, a.name)

    # Per node, copies in release order (best last, for pop()); per zone, a heap of nodes
    # by (most copies, best head). O(n log n) instead of rescanning all copies per release.
    by_node: dict[tuple[str, str], list[tuple[tuple[bool, bool, bool, int, str], _Agent]]] = {}
    for a in candidates:
        by_node.setdefault((a.view.zone, a.view.node), []).append((quiet_first(a), a))
    zone_count: dict[str, int] = {}
    zone_heap: dict[str, list[tuple[int, tuple[bool, bool, bool, int, str], tuple[str, str]]]] = {}
    for node, copies in by_node.items():
        copies.sort(key=lambda c: c[0], reverse=True)
        zone_count[node[0]] = zone_count.get(node[0], 0) + len(copies)
        zone_heap.setdefault(node[0], []).append((-len(copies), copies[-1][0], node))
    for h in zone_heap.values():
        heapq.heapify(h)
    order: list[_Agent] = []
    while len(order) < count and zone_count:
        zone = min(zone_count, key=lambda z: (-zone_count[z], zone_heap[z][0][:2]))
        neg, _, node = heapq.heappop(zone_heap[zone])
        copies = by_node[node]
        order.append(copies.pop()[1])
        if copies:
            heapq.heappush(zone_heap[zone], (neg + 1, copies[-1][0], node))
        zone_count[zone] -= 1
        if not zone_count[zone]:
            del zone_count[zone]
    return order


def _trim_to_budget(a: _Agent, sizes: dict[str, int], holders: dict[str, list[_Agent]]) -> None:
    """Release holds of `a` until they fit its disk budget, and unload hot copies until they
    fit its VRAM budget. Models with the most other copies go first (losing this copy hurts
    least), then copies not in use, then the largest (fewest releases), then by key."""

    def order(keys: Iterable[str], *, hot: bool) -> list[str]:
        def others(k: str) -> int:
            return sum(1 for h in holders[k] if h is not a and (not hot or k in h.hot))
        return sorted(keys, key=lambda k: (-others(k), k in a.view.in_use, -sizes[k], k))

    if a.hot_bytes > a.vram_budget:
        for k in order(a.hot, hot=True):
            if a.hot_bytes <= a.vram_budget:
                break
            a.hot.discard(k)
            a.hot_bytes -= sizes[k]
    if a.held_bytes > a.budget:
        for k in order((k for k in a.holds if k not in a.preloaded), hot=False):
            if a.held_bytes <= a.budget:
                break
            _drop(a, k, sizes[k])
            holders[k][:] = [h for h in holders[k] if h is not a]


def _cheapest_addition(
    m: ModelTarget, agents: Sequence[_Agent], current: Sequence[_Agent], settings: ReplicaSettings, *,
    base: int, zones_total: int,
) -> _Agent | None:
    """The agent to add the next copy of `m` on, or None when none can take it.

    See the module docstring for the order: existing copies on new nodes, then zone spread
    for the first min(base, zones) copies and node spread for base copies, then cost; copies
    beyond `base` by cost first."""
    zones: dict[str, int] = {}
    nodes: dict[str, int] = {}
    for a in current:
        zones[a.view.zone] = zones.get(a.view.zone, 0) + 1
        nodes[a.view.node] = nodes.get(a.view.node, 0) + 1
    base_copy = len(current) < base
    spread_zones = base_copy and len(zones) < min(base, zones_total)
    holding = {a.name for a in current}
    best: tuple[object, ...] | None = None
    pick: _Agent | None = None
    for a in agents:
        if a.name in holding or a.view.cordoned:
            continue
        have = a.has_copy(m.key)
        downloading = m.key in a.view.downloading
        if not have and not downloading:
            if a.new_downloads >= settings.max_new_holds_per_agent or not a.view.can_download:
                continue
        if m.key not in a.preloaded and a.held_bytes + m.size_bytes > a.budget:
            continue
        if have:
            cost = 0.0
        elif downloading:
            cost = max(0, m.size_bytes - a.view.downloading[m.key]) / a.dl
        else:
            cost = m.size_bytes / a.dl
        budget_left = a.budget - a.held_bytes
        node_n = nodes.get(a.view.node, 0)
        zone_n = zones.get(a.view.zone, 0)
        key: tuple[object, ...]
        if base_copy:
            key = (not (have and node_n == 0), zone_n if spread_zones else 0, node_n, cost, -budget_left, a.name)
        else:
            key = (cost, node_n, zone_n, -budget_left, a.name)
        if best is None or key < best:
            best, pick = key, a
    return pick


def _cheapest_hot(m: ModelTarget, current: Sequence[_Agent], hot_now: Sequence[_Agent], *,
                  zones_total: int) -> _Agent | None:
    """Holder to load `m` on next: one that already has it loaded on a node without a hot copy
    first, then spread across zones (for the first min(hot, zones) copies) and nodes, then
    the fastest tier to load from, then the least VRAM promised."""
    zones: dict[str, int] = {}
    nodes: dict[str, int] = {}
    for a in hot_now:
        zones[a.view.zone] = zones.get(a.view.zone, 0) + 1
        nodes[a.view.node] = nodes.get(a.view.node, 0) + 1
    spread_zones = len(zones) < min(m.hot_replicas, zones_total)
    hot_names = {a.name for a in hot_now}
    best: tuple[object, ...] | None = None
    pick: _Agent | None = None
    for a in current:
        if a.name in hot_names or a.hot_bytes + m.size_bytes > a.vram_budget:
            continue
        tier = 0 if m.key in a.view.vram else 1 if m.key in a.view.ram else 2 if a.has_copy(m.key) else 3
        node_n = nodes.get(a.view.node, 0)
        zone_n = zones.get(a.view.zone, 0)
        key = (not (tier == 0 and node_n == 0), zone_n if spread_zones else 0, node_n, tier, a.hot_bytes, a.name)
        if best is None or key < best:
            best, pick = key, a
    return pick


def _why_unplaced(m: ModelTarget, agents: Sequence[_Agent], current: Sequence[_Agent]) -> str:
    if not agents:
        return f"no Ready agent for {m.key}"
    return (
        f"{len(current)} of the wanted copies of {m.key} placed: no other Ready, uncordoned agent has "
        f"{m.size_bytes / 1e9:.1f} GB of hold budget left (or its download quota for this round is used)"
    )


def _orders(a: _Agent) -> AgentOrders:
    before_hold = frozenset(k for k in a.view.held | a.view.held_hot)
    before_hot = a.view.held_hot
    holds = tuple(sorted((k, HoldTier.VRAM if k in a.hot else HoldTier.DISK) for k in a.holds))
    new = sorted(a.holds - before_hold)
    return AgentOrders(
        agent=a.name,
        holds=holds,
        prefetch=tuple(k for k in new if not a.has_copy(k)),
        hold=tuple(k for k in new if a.has_copy(k)),
        release=tuple(sorted(before_hold - a.holds)),
        load_hot=tuple(sorted(a.hot - before_hot)),
        unload_hot=tuple(sorted(before_hot - a.hot)),
    )


def _status(m: ModelTarget, target: tuple[int, int], holders: Sequence[_Agent], agents: Sequence[_Agent]) -> ModelReplicaStatus:
    """`agents`: the Ready agents with the model in some tier."""
    desired, hot = target
    with_copy = [a for a in agents if a.has_copy(m.key)]
    held_on_disk = sum(1 for a in holders if a.has_copy(m.key))
    hot_loaded = sum(1 for a in holders if m.key in a.hot and m.key in a.view.vram)
    return ModelReplicaStatus(
        key=m.key,
        desired=desired,
        desired_hot=hot,
        on_disk=len(with_copy),
        in_ram=sum(1 for a in agents if m.key in a.view.ram),
        in_vram=sum(1 for a in agents if m.key in a.view.vram),
        held=len(holders),
        agents=tuple(a.name for a in with_copy),
        shortfall=max(0, desired - held_on_disk),
        hot_shortfall=max(0, hot - hot_loaded),
        demand_per_minute=m.demand_per_minute,
    )
