"""Placement: which pending GenerationJob goes to which CacheAgent (pure, no I/O).

The cost of running a job on an agent is the estimated time until it could start:

    queue wait on the agent (until a generation slot is free for it)
  + for every artifact of the job (checkpoint, LoRAs, VAE) not already in VRAM:
        bytes / bandwidth from the tier where it is (RAM->GPU, disk->GPU,
        or fetch then disk->GPU); a fetch overlaps the wait. A fetch comes from
        another agent (the peer tier) when one that serves peers holds a verified
        copy (at the fetching agent's peer bandwidth) or is fetching one (after that
        copy is complete, as the agents fan out), else from the model's source, and
        only bytes from the source carry `download_weight`
  + the cost of what loading it would evict (re-fetch time of the victims,
    weighted by how much they are used, down when another agent holds a copy, up
    for hot replica targets and for models other pending jobs want).

An agent has `slots` generation slots and `queue_slots` more that it accepts: a job
bound into a queue slot starts when a generation slot frees, and its download runs
meanwhile. Agents that are not Ready, cordoned, too small, or that already failed the
job are skipped. Jobs are taken in order of effective priority, which rises with
waiting time (aging) and whose head start from priority is bounded, so no job waits
behind jobs created more than `2 * max_head_start_s` after it (a priority-ordered
queue that drains): a job for a cold model
is never starved by a stream of hot ones, whatever their priorities. A job may stay
pending to wait for a busy agent that holds its model when the cost says waiting is
cheaper than loading elsewhere; the cost model decides. A job pending longer than
`max_hot_wait_age_s` that only other jobs' pinned models keep off an agent reserves
that agent, so that later jobs cannot take the slot it needs once they finish.

One call plans a whole pass: many jobs are assigned in turn while a virtual copy of
the fleet is updated (slots taken, models loaded, victims evicted), so later jobs see
the effect of earlier ones. The result depends only on the arguments (no clock, no
randomness, no iteration over hash-ordered sets).

Speed: a pass never evaluates every (job, agent) pair. For each job the candidates
are the agents that already hold one of its artifacts (from an index built lazily
per artifact and kept current as the pass assigns), plus the few free agents that
look cheapest for a cold load (a heap ordered by a job-independent estimate). Those
are skipped when no free agent holds the job's checkpoint and an option already
found (typically waiting for a busy holder) costs less than the fastest possible
download of it, which is the common case of a job queued for a hot model.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from stoker.userank import DEFAULT_HALF_LIFE_S, add_use

__all__ = [
    "AgentView",
    "ArtifactInfo",
    "Binding",
    "FleetIndex",
    "JobView",
    "PlacementError",
    "PlacementPlan",
    "PlacementSettings",
    "Tier",
    "Unplaceable",
    "Waiting",
    "effective_priority",
    "head_start_s",
    "job_order_key",
    "plan_bindings",
    "plan_placement",
]

_GIB = 1 << 30


class PlacementError(ValueError):
    """Root of this module's errors: the inputs describe an impossible fleet or job."""


class Tier(enum.StrEnum):
    """Where an artifact is on an agent, best first; `miss` means it must be downloaded."""

    VRAM = "vram"
    RAM = "ram"
    DISK = "disk"
    MISS = "miss"


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """One model artifact (checkpoint, LoRA, VAE, ...) and its size."""

    key: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class AgentView:
    """What placement needs to know about one CacheAgent, as observed now."""

    name: str
    node: str = ""
    zone: str = ""
    ready: bool = True
    """False once the agent's Lease expired (or it never reported)."""
    cordoned: bool = False
    slots: int = 1
    """Generation slots: jobs the agent runs at the same time."""
    queue_slots: int = 0
    """Extra bindable slots beyond `slots`: a job bound into one while every
    generation slot is busy starts when the first frees, but its download and
    load overlap the running generation."""
    free_slots: int = 1
    """Bindable slots now, queue slots included (at most slots + queue_slots)."""
    running_remaining_s: tuple[float, ...] = ()
    """Expected seconds until each bound job finishes (a queued job's estimate includes
    its wait); a bound job without an estimate is assumed to finish after
    `PlacementSettings.default_remaining_s`."""
    vram_capacity_bytes: int | None = None
    """None: unknown, not used to filter."""
    vram_free_bytes: int = 0
    ram_capacity_bytes: int | None = None
    ram_free_bytes: int = 0
    disk_capacity_bytes: int | None = None
    """The disk budget; baked-in (preloaded) models do not count against it."""
    disk_free_bytes: int = 0
    vram: frozenset[str] = frozenset()
    ram: frozenset[str] = frozenset()
    disk: frozenset[str] = frozenset()
    """Artifact keys on local disk, including baked-in ones."""
    disk_rank_s: Mapping[str, float] = field(default_factory=dict)
    """The agent's eviction rank of its disk entries, in seconds on the caller's clock
    (lowest evicted first): the time of last use for an LRU agent, the frequency rank
    (`stoker.userank`) for Stoker's agent, which reports it as CacheAgent `models[].rank`. Placement expects the agent to evict in this order and values
    an entry by its decayed use count, `2 ** ((rank - now) / victim_half_life_s)`.
    Entries without a rank count as unused and go first; with no ranks at all, victims
    are chosen by cost alone."""
    downloading: Mapping[str, int] = field(default_factory=dict)
    """Artifact key -> bytes downloaded so far (space already reserved)."""
    preloaded: frozenset[str] = frozenset()
    """Baked into the image: on disk, free, never evicted."""
    held: frozenset[str] = frozenset()
    """Replica targets held on disk: the agent never evicts them from disk."""
    held_hot: frozenset[str] = frozenset()
    """Replica targets kept loaded: evicting them from VRAM costs extra."""
    in_use: frozenset[str] = frozenset()
    """Artifacts used by running jobs: pinned in every tier while they run."""
    download_bps: float | None = None
    """Measured bandwidths; None or 0 means not measured yet (defaults apply)."""
    disk_to_gpu_bps: float | None = None
    ram_to_gpu_bps: float | None = None
    serves_peers: bool = False
    """In the peer tier: it serves its verified files to other agents and fetches from them
    (CacheAgent status.peer)."""
    peer_bps: float | None = None
    """Measured rate of fetches from other agents; None or 0: `default_peer_bps`."""
    _keys: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of every key the agent has in some tier (computed on first use; the view is immutable)."""

    @property
    def keys(self) -> frozenset[str]:
        """Every artifact key in some tier of this agent (VRAM, RAM, disk, downloading)."""
        keys = self._keys
        if keys is None:
            keys = self.vram | self.ram | self.disk | frozenset(self.downloading)
            object.__setattr__(self, "_keys", keys)
        return keys


@dataclass(frozen=True, slots=True)
class JobView:
    """What placement needs to know about one pending GenerationJob."""

    key: str
    """Unique job id, e.g. "namespace/name"."""
    model: str
    loras: tuple[str, ...] = ()
    vae: str | None = None
    priority: float = 0.0
    created_at: float = 0.0
    """Seconds on the caller's clock (the same clock as `now`)."""
    failed_agents: frozenset[str] = frozenset()
    """Agents on which an attempt of this job already failed: never chosen again."""
    attempt: int = 1
    expected_run_s: float | None = None
    """Expected generation time once loaded; None: the settings' default."""

    @property
    def artifact_keys(self) -> tuple[str, ...]:
        """Checkpoint first, then LoRAs and VAE, without duplicates."""
        keys = [self.model, *self.loras]
        if self.vae is not None:
            keys.append(self.vae)
        return tuple(dict.fromkeys(keys))


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    """Knobs of the cost model. Defaults match the fleet sizes in DESIGN.md."""

    default_download_bps: float = 200e6
    """Used until an agent has measured its own (6 GB in 30 s)."""
    default_disk_to_gpu_bps: float = 2e9
    default_ram_to_gpu_bps: float = 20e9
    default_peer_bps: float = 500e6
    """Fetches from another agent until measured: about an agent's upload cap shared by
    two transfers."""
    default_run_s: float = 10.0
    """Expected generation time of a job that does not say."""
    default_remaining_s: float = 5.0
    """Expected remaining time of a running job without an estimate."""
    aging_per_s: float = 1.0 / 60.0
    """Effective priority gained per second of waiting: one step per minute, so a job
    `d` priority steps below a stream of others overtakes them after about `d` minutes
    (for small `d`; see `max_head_start_s`)."""
    max_head_start_s: float = 900.0
    """Bound of the head start priority gives: a priority-`p` job is queued as if created
    `max_head_start_s * p / (|p| + max_head_start_s * aging_per_s)` seconds earlier
    (about `p / aging_per_s` for small `p`, never more than this in either direction).
    No job is overtaken by jobs created more than twice this after it, whatever the
    priorities (-1000..1000): with the default, 30 minutes, below the default job
    timeout of an hour."""
    max_hot_wait_age_s: float = 300.0
    """A job pending longer than this no longer waits for a busy agent: it takes the
    best free one, or, when other jobs' pinned models are all that keep it off an agent,
    reserves that agent until they finish."""
    download_weight: float = 10.0
    """Cost charged per second of downloading from a model's source, relative to a second of
    waiting. Above 1, bytes from the source count for more than their transfer time (egress,
    rate limits, and the copy they push off the disk), so jobs queue behind an agent that
    holds their model instead of pulling one more copy; start latency is traded for fewer
    downloads. A fetch from another agent (the peer tier) costs its transfer time only. In the
    fleet simulation 10 against 3 cut duplicate downloads by about half for a p95 start
    latency still several times below a load balancer's (BENCHMARKS.md)."""
    peer_weight: float = 1.0
    """Cost charged per second of fetching from another agent, relative to a second of waiting
    (1: its transfer time only)."""
    evict_cold_weight: float = 0.1
    """Share of a victim's re-fetch time charged when nothing suggests it is needed."""
    evict_use_weight: float = 0.1
    """Added per recent use of the victim (its decayed use count from `disk_rank_s`, up to
    `evict_use_cap`): a model in steady use costs more to lose than a one-off."""
    evict_use_cap: float = 8.0
    victim_half_life_s: float = DEFAULT_HALF_LIFE_S
    """Decay of a use when valuing victims by `AgentView.disk_rank_s`; the agents' own (`stoker.userank`)."""
    evict_duplicate_factor: float = 0.25
    """Disk victims another Ready agent also holds cost this share: losing a duplicate
    loses no model from the fleet, so duplicates are evicted first."""
    evict_last_copy_weight: float = 1.0
    """Multiplies the cost of a disk victim that no other agent holds when the evicting agent is in
    the peer tier: a duplicate comes back from a peer, the last copy only from the source."""
    evict_hot_target_weight: float = 1.0
    """Added when the victim is a hot replica target on that agent."""
    evict_demand_weight: float = 0.5
    """Added per pending job that needs the victim (up to `evict_demand_cap` jobs)."""
    evict_demand_cap: int = 4
    cold_candidates: int = 8
    """Free agents, best ranked for a cold load, evaluated exactly for every job besides
    the holders of its artifacts (so a job always sees some non-holders too)."""
    holder_candidates: int = 16
    """Most free holders of a job's artifacts evaluated per job (best tier first), and most
    busy holders of its checkpoint considered for waiting (shortest wait first). With more
    holders than that, the first ones found in fleet order are used."""
    reference_size_bytes: int = 4 * _GIB
    """Size used to rank free agents for cold loads independently of the job."""
    unknown_size_bytes: int = 4 * _GIB
    """Assumed size of an artifact the caller does not know the size of."""

    def __post_init__(self) -> None:
        for name in ("default_download_bps", "default_disk_to_gpu_bps", "default_ram_to_gpu_bps", "default_peer_bps"):
            if not getattr(self, name) > 0:
                raise PlacementError(f"PlacementSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if self.cold_candidates < 1 or self.holder_candidates < 1:
            raise PlacementError("PlacementSettings.cold_candidates and holder_candidates must be >= 1")
        for name in ("aging_per_s", "max_head_start_s", "victim_half_life_s"):
            if not getattr(self, name) > 0:
                raise PlacementError(f"PlacementSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.evict_last_copy_weight >= 1.0:
            raise PlacementError(f"PlacementSettings.evict_last_copy_weight must be >= 1, got {self.evict_last_copy_weight!r}")
        if not self.peer_weight >= 1.0:
            raise PlacementError(f"PlacementSettings.peer_weight must be >= 1, got {self.peer_weight!r}")
        if not self.download_weight >= 1.0:
            raise PlacementError(f"PlacementSettings.download_weight must be >= 1, got {self.download_weight!r}")


@dataclass(frozen=True, slots=True)
class Binding:
    """Bind `job_key` to `agent` now."""

    job_key: str
    agent: str
    cost_s: float
    """Estimated seconds until the job starts: queue wait (in a queue slot) overlapped
    with downloads, plus loading, plus the eviction cost and the download penalty."""
    cache_tier: Tier
    """Where the job's checkpoint is on the agent at binding time."""
    reason: str
    load_s: float = 0.0
    evict_s: float = 0.0
    evicts: tuple[str, ...] = ()
    """Artifacts the agent is expected to evict to make room (an estimate)."""
    wait_s: float = 0.0
    """Expected wait for a generation slot (bound into a queue slot)."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """Leave `job_key` pending: the cheapest agent is busy and waiting for it beats loading
    elsewhere, or (`reserved`) the job has waited long and only other jobs' pinned models
    keep it off `agent`, whose free slots the pass then holds back for it."""

    job_key: str
    agent: str
    wait_s: float
    cost_s: float
    reason: str
    reserved: bool = False


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """No Ready agent could take `job_key` now (too small, all failed it, or no room)."""

    job_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """Outcome of one pass. Jobs the pass did not reach (no free slot left) are in none of these."""

    bindings: tuple[Binding, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    unplaceable: tuple[Unplaceable, ...] = ()
    jobs_examined: int = 0


def head_start_s(priority: float, *, settings: PlacementSettings) -> float:
    """Seconds of waiting a job's priority is worth (see `PlacementSettings.max_head_start_s`)."""
    bound = settings.max_head_start_s
    return bound * priority / (abs(priority) + bound * settings.aging_per_s)


def effective_priority(job: JobView, *, now: float, settings: PlacementSettings) -> float:
    """Priority plus aging: rises by `aging_per_s` for every second the job has waited. The
    priority part is `aging_per_s * head_start_s(priority)`, about the priority itself for
    small priorities and bounded for large ones."""
    return settings.aging_per_s * (head_start_s(job.priority, settings=settings) + max(0.0, now - job.created_at))


def job_order_key(job: JobView, *, settings: PlacementSettings) -> tuple[float, float, str]:
    """Sort key for the queue (smallest first): the creation time less the head start.
    Independent of `now`: aging raises every job at the same rate, so the order only
    changes as jobs arrive or leave, and a caller may keep its queue sorted by this key
    between passes. A job can only be overtaken by jobs created less than
    `2 * max_head_start_s` after it, which bounds its wait."""
    return (job.created_at - head_start_s(job.priority, settings=settings), job.created_at, job.key)


def plan_bindings(
    jobs: Iterable[JobView],
    agents: Iterable[AgentView],
    artifacts: Mapping[str, ArtifactInfo] | Iterable[ArtifactInfo],
    *,
    now: float,
    settings: PlacementSettings = PlacementSettings(),
    index: FleetIndex | None = None,
) -> tuple[Binding, ...]:
    """The bindings of one scheduling pass (see `plan_placement` for the whole plan)."""
    return plan_placement(jobs, agents, artifacts, now=now, settings=settings, index=index).bindings


def plan_placement(
    jobs: Iterable[JobView],
    agents: Iterable[AgentView],
    artifacts: Mapping[str, ArtifactInfo] | Iterable[ArtifactInfo],
    *,
    now: float,
    settings: PlacementSettings = PlacementSettings(),
    jobs_sorted: bool = False,
    demand: Mapping[str, int] | None = None,
    index: FleetIndex | None = None,
) -> PlacementPlan:
    """Assign pending jobs to agents for one pass.

    Jobs are examined in `job_order_key` order. Each goes to its cheapest eligible agent
    if that agent has a free slot, is recorded as waiting if the cheapest is busy, or as
    unplaceable if none can take it. The pass stops as soon as no free slot is left.

    For large queues and fleets planned over and over (a simulator):
    `jobs_sorted=True` says `jobs` is already in `job_order_key` order, so it is read
    lazily and only as far as needed; `demand` (pending jobs per artifact key) then
    saves counting it from `jobs` (an iterator that is not a sequence counts as no
    demand); `index`, a `FleetIndex` kept between calls, re-indexes only changed agents.
    """
    sizes = artifacts if isinstance(artifacts, Mapping) else {a.key: a for a in artifacts}
    job_list: Iterable[JobView]
    if jobs_sorted:
        job_list = jobs
        if demand is None:
            demand = _demand(jobs) if isinstance(jobs, Sequence) else {}
    else:
        pending = jobs if isinstance(jobs, Sequence) else tuple(jobs)
        job_list = _in_queue_order(pending, settings)
        if demand is None:
            demand = _demand(pending)
    fleet = _Fleet(agents, sizes, demand, settings, index, now=now)
    bindings: list[Binding] = []
    waiting: list[Waiting] = []
    unplaceable: list[Unplaceable] = []
    examined = 0
    seen: set[str] = set()
    for job in job_list if fleet.free_total > 0 else ():
        if job.key in seen:
            raise PlacementError(f"job {job.key!r} appears twice in one placement pass; pass each pending job once")
        seen.add(job.key)
        examined += 1
        outcome = fleet.place(job, now=now)
        if isinstance(outcome, Binding):
            bindings.append(outcome)
        elif isinstance(outcome, Waiting):
            waiting.append(outcome)
        else:
            unplaceable.append(outcome)
        if fleet.free_total <= 0:
            break  # nothing more can be bound; leave the rest of the queue unread
    return PlacementPlan(tuple(bindings), tuple(waiting), tuple(unplaceable), examined)


# --- internals -------------------------------------------------------------------


def _in_queue_order(jobs: Sequence[JobView], settings: PlacementSettings) -> Iterator[JobView]:
    """`jobs` in `job_order_key` order, lazily: a heap costs O(n) up front and O(log n)
    per job taken, where a full sort would cost O(n log n) even when a pass binds few."""
    heap = [(*job_order_key(j, settings=settings), i) for i, j in enumerate(jobs)]
    heapq.heapify(heap)
    while heap:
        yield jobs[heapq.heappop(heap)[3]]


def _demand(jobs: Iterable[JobView]) -> dict[str, int]:
    """Pending jobs per artifact key: evicting a model others wait for costs more."""
    counts: Counter[str] = Counter(j.model for j in jobs)
    counts.update(k for j in jobs if j.loras or j.vae is not None for k in j.artifact_keys[1:])
    return counts


def _view_tier(view: AgentView, key: str) -> Tier | None:
    if key in view.vram:
        return Tier.VRAM
    if key in view.ram:
        return Tier.RAM
    if key in view.disk:
        return Tier.DISK
    if key in view.downloading:
        return Tier.MISS
    return None


_SCANS_BEFORE_INDEX = 24
"""Artifacts looked up by scanning the fleet before a pass builds a full holder index."""

_TIER_RANK = {Tier.VRAM: 0, Tier.RAM: 1, Tier.DISK: 2, Tier.MISS: 3}


class _Agent:
    """Mutable virtual state of one agent during a pass (copied from its view on first use)."""

    __slots__ = (
        "view", "name", "vram", "ram", "disk", "downloading", "in_use", "pinned_disk",
        "held_hot", "vram_free", "disk_free", "free_slots", "gen_slots", "busy", "dl", "d2g", "r2g",
        "victims", "version", "ranks", "peers", "peer",
    )

    def __init__(self, view: AgentView, settings: PlacementSettings) -> None:
        self.view = view
        self.name = view.name
        self.vram = view.vram
        self.ram = view.ram
        self.disk = view.disk
        self.downloading = view.downloading
        self.in_use = view.in_use
        self.pinned_disk = view.held | view.preloaded
        self.held_hot = view.held_hot
        self.vram_free = _vram_free(view)
        self.disk_free = _disk_free(view)
        self.free_slots = view.free_slots if view.free_slots > 0 else 0
        self.gen_slots = max(1, view.slots)
        self.busy: list[float] = _busy_times(view, settings)
        """Heap of the times at which the bound jobs finish."""
        self.dl = view.download_bps or settings.default_download_bps
        self.d2g = view.disk_to_gpu_bps or settings.default_disk_to_gpu_bps
        self.r2g = view.ram_to_gpu_bps or settings.default_ram_to_gpu_bps
        self.peers = view.serves_peers
        self.peer = view.peer_bps or settings.default_peer_bps
        self.victims: dict[bool, tuple[tuple[float, str, int, float], ...]] = {}
        """Per tier: (order, key, size, cost) of the evictable residents; disk costs before the duplicate discount."""
        self.version = 0
        self.ranks: Mapping[str, float] = view.disk_rank_s

    def tier(self, key: str) -> Tier | None:
        if key in self.vram:
            return Tier.VRAM
        if key in self.ram:
            return Tier.RAM
        if key in self.disk:
            return Tier.DISK
        if key in self.downloading:
            return Tier.MISS
        return None

    def bind_wait_s(self) -> float:
        """Seconds until the agent can take one more job (0 with a free slot)."""
        return 0.0 if self.free_slots > 0 else self.busy[0]

    def start_wait_s(self) -> float:
        """Seconds until a generation slot is free for one more job."""
        return _start_wait(self.busy, self.gen_slots)


@dataclass(slots=True)
class _Option:
    agent: _Agent
    wait_s: float
    """Until a generation slot is free for the job."""
    bind_s: float
    """Until the job can be bound (0: now; more: it would wait pending)."""
    fetch_s: float
    """The download part of `load_s`: it overlaps the wait."""
    load_s: float
    evict_s: float
    tier: Tier
    evict_vram: tuple[str, ...] = ()
    evict_disk: tuple[str, ...] = ()
    vram_add: int = 0
    disk_add: int = 0
    evicted_vram_bytes: int = 0
    evicted_disk_bytes: int = 0
    loaded: tuple[str, ...] = field(default=())
    downloaded: tuple[str, ...] = field(default=())
    fetch_penalty_s: float = 0.0
    """Cost of new downloads beyond their time (see PlacementSettings.download_weight)."""
    from_peers: tuple[str, ...] = ()
    """Artifacts among `downloaded` that come from another agent, not the source."""

    @property
    def evicts(self) -> tuple[str, ...]:
        return self.evict_vram + self.evict_disk

    @property
    def start_s(self) -> float:
        return max(self.wait_s, self.bind_s + self.fetch_s) + self.load_s - self.fetch_s

    @property
    def cost_s(self) -> float:
        return self.start_s + self.evict_s + self.fetch_penalty_s


class FleetIndex:
    """Optional accelerator for callers that plan many passes over a slowly changing fleet.

    It indexes the eligible (Ready, uncordoned) agents by the artifacts they hold, and on
    each pass re-indexes only the `AgentView` objects that are not the very same objects
    as last time, so a simulator that replaces only the views of agents that changed pays
    for those alone. Pass the same instance to every `plan_placement` call; the plan is
    the same as without it, except that when more agents hold an artifact than
    `holder_candidates` allows, which of them are looked at follows indexing order.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._agents: tuple[AgentView, ...] = ()
        self._all: dict[str, AgentView] = {}
        self.views: dict[str, AgentView] = {}
        self.by_key: dict[str, dict[str, AgentView]] = {}
        self.free: dict[str, None] = {}

    def sync(self, agents: Sequence[AgentView]) -> None:
        """Bring the index up to date with `agents` (the full fleet, in any order)."""
        prev = self._agents
        n = min(len(prev), len(agents))
        changed = [i for i in range(n) if agents[i] is not prev[i]]
        try:
            for i in changed:
                self._remove(prev[i])
            for v in prev[n:]:
                self._remove(v)
            for i in changed:
                self._add(agents[i])
            for v in agents[n:]:
                self._add(v)
        except PlacementError:
            self._reset()  # start clean on the next sync
            raise
        self._agents = tuple(agents)

    def _add(self, v: AgentView) -> None:
        if v.name in self._all:
            raise PlacementError(f"agent {v.name!r} appears twice in one placement pass; pass each agent once")
        self._all[v.name] = v
        if v.ready and not v.cordoned:
            self.views[v.name] = v
            for key in v.keys:
                holders = self.by_key.get(key)
                if holders is None:
                    holders = self.by_key[key] = {}
                holders[v.name] = v
            if v.free_slots > 0:
                self.free[v.name] = None

    def _remove(self, v: AgentView) -> None:
        if self._all.get(v.name) is not v:
            return
        del self._all[v.name]
        if self.views.pop(v.name, None) is not None:
            for key in v.keys:
                holders = self.by_key[key]
                del holders[v.name]
                if not holders:
                    del self.by_key[key]
            self.free.pop(v.name, None)


class _Fleet:
    """The virtual fleet of one pass, with the indexes that keep the pass fast."""

    def __init__(
        self,
        agents: Iterable[AgentView],
        sizes: Mapping[str, ArtifactInfo],
        demand: Mapping[str, int],
        settings: PlacementSettings,
        index: FleetIndex | None,
        *,
        now: float,
    ) -> None:
        self.settings = settings
        self.sizes = sizes
        self.demand = demand
        self.now = now
        agent_list = agents if isinstance(agents, Sequence) else tuple(agents)
        self.index = index
        if index is not None:
            index.sync(agent_list)
            self.eligible: list[AgentView] = []
            self.views = index.views
            free_views = [self.views[n] for n in index.free]
        else:
            self.eligible = [v for v in agent_list if v.ready and not v.cordoned]
            self.views = {v.name: v for v in self.eligible}
            if len(self.views) != len(self.eligible) or len({v.name for v in agent_list}) != len(agent_list):
                raise PlacementError("an agent name appears twice in one placement pass; pass each agent once")
            free_views = [v for v in self.eligible if v.free_slots > 0]
        self.states: dict[str, _Agent] = {}
        self.scan_memo: dict[str, list[str]] = {}
        self.gained: dict[str, dict[str, None]] = {}
        """Keys loaded during the pass onto agents whose view did not have them."""
        self.free_names: dict[str, None] = {v.name: None for v in free_views}
        self.free_memo: dict[str, dict[str, None]] = {}
        """Per artifact: the agents holding it that still have a free slot (kept current)."""
        self.free_total = sum(v.free_slots for v in free_views)
        # Fastest links among free agents: a lower bound of any cold load (see `place`).
        self.max_dl = max((v.download_bps or settings.default_download_bps for v in free_views), default=1.0)
        self.max_d2g = max((v.disk_to_gpu_bps or settings.default_disk_to_gpu_bps for v in free_views), default=1.0)
        self.max_peer = max((v.peer_bps or settings.default_peer_bps for v in free_views if v.serves_peers), default=0.0)
        self.peer_memo: dict[str, tuple[tuple[float, str], ...]] = {}
        """Per artifact: the two soonest (seconds until a verified copy can be served, agent) among agents
        in the peer tier that hold or fetch it (kept current as the pass assigns)."""
        self.fetch_ready: dict[tuple[str, str], float] = {}
        """(agent, artifact) -> seconds until the copy it started fetching in this pass is complete."""
        heap = [(self._cold_rank(self.state(v.name)), v.name, 0) for v in free_views]
        heapq.heapify(heap)
        self.cold_heap = heap

    # -- state access

    def state(self, name: str) -> _Agent:
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = _Agent(self.views[name], self.settings)
        return st

    def size(self, key: str) -> int:
        info = self.sizes.get(key)
        return self.settings.unknown_size_bytes if info is None else info.size_bytes

    def _cold_rank(self, st: _Agent) -> float:
        """Job-independent estimate of loading a reference-sized model on a free agent: the
        queue wait, the transfer, and what making room would evict (in steady state every
        disk is full, and the value of the victims is what tells agents apart)."""
        s = self.settings
        ref = s.reference_size_bytes
        rank = st.start_wait_s() + ref / st.dl + ref / st.d2g
        if st.vram_free < ref:
            rank += s.evict_cold_weight * ref / st.d2g
        if st.disk_free < ref:
            # Without the duplicate discount: counting copies for every free agent would cost a
            # fleet-wide index on every pass; the exact evaluation of a candidate applies it.
            got = self._evict(st, vram=False, need=int(ref - st.disk_free), exclude=(), ignore_in_use=False,
                              duplicates=False)
            rank += got[0] if got is not None else ref / st.dl
        return rank

    def tier_of(self, name: str, key: str) -> Tier | None:
        st = self.states.get(name)
        return st.tier(key) if st is not None else _view_tier(self.views[name], key)

    def holder_names(self, key: str) -> Iterable[str]:
        """Eligible agents that held `key` when the pass started, plus those that gained it
        since; some may have evicted it since (callers check `tier_of`)."""
        if self.index is None and len(self.scan_memo) >= _SCANS_BEFORE_INDEX:
            # Many distinct artifacts in this pass: one index over all holdings is cheaper
            # than a scan of the fleet per artifact.
            self.index = FleetIndex()
            self.index.sync(self.eligible)
        if self.index is not None:
            base: Iterable[str] = self.index.by_key.get(key, {})
        else:
            memo = self.scan_memo.get(key)
            if memo is None:
                memo = self.scan_memo[key] = [v.name for v in self.eligible if key in v.keys]
            base = memo
        gained = self.gained.get(key)
        return base if not gained else [*base, *gained]

    def copies(self, key: str) -> int:
        """Eligible agents holding `key` (or fetching it), as far as the pass knows."""
        holders = self.holder_names(key)
        return len(holders) if isinstance(holders, (dict, list)) else sum(1 for _ in holders)

    def free_holders(self, key: str, limit: int, failed: frozenset[str]) -> list[tuple[int, str]]:
        """Up to `limit` (tier rank, name) of agents with a free slot that hold `key`."""
        free_dict = self.free_memo.get(key)
        if free_dict is None:
            holders = self.holder_names(key)
            free = self.free_names
            if isinstance(holders, dict) and len(free) < len(holders):
                # Few free agents: test each of them rather than walking every holder.
                free_dict = {n: None for n in free if n in holders}
            else:
                free_dict = {n: None for n in holders if n in free}
            self.free_memo[key] = free_dict
        out: list[tuple[int, str]] = []
        for name in free_dict:
            if name in failed:
                continue
            t = self.tier_of(name, key)
            if t is not None:
                out.append((_TIER_RANK[t], name))
                if len(out) >= limit:
                    break
        return out

    def busy_holders(self, key: str, limit: int, failed: frozenset[str]) -> list[tuple[float, int, str]]:
        """Up to `limit` (wait lower bound, tier rank, name) of busy agents that hold `key`."""
        out: list[tuple[float, int, str]] = []
        free = self.free_names
        for name in self.holder_names(key):
            if name in free or name in failed:
                continue
            t = self.tier_of(name, key)
            if t is not None:
                out.append((self._wait_lower_bound(name), _TIER_RANK[t], name))
                if len(out) >= limit:
                    break
        return out

    def peer_ready_s(self, key: str, exclude: str) -> float | None:
        """Seconds until an agent other than `exclude` can serve a verified copy of `key` to a
        peer (0: it holds one now; more: it is fetching one), or None when none can."""
        memo = self.peer_memo.get(key)
        if memo is None:
            found: list[tuple[float, str]] = []
            for name in self.holder_names(key):
                st = self.states.get(name)
                view = self.views[name]
                if not view.serves_peers:
                    continue
                t = st.tier(key) if st is not None else _view_tier(view, key)
                if t is None:
                    continue
                ready = self.fetch_ready.get((name, key))
                if ready is None and t is Tier.MISS:
                    dl = st.dl if st is not None else (view.download_bps or self.settings.default_download_bps)
                    done = (st.downloading if st is not None else view.downloading).get(key, 0)
                    ready = max(0, self.size(key) - done) / dl
                found.append((ready or 0.0, name))
                if len(found) >= 2 and sum(1 for r, _ in found if r == 0.0) >= 2:
                    break  # two can serve now: nothing is sooner
            memo = self.peer_memo[key] = tuple(sorted(found)[:2])
        for ready, name in memo:
            if name != exclude:
                return ready
        return None

    # -- one job

    def place(self, job: JobView, *, now: float) -> Binding | Waiting | Unplaceable:
        s = self.settings
        keys = job.artifact_keys
        arts = tuple((k, self.size(k)) for k in keys)
        total = sum(size for _, size in arts)
        aged = now - job.created_at > s.max_hot_wait_age_s
        failed = job.failed_agents
        cap = s.holder_candidates

        # Free agents that hold some of the job's artifacts (best tier first).
        free_cands: dict[str, None] = {}
        model_has_free_holder = False
        for key in keys:
            if len(free_cands) >= cap:
                break
            found = sorted(self.free_holders(key, 2 * cap, failed))
            model_has_free_holder = model_has_free_holder or (key == keys[0] and bool(found))
            for _, name in found[: cap - len(free_cands)]:
                free_cands[name] = None
        best: _Option | None = None
        for name in free_cands:
            best = self._better(best, arts, self.state(name), total)
        # Busy agents holding the checkpoint: waiting only pays off for the checkpoint
        # (LoRAs and VAEs load in well under a second), and only for a job not pending long.
        busy_cands = self.busy_holders(keys[0], 2 * cap, failed) if not aged else []
        busy_cands.sort()
        for wait_lb, _, name in busy_cands[:cap]:
            if best is not None and wait_lb >= best.cost_s:
                break  # sorted by wait: no busy agent left can beat the best
            best = self._better(best, arts, self.state(name), total)
        # Free agents best ranked for a cold load. Each must download the checkpoint when no
        # free agent holds it, which costs at least `cold_floor`: an option already cheaper
        # than that makes them pointless (the common case of a job queued for a busy holder).
        cold: dict[str, None] = {}
        cold_floor = arts[0][1] * (s.download_weight / self.max_dl + 1.0 / self.max_d2g)
        if self.max_peer > 0 and self.peer_ready_s(keys[0], "") is not None:
            # A free agent in the peer tier may fetch it from a holder: no source weight, LAN speed.
            cold_floor = min(cold_floor, arts[0][1] * (s.peer_weight / self.max_peer + 1.0 / self.max_d2g))
        if model_has_free_holder or best is None or best.cost_s >= cold_floor:
            self._add_cold_candidates(cold, free_cands, failed, total)
            for name in cold:
                best = self._better(best, arts, self.state(name), total)
        if best is None:
            if aged:
                reserved = self._reserve(job, arts, total, [*free_cands, *cold])
                if reserved is not None:
                    return reserved
            if not free_cands and not busy_cands and not cold:
                return Unplaceable(job.key, f"no Ready agent with a free slot can fit {_gb(total)} and has not failed this job")
            return Unplaceable(job.key, f"no candidate agent can fit or make room for {_gb(total)} (models in use or held)")
        run_s = job.expected_run_s if job.expected_run_s is not None else s.default_run_s
        st = best.agent
        if best.bind_s > 0:
            # Reserve the agent's next free slot so later jobs in this pass see the queue.
            heapq.heapreplace(st.busy, best.start_s + run_s)
            return Waiting(
                job.key, st.name, best.wait_s, best.cost_s,
                f"waiting {best.wait_s:.1f}s for busy agent {st.name} ({best.tier} hit) is cheaper than loading elsewhere",
            )
        self._commit(job, best, run_s)
        return Binding(
            job.key, st.name, best.cost_s, best.tier, _reason(best),
            load_s=best.load_s, evict_s=best.evict_s, evicts=best.evicts, wait_s=best.wait_s,
        )

    def _reserve(self, job: JobView, arts: tuple[tuple[str, int], ...], total: int, names: list[str]) -> Waiting | None:
        """For a job pending long that fits nowhere now: the best free agent where only pinned
        models of running jobs are in the way. Its free slots are held back for the rest of
        the pass, so the job is bound there as soon as those jobs finish instead of being
        overtaken every time by a job that fits beside them."""
        best: _Option | None = None
        for name in names:
            st = self.state(name)
            if st.free_slots <= 0 or not self._fits(st.view, total):
                continue
            opt = self._evaluate(arts, st, st.start_wait_s(), 0.0, ignore_in_use=True)
            if opt is not None and (best is None or (opt.cost_s, opt.agent.name) < (best.cost_s, best.agent.name)):
                best = opt
        if best is None:
            return None
        st = best.agent
        self.free_total -= st.free_slots
        st.free_slots = 0
        st.version += 1
        self._drop_free(st)
        s = self.settings
        wait = max(st.busy) if st.busy else s.default_remaining_s
        # The job takes the agent once those jobs finish: later jobs in the pass see it busy.
        run_s = job.expected_run_s if job.expected_run_s is not None else s.default_run_s
        heapq.heappush(st.busy, wait + best.load_s + run_s)
        return Waiting(
            job.key, st.name, wait, best.cost_s + wait,
            f"pending {_age_s(job, self.now):.0f}s; agent {st.name} reserved until the jobs pinning what must make room finish",
            reserved=True,
        )

    def _better(self, best: _Option | None, arts: tuple[tuple[str, int], ...], st: _Agent, total: int) -> _Option | None:
        if not self._fits(st.view, total):
            return best
        bind = st.bind_wait_s()
        # It cannot start before it is bound (an agent reserved in this pass has fewer jobs than slots).
        opt = self._evaluate(arts, st, max(st.start_wait_s(), bind), bind, ignore_in_use=bind > 0)
        if opt is None:
            return best
        if best is None or (opt.cost_s, opt.agent.name) < (best.cost_s, best.agent.name):
            return opt
        return best

    def _wait_lower_bound(self, name: str) -> float:
        st = self.states.get(name)
        return st.start_wait_s() if st is not None else _first_free_s(self.views[name], self.settings)

    def _fits(self, view: AgentView, total: int) -> bool:
        if view.vram_capacity_bytes is not None and total > view.vram_capacity_bytes:
            return False
        return True

    def _add_cold_candidates(
        self, candidates: dict[str, None], skip: Mapping[str, None], failed: frozenset[str], total: int
    ) -> None:
        """Take the best few free agents from the cold heap (skipping stale entries)."""
        want = self.settings.cold_candidates
        popped: list[tuple[float, str, int]] = []
        heap = self.cold_heap
        scanned = 0
        limit = 4 * want + len(failed)
        while heap and want > 0 and scanned < limit:
            entry = heapq.heappop(heap)
            rank, name, version = entry
            st = self.states.get(name)
            if st is not None and (st.version != version or st.free_slots <= 0):
                continue  # stale: the agent changed (a newer entry exists) or is full
            scanned += 1
            popped.append(entry)
            if name in failed or name in candidates or name in skip:
                continue
            view = self.views[name]
            if not self._fits(view, total):
                continue
            candidates[name] = None
            want -= 1
        for entry in popped:
            heapq.heappush(heap, entry)

    def _evaluate(
        self, arts: tuple[tuple[str, int], ...], st: _Agent, wait: float, bind: float, *, ignore_in_use: bool
    ) -> _Option | None:
        load = 0.0
        fetch = 0.0
        vram_need = 0
        disk_need = 0
        penalty = 0.0
        loaded: list[str] = []
        downloaded: list[str] = []
        from_peers: list[str] = []
        tier = Tier.VRAM
        first = True
        for key, size in arts:
            t = st.tier(key)
            if first:
                tier = t if t is not None else Tier.MISS
                first = False
            if t is Tier.VRAM:
                continue
            vram_need += size
            loaded.append(key)
            if t is Tier.RAM:
                load += size / st.r2g
            elif t is Tier.DISK:
                load += size / st.d2g
            elif t is Tier.MISS:  # download in progress: space reserved, bytes remaining
                done = st.downloading.get(key, 0)
                part = max(0, size - done) / st.dl
                fetch += part
                load += part + size / st.d2g
            else:
                ready = self.peer_ready_s(key, st.name) if st.peers else None
                if ready is not None:
                    # From the first agent that can serve it (after its own copy is complete).
                    part = ready + size / st.peer
                    penalty += (self.settings.peer_weight - 1.0) * size / st.peer
                    from_peers.append(key)
                else:
                    part = size / st.dl
                    penalty += (self.settings.download_weight - 1.0) * part
                fetch += part
                load += part + size / st.d2g
                disk_need += size
                downloaded.append(key)
        evict_s = 0.0
        evict_vram: list[str] = []
        evict_disk: list[str] = []
        ev_vram = ev_disk = 0
        if vram_need > st.vram_free:
            # The jobs ahead of this one have finished by the time it loads.
            got = self._evict(st, vram=True, need=vram_need - st.vram_free, exclude=set(loaded),
                              ignore_in_use=ignore_in_use or wait > 0)
            if got is None:
                return None
            cost, evict_vram, ev_vram = got
            evict_s += cost
        if disk_need > st.disk_free:
            got = self._evict(st, vram=False, need=disk_need - st.disk_free, exclude=set(k for k, _ in arts),
                              ignore_in_use=ignore_in_use)
            if got is None:
                return None
            cost, evict_disk, ev_disk = got
            evict_s += cost
        return _Option(
            st, wait, bind, fetch, load, evict_s, tier, tuple(evict_vram), tuple(evict_disk),
            vram_add=vram_need, disk_add=disk_need,
            evicted_vram_bytes=ev_vram, evicted_disk_bytes=ev_disk,
            loaded=tuple(loaded), downloaded=tuple(downloaded), fetch_penalty_s=penalty, from_peers=tuple(from_peers),
        )

    def _victims(self, st: _Agent, *, vram: bool) -> tuple[tuple[float, str, int, float], ...]:
        """Evictable residents of a tier in the order the agent evicts them: (order, key, size, cost).

        Disk victims follow the agent's own rank when it reports one (`disk_rank_s`), and
        are cheapest per byte first otherwise. A victim costs its re-fetch time times a
        weight: a little for any model, more per recent use and per pending job that
        wants it, much less when another agent also holds it."""
        cached = st.victims.get(vram)
        if cached is not None:
            return cached
        s = self.settings
        out: list[tuple[float, str, int, float]] = []
        if vram:
            for key in st.vram:
                size = self.size(key)
                refetch = size / (st.r2g if key in st.ram else st.d2g if key in st.disk else st.dl)
                weight = s.evict_cold_weight + s.evict_demand_weight * min(self.demand.get(key, 0), s.evict_demand_cap)
                if key in st.held_hot:
                    weight += s.evict_hot_target_weight
                cost = weight * refetch
                out.append((cost / max(1, size), key, size, cost))
        else:
            ranks = st.ranks
            for key in st.disk:
                if key in st.pinned_disk:
                    continue
                size = self.size(key)
                weight = s.evict_cold_weight + s.evict_demand_weight * min(self.demand.get(key, 0), s.evict_demand_cap)
                rank = ranks.get(key) if ranks else None
                if rank is not None:
                    uses = 2.0 ** min(32.0, (rank - self.now) / s.victim_half_life_s)
                    weight += s.evict_use_weight * min(uses, s.evict_use_cap)
                cost = weight * size / st.dl  # less for a duplicate: see `_evict`
                order = (-math.inf if rank is None else rank) if ranks else cost / max(1, size)
                out.append((order, key, size, cost))
        out.sort()
        result = tuple(out)
        st.victims[vram] = result
        return result

    def _evict(
        self, st: _Agent, *, vram: bool, need: int, exclude: Iterable[str], ignore_in_use: bool,
        duplicates: bool = True,
    ) -> tuple[float, list[str], int] | None:
        cost = 0.0
        freed = 0
        victims: list[str] = []
        discount = self.settings.evict_duplicate_factor if duplicates and not vram else 1.0
        last = self.settings.evict_last_copy_weight if st.peers and duplicates and not vram else 1.0
        for _, key, size, c in self._victims(st, vram=vram):
            if key in exclude or (not ignore_in_use and key in st.in_use):
                continue
            # Counting copies costs a fleet lookup: done only for the victims actually taken.
            if discount != 1.0 or last != 1.0:
                cost += c * discount if self.copies(key) > 1 else c * last
            else:
                cost += c
            freed += size
            victims.append(key)
            if freed >= need:
                return cost, victims, freed
        return None

    def _drop_free(self, st: _Agent) -> None:
        """The agent has no free slot left: forget it as a free candidate."""
        self.free_names.pop(st.name, None)
        for key in st.view.keys | st.vram | st.disk:
            memo = self.free_memo.get(key)
            if memo is not None:
                memo.pop(st.name, None)

    def _commit(self, job: JobView, opt: _Option, run_s: float) -> None:
        st = opt.agent
        st.free_slots -= 1
        self.free_total -= 1
        heapq.heappush(st.busy, opt.start_s + run_s)
        keys = frozenset(job.artifact_keys)
        st.vram = (st.vram - set(opt.evict_vram)) | keys
        st.disk = (st.disk - set(opt.evict_disk)) | set(opt.downloaded)
        # A model evicted from disk is gone from RAM too (the agent drops all host copies).
        st.ram = st.ram - set(opt.evict_disk)
        st.in_use = st.in_use | keys
        st.vram_free = max(0, st.vram_free - opt.vram_add + opt.evicted_vram_bytes)
        st.disk_free = max(0, st.disk_free - opt.disk_add + opt.evicted_disk_bytes)
        if st.ranks:
            # The agent counts this job as a use of every artifact it has on disk.
            half_life = self.settings.victim_half_life_s
            ranks = {k: r for k, r in st.ranks.items() if k not in opt.evict_disk}
            for key in keys:
                if key in st.disk:
                    ranks[key] = add_use(ranks.get(key), self.now, half_life_s=half_life)
            st.ranks = ranks
        st.victims = {}
        st.version += 1
        if self.peer_memo:
            for key in (*opt.downloaded, *opt.evict_disk):
                self.peer_memo.pop(key, None)
        if st.peers:
            for key in opt.downloaded:
                # Its copy can serve others once fetched.
                self.fetch_ready[(st.name, key)] = opt.bind_s + opt.fetch_s
        for key in opt.loaded:
            if key not in st.view.keys:
                self.gained.setdefault(key, {})[st.name] = None
                if st.free_slots > 0 and key in self.free_memo:
                    self.free_memo[key][st.name] = None
        if st.free_slots <= 0:
            self._drop_free(st)
        else:
            heapq.heappush(self.cold_heap, (self._cold_rank(st), st.name, st.version))


def _age_s(job: JobView, now: float) -> float:
    return max(0.0, now - job.created_at)


def _busy_times(view: AgentView, settings: PlacementSettings) -> list[float]:
    """Heap of the times at which the agent's bound jobs finish (never 0)."""
    free = view.free_slots if view.free_slots > 0 else 0
    bound = max(0, view.slots + max(0, view.queue_slots) - free)
    remaining = sorted(r if r > 1e-3 else 1e-3 for r in view.running_remaining_s)[:bound]
    remaining += [settings.default_remaining_s] * (bound - len(remaining))
    if not remaining and free == 0:
        remaining = [settings.default_remaining_s]
    return remaining  # sorted, hence a valid heap


def _start_wait(busy: list[float], gen_slots: int) -> float:
    """When one more job gets a generation slot: with `n` jobs bound, after the
    `n - gen_slots + 1`-th of them finishes."""
    n = len(busy)
    if n < gen_slots:
        return 0.0
    if n == gen_slots:
        return busy[0]
    return heapq.nsmallest(n - gen_slots + 1, busy)[-1]


def _first_free_s(view: AgentView, settings: PlacementSettings) -> float:
    """Lower bound of the wait on an untouched agent, without building its state."""
    return _start_wait(_busy_times(view, settings), max(1, view.slots))


def _vram_free(view: AgentView) -> float:
    # An agent that does not report a VRAM capacity is not limited by it.
    return math.inf if view.vram_capacity_bytes is None else max(0, view.vram_free_bytes)


def _disk_free(view: AgentView) -> float:
    return math.inf if view.disk_capacity_bytes is None else max(0, view.disk_free_bytes)


def _gb(size_bytes: float) -> str:
    return f"{size_bytes / 1e9:.1f} GB"


def _reason(opt: _Option) -> str:
    if opt.tier is not Tier.MISS:
        where = f"checkpoint {opt.tier.value}"
    elif opt.loaded and opt.loaded[0] in opt.from_peers:
        where = "checkpoint from a peer"
    else:
        where = "checkpoint not cached"
    parts = [where]
    if opt.load_s > 0:
        parts.append(f"load {opt.load_s:.1f}s")
    if opt.evicts:
        parts.append(f"evicts {len(opt.evicts)} ({opt.evict_s:.1f}s)")
    return ", ".join(parts)
