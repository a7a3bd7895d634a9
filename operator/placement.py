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
from typing import Protocol

from stoker.userank import DEFAULT_HALF_LIFE_S, add_use

__all__ = [
    "AgentView",
    "ArtifactInfo",
    "Binding",
    "FleetIndex",
    "JobView",
    "PassObserver",
    "PlacementError",
    "PlacementPlan",
    "PlacementSettings",
    "Tier",
    "Unplaceable",
    "Waiting",
    "effective_priority",
    "count_demand",
    "head_start_s",
    "in_queue_order",
    "job_order_key",
    "open_pass",
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
    can_download: bool = True
    """False while the agent reports a fault of its cache volume (full or failing): it takes
    only jobs whose artifacts it already holds on disk."""
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
    _first_free: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of (default remaining seconds, the wait for one more job) (see `_first_free_s`)."""
    _victims: dict[bool, tuple[list[object], tuple[tuple[float, str, int, float], ...]]] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of the eviction victims of each tier and what they were valued with (see `_Fleet._victims`)."""
    _cold_rank: tuple[object, tuple[int, ...] | None, tuple[str, ...], float] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of the agent's rank for a cold load (see `_Fleet._cold_rank`)."""
    _committed: tuple[object, object, int] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of the disk the agent has promised (see `_Fleet._committed_bytes`) and the sizes and
    settings it was counted with."""
    _state: tuple[object, ...] | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of the settings and the figures a pass's virtual state of the agent starts from (see `_Agent`)."""

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
    overrun_s: float = 0.0
    """Seconds by which the start time promised to this job, when it was left waiting for a busy
    agent, has already passed (see `stoker.operator.planner`). Waiting for any busy agent costs that
    much more: the estimates it waited on have proved too low by at least that."""

    _artifact_keys: tuple[str, ...] | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    """Memo of `artifact_keys` (the view is immutable)."""

    @property
    def artifact_keys(self) -> tuple[str, ...]:
        """Checkpoint first, then LoRAs and VAE, without duplicates."""
        keys = self._artifact_keys
        if keys is None:
            listed = [self.model, *self.loras]
            if self.vae is not None:
                listed.append(self.vae)
            keys = tuple(dict.fromkeys(listed))
            object.__setattr__(self, "_artifact_keys", keys)
        return keys


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
    peer_weight: float = 8.0
    """Cost charged per second of fetching from another agent, relative to a second of waiting
    (1: its transfer time only). A fetch from a peer takes no bytes from a source, but the copy
    it makes takes room on a disk from a model the fleet may hold nowhere else; priced at its
    time alone, placement spreads copies and the sources see more bytes (BENCHMARKS.md, fleet
    simulation with peers: of the weights tried on both of its traces, 3 to 15, only 8 left
    neither source bytes nor p95 start worse than the fleet without peers on either)."""
    evict_cold_weight: float = 0.1
    """Share of a victim's re-fetch time charged when nothing suggests it is needed."""
    evict_use_weight: float = 0.1
    """Added per recent use of the victim (its decayed use count from `disk_rank_s`, up to
    `evict_use_cap`): a model in steady use costs more to lose than a one-off."""
    evict_use_cap: float = 8.0
    victim_half_life_s: float = DEFAULT_HALF_LIFE_S
    """Decay of a use when valuing victims by `AgentView.disk_rank_s`; the agents' own (`stoker.userank`)."""
    victim_clock_step_s: float = 60.0
    """Victims are valued at `now` rounded down to a multiple of this: a use loses under 1 % of
    its weight in a minute (with the 2 h half-life), and plans made a second apart then value
    victims alike, so a planner that keeps outcomes between passes (`stoker.operator.planner`)
    need not redo them every pass."""
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
    """Most free holders of a job's artifacts evaluated per job (best tier first, then by name), and
    most busy holders of its checkpoint considered for waiting (shortest wait first). With more busy
    holders than twice that, the first ones found in fleet order are considered."""
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
        for name in ("aging_per_s", "max_head_start_s", "victim_half_life_s", "victim_clock_step_s"):
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
            demand = count_demand(jobs) if isinstance(jobs, Sequence) else {}
    else:
        pending = jobs if isinstance(jobs, Sequence) else tuple(jobs)
        job_list = in_queue_order(pending, settings)
        if demand is None:
            demand = count_demand(pending)
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


class PassObserver(Protocol):
    """What a planner with memory (`stoker.operator.planner`) learns about each placement in a
    pass: everything outside the job itself that the outcome was computed from."""

    def agent(self, name: str) -> None:
        """The placement read agent `name` in full (its view and what earlier jobs of the pass did to it)."""

    def option(self, name: str, option: _Option | None) -> None:
        """It weighed running the job on agent `name`, read in full, and got `option` (None: no fit)."""

    def bound(self, cost_s: float) -> None:
        """It skipped options because none of them could cost less than `cost_s`."""

    def floor(self, name: str, floor_s: float | None) -> None:
        """It did not weigh agent `name`, read in full: its option costs at least `floor_s` (None: no fit)."""

    def fact(self, name: str, what: str, arg: str, value: object) -> None:
        """It read one fact of agent `name`: its tier of `arg` ("tier") or its wait for a slot ("wait")."""

    def holders(self, key: str, names: Iterable[str]) -> None:
        """It depended on which agents hold `key`, and on whether each of `names` has a free slot."""

    def tiers(self, key: str, tiers: list[tuple[str, Tier | None]]) -> None:
        """It read the tier of `key` of each agent named (a `fact` of each)."""

    def waits(self, waits: list[tuple[str, float]]) -> None:
        """It read the wait for a slot of each agent named (a `fact` of each)."""

    def victims(self, name: str, vram: bool, keys: tuple[str, ...], decays: bool) -> None:
        """It valued eviction victims `keys` on agent `name` (by demand, and by the victim clock when `decays`)."""

    def whole_fleet(self) -> None:
        """It read something of every agent."""

    def free_candidates(self, names: tuple[str, ...]) -> None:
        """It weighed the free holders `names` (up to `holder_candidates` of them, best tier first)."""

    def busy_candidates(self, count: int, cut: tuple[str, ...] | None) -> None:
        """It found `count` busy holders of the checkpoint (up to twice `holder_candidates`); `cut`:
        their names, when it stopped looking at that limit (then which ones depends on the order)."""

    def cold(self, picked: tuple[str, ...]) -> None:
        """It took `picked` from the ranking of all free agents for a cold load (see `_Fleet.cold_pick`)."""

    def truncated(self) -> None:
        """It left out busy holders beyond `holder_candidates` (by their waits)."""


def open_pass(
    agents: Sequence[AgentView],
    artifacts: Mapping[str, ArtifactInfo],
    *,
    now: float,
    demand: Mapping[str, int],
    settings: PlacementSettings,
    index: FleetIndex,
) -> _Fleet:
    """The virtual fleet of one pass, for a caller that places jobs one at a time (a planner with
    memory): `place(job, now=now)` each job in `job_order_key` order while `free_total > 0`,
    or `replay(job_key, effects)` a job's remembered placement. `plan_placement` is this loop."""
    return _Fleet(agents, artifacts, demand, settings, index, now=now)


# --- internals -------------------------------------------------------------------


def in_queue_order(jobs: Sequence[JobView], settings: PlacementSettings) -> Iterator[JobView]:
    """`jobs` in `job_order_key` order, lazily: a heap costs O(n) up front and O(log n)
    per job taken, where a full sort would cost O(n log n) even when a pass binds few."""
    heap = [(*job_order_key(j, settings=settings), i) for i, j in enumerate(jobs)]
    heapq.heapify(heap)
    while heap:
        yield jobs[heapq.heappop(heap)[3]]


def count_demand(jobs: Iterable[JobView]) -> dict[str, int]:
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
        "victims", "version", "ranks", "can_download", "log", "peers", "peer",
    )

    def __init__(self, view: AgentView, settings: PlacementSettings, committed_bytes: int = 0) -> None:
        self.view = view
        self.name = view.name
        self.vram = view.vram
        self.ram = view.ram
        self.disk = view.disk
        self.downloading = view.downloading
        self.in_use = view.in_use
        self.held_hot = view.held_hot
        self.peers = view.serves_peers
        # A pass builds a state for most agents it looks at, and a view lives for many passes:
        # what the state starts from is worked out once per view (and settings).
        base = view._state
        if base is None or base[0] is not settings:
            base = (settings, view.held | view.preloaded, _vram_free(view), _disk_free(view),
                    view.free_slots if view.free_slots > 0 else 0, max(1, view.slots), tuple(_busy_times(view, settings)),
                    view.download_bps or settings.default_download_bps,
                    view.disk_to_gpu_bps or settings.default_disk_to_gpu_bps,
                    view.ram_to_gpu_bps or settings.default_ram_to_gpu_bps,
                    view.peer_bps or settings.default_peer_bps)
            object.__setattr__(view, "_state", base)
        (_, self.pinned_disk, self.vram_free, disk_free, self.free_slots, self.gen_slots, busy,
         self.dl, self.d2g, self.r2g, self.peer) = base
        self.disk_free = max(0.0, disk_free - committed_bytes) if committed_bytes else disk_free
        self.busy: list[float] = list(busy)
        """Heap of the times at which the bound jobs finish."""
        self.victims: dict[bool, tuple[tuple[float, str, int, float], ...]] = {}
        """Per tier: (order, key, size, cost) of the evictable residents; disk costs before the duplicate discount."""
        self.version = 0
        self.ranks: Mapping[str, float] = view.disk_rank_s
        self.can_download = view.can_download
        self.log: tuple[tuple[str, str, float], ...] = ()
        """What jobs earlier in the pass did to this agent: (job key, what, value) in order. With
        the view it was copied from, it determines the agent's virtual state (see `_Fleet.log_of`)."""

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
    start_s: float = field(init=False, repr=False, compare=False)
    """When the job would start (the download overlaps the wait, the load does not)."""
    cost_s: float = field(init=False, repr=False, compare=False)
    """What placement minimises: the start, what the evictions cost, and the download penalty."""

    def __post_init__(self) -> None:
        # Worked out once: every comparison between options reads them.
        self.start_s = max(self.wait_s, self.bind_s + self.fetch_s) + self.load_s - self.fetch_s
        self.cost_s = self.start_s + self.evict_s + self.fetch_penalty_s

    @property
    def evicts(self) -> tuple[str, ...]:
        return self.evict_vram + self.evict_disk

    def signature(self) -> tuple[object, ...]:
        """Every field but the agent state (what a placement decides from)."""
        return (self.wait_s, self.bind_s, self.fetch_s, self.load_s, self.evict_s, self.tier, self.evict_vram,
                self.evict_disk, self.vram_add, self.disk_add, self.evicted_vram_bytes, self.evicted_disk_bytes,
                self.loaded, self.downloaded, self.fetch_penalty_s)


def _links(v: AgentView) -> tuple[tuple[str, float | None], ...]:
    links = (("dl", v.download_bps), ("d2g", v.disk_to_gpu_bps))
    return (*links, ("peer", v.peer_bps)) if v.serves_peers else links


def _carry_victims(old: AgentView, new: AgentView) -> None:
    """Let a new view of an agent keep the victims its last view worked out for a tier whose
    residents, pins, ranks and speeds are unchanged (what `_Fleet._victims` values them from
    beyond what `_Fleet._victim_memo` checks): an agent reports often (a slot, a rank), its
    residents change seldom, and valuing them is much of a pass."""
    memo = old._victims
    if memo is None or new._victims is not None or old.name != new.name:
        return
    kept: dict[bool, tuple[list[object], tuple[tuple[float, str, int, float], ...]]] = {}
    if False in memo and (old.disk == new.disk and old.disk_rank_s == new.disk_rank_s
                          and old.download_bps == new.download_bps
                          and old.held == new.held and old.preloaded == new.preloaded):
        kept[False] = memo[False]
    if True in memo and (old.vram == new.vram and old.ram == new.ram and old.disk == new.disk
                         and old.held_hot == new.held_hot
                         and (old.download_bps, old.disk_to_gpu_bps, old.ram_to_gpu_bps)
                         == (new.download_bps, new.disk_to_gpu_bps, new.ram_to_gpu_bps)):
        kept[True] = memo[True]
    if kept:
        object.__setattr__(new, "_victims", kept)


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
        self.free_slots = 0
        """Free slots of the free agents."""
        self.links: Counter[tuple[str, float | None]] = Counter()
        """("dl" | "d2g" | "peer", reported speed) -> free agents reporting it: the fastest free link,
        without walking every free agent on every pass."""

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
                _carry_victims(prev[i], agents[i])
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
                self._count_free(v, 1)

    def _count_free(self, v: AgentView, n: int) -> None:
        self.free_slots += n * v.free_slots
        links = self.links
        for link in _links(v):
            links[link] += n
            if not links[link]:
                del links[link]

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
            if self.free.pop(v.name, 0) is None:
                self._count_free(v, -1)


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
        self.victim_now = math.floor(now / settings.victim_clock_step_s) * settings.victim_clock_step_s
        """The clock victims are valued on (see `PlacementSettings.victim_clock_step_s`)."""
        agent_list = agents if isinstance(agents, Sequence) else tuple(agents)
        self.index = index
        if index is not None:
            index.sync(agent_list)
            self.eligible: list[AgentView] = []
            self.views = index.views
            self.free_names: dict[str, None] = dict(index.free)
            self.free_total = index.free_slots
            links: Iterable[tuple[str, float | None]] = index.links
        else:
            self.eligible = [v for v in agent_list if v.ready and not v.cordoned]
            self.views = {v.name: v for v in self.eligible}
            if len(self.views) != len(self.eligible) or len({v.name for v in agent_list}) != len(agent_list):
                raise PlacementError("an agent name appears twice in one placement pass; pass each agent once")
            free_views = [v for v in self.eligible if v.free_slots > 0]
            self.free_names = {v.name: None for v in free_views}
            self.free_total = sum(v.free_slots for v in free_views)
            links = {link for v in free_views for link in _links(v)}
        self.states: dict[str, _Agent] = {}
        self.scan_memo: dict[str, list[str]] = {}
        self.gained: dict[str, dict[str, None]] = {}
        """Keys loaded during the pass onto agents whose view did not have them."""
        self.free_memo: dict[str, dict[str, None]] = {}
        """Per artifact: the agents holding it that still have a free slot (kept current)."""
        # Fastest links among free agents: a lower bound of any cold load (see `place`).
        defaults = {"dl": settings.default_download_bps, "d2g": settings.default_disk_to_gpu_bps,
                    "peer": settings.default_peer_bps}
        fastest: dict[str, float] = {}
        for kind, bps in links:
            speed = bps or defaults[kind]
            if speed > fastest.get(kind, -math.inf):
                fastest[kind] = speed
        self.max_dl, self.max_d2g = fastest.get("dl", 1.0), fastest.get("d2g", 1.0)
        self.max_peer = fastest.get("peer", 0.0)
        self._cold_heap: list[tuple[float, str, int]] | None = None
        """Free agents by `_cold_rank`, built when a job first needs cold candidates (see `_cold`)."""
        self.cold_log: tuple[tuple[str, str, str], ...] = ()
        """(job key, what, agent) of every binding and reservation so far in the pass: what
        changed the free agents after the pass began."""
        self.observer: PassObserver | None = None
        self.effects: list[tuple[str, str, float]] = []
        """(agent, what, value) of what the job being placed did to the fleet: for `replay` (a job
        that waits), or to tell what changed (a binding)."""
        self.peer_memo: dict[str, tuple[tuple[float, str], ...]] = {}
        """Per artifact: the two soonest (seconds until a verified copy can be served, agent) among agents
        in the peer tier that hold or fetch it (kept current as the pass assigns)."""
        self.fetch_ready: dict[tuple[str, str], float] = {}
        """(agent, artifact) -> seconds until the copy it started fetching in this pass is complete."""

    # -- state access

    def state(self, name: str) -> _Agent:
        if self.observer is not None:
            self.observer.agent(name)
        st = self.states.get(name)
        if st is None:
            st = self._new_state(name)
        return st

    def _new_state(self, name: str) -> _Agent:
        view = self.views[name]
        st = self.states[name] = _Agent(view, self.settings, self._committed_bytes(view))
        return st

    def _committed_bytes(self, view: AgentView) -> int:
        """Disk the agent has promised but not reserved yet: the downloads its bound jobs (in use)
        and its held copies still need. Its report counts only what it wrote or reserved, so
        without this a second job would be sent into room the first will take."""
        if view.disk_capacity_bytes is None:
            return 0
        memo = view._committed
        if memo is not None and memo[0] is self.sizes and memo[1] is self.settings:
            return memo[2]  # the same view between passes: counted once
        have = view.disk | view.preloaded
        committed = sum(self.size(k) for k in sorted((view.in_use | view.held) - have) if k not in view.downloading)
        object.__setattr__(view, "_committed", (self.sizes, self.settings, committed))
        return committed

    def all_failed(self, failed: frozenset[str]) -> bool:
        """Whether every eligible agent has failed this job (so none is excluded any more)."""
        views = self.views
        return len(failed) >= len(views) and all(name in failed for name in views)

    def log_of(self, name: str) -> tuple[tuple[str, str, float], ...]:
        """What earlier jobs of this pass did to agent `name` (empty when nothing)."""
        st = self.states.get(name)
        return () if st is None else st.log

    def gained_of(self, key: str) -> tuple[str, ...]:
        """Agents that got `key` earlier in this pass (bindings that load it)."""
        gained = self.gained.get(key)
        return () if not gained else tuple(gained)

    def _cold(self) -> list[tuple[float, str, int]]:
        """The heap of free agents ranked for a cold load, built on first use. Free agents change
        only through bindings (which push fresh entries), so building it late gives the entries
        an early build would still hold valid."""
        heap = self._cold_heap
        if heap is None:
            observer, self.observer = self.observer, None  # building it is not a read by the job at hand
            try:
                heap = []
                for n in self.free_names:
                    rank = self._remembered_cold_rank(n)
                    if rank is None:
                        st = self.state(n)
                        heap.append((self._cold_rank(st), n, st.version))
                    else:
                        heap.append((rank, n, 0))
            finally:
                self.observer = observer
            heapq.heapify(heap)
            self._cold_heap = heap
        return heap

    def _remembered_cold_rank(self, name: str) -> float | None:
        """The cold rank an untouched agent's view remembers, when what it was worked out from is
        unchanged (see `_cold_rank`); None otherwise. A large fleet is mostly free agents nobody
        touched, and in steady state their disks are full: ranking them must not build each one's
        state on every pass."""
        if name in self.states:
            return None
        view = self.views[name]
        memo = view._cold_rank
        if memo is None:
            return None
        if memo[0] is not self.settings:
            # It needed room: its disk victims must be valued alike (the same settings and sizes,
            # hence the same committed bytes and free disk) and, in rank order, those it valued
            # must be as much in demand.
            ranked = bool(view.disk_rank_s)
            if self._victim_memo(view, vram=False, ranked=ranked)[0] is not memo[0] or (
                    ranked and memo[1] != self._capped_demand(memo[2])):
                return None
            return memo[3]
        if view.disk_capacity_bytes is not None:
            committed = view._committed
            if committed is None or committed[0] is not self.sizes or committed[1] is not self.settings:
                return None
        return memo[3]

    def size(self, key: str) -> int:
        info = self.sizes.get(key)
        return self.settings.unknown_size_bytes if info is None else info.size_bytes

    def _cold_rank(self, st: _Agent) -> float:
        """Job-independent estimate of loading a reference-sized model on a free agent: the
        queue wait, the transfer, and what making room would evict (in steady state every
        disk is full, and the value of the victims is what tells agents apart). Kept on the
        agent's view while its disk victims are valued alike."""
        s = self.settings
        if st.version != 0:
            return self._cold_rank_of(st)[0]
        view = st.view
        need_room = st.disk_free < s.reference_size_bytes
        ranked = need_room and bool(st.ranks)
        basis: object = self._victim_memo(view, vram=False, ranked=ranked)[0] if need_room else s
        remembered = view._cold_rank
        if remembered is not None and remembered[0] is basis and (
                not ranked or remembered[1] == self._capped_demand(remembered[2])):
            return remembered[3]
        rank, walked = self._cold_rank_of(st)
        if need_room:
            memo = view._victims
            basis = memo[False][0] if memo is not None and False in memo else None
        if basis is not None:
            object.__setattr__(view, "_cold_rank", (basis, self._capped_demand(walked) if ranked else None, walked, rank))
        return rank

    def _capped_demand(self, keys: tuple[str, ...]) -> tuple[int, ...]:
        cap = self.settings.evict_demand_cap
        return tuple(min(self.demand.get(k, 0), cap) for k in keys)

    def _cold_rank_of(self, st: _Agent) -> tuple[float, tuple[str, ...]]:
        """The rank, and the disk residents it valued."""
        s = self.settings
        ref = s.reference_size_bytes
        rank = st.start_wait_s() + ref / st.dl + ref / st.d2g
        if st.vram_free < ref:
            rank += s.evict_cold_weight * ref / st.d2g
        walked: tuple[str, ...] = ()
        if st.disk_free < ref:
            # Without the duplicate discount: counting copies for every free agent would cost a
            # fleet-wide index on every pass; the exact evaluation of a candidate applies it.
            got = self._evict(st, vram=False, need=int(ref - st.disk_free), exclude=(), ignore_in_use=False,
                              duplicates=False)
            ranked = self._victims(st, vram=False)
            walked = tuple(k for _, k, _, _ in (ranked[:got[3]] if got is not None else ranked))
            rank += got[0] if got is not None else ref / st.dl
        return rank, walked

    def tier_of(self, name: str, key: str) -> Tier | None:
        st = self.states.get(name)
        tier = st.tier(key) if st is not None else _view_tier(self.views[name], key)
        if self.observer is not None:
            self.observer.fact(name, "tier", key, tier)
        return tier

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
        """The `limit` smallest (tier rank, name) of agents with a free slot that hold `key`."""
        if self.observer is not None:
            self.observer.holders(key, self.holder_names(key))
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
        tiers: list[tuple[str, Tier | None]] | None = [] if self.observer is not None else None
        states, views = self.states, self.views
        for name in free_dict:
            if name in failed:
                continue
            st = states.get(name)
            t = st.tier(key) if st is not None else _view_tier(views[name], key)
            if tiers is not None:
                tiers.append((name, t))
            if t is not None:
                out.append((_TIER_RANK[t], name))
        if self.observer is not None and tiers is not None:
            self.observer.tiers(key, tiers)
        # The best `limit` by tier then name: which ones does not depend on the order agents were indexed in.
        return heapq.nsmallest(limit, out) if len(out) > limit else out

    def busy_holders(self, key: str, limit: int, failed: frozenset[str]) -> list[tuple[float, int, str]]:
        """Up to `limit` (wait lower bound, tier rank, name) of busy agents that hold `key`, the first
        found in fleet order: a popular checkpoint has thousands of holders in a large fleet, and
        reading every one's wait for every job costs more than the choice among them gains."""
        out: list[tuple[float, int, str]] = []
        free = self.free_names
        observer = self.observer
        tiers: list[tuple[str, Tier | None]] | None = None
        waits: list[tuple[str, float]] | None = None
        if observer is not None:
            observer.holders(key, self.holder_names(key))
            tiers, waits = [], []
        states, views = self.states, self.views
        for name in self.holder_names(key):
            if name in free or name in failed:
                continue
            st = states.get(name)
            t = st.tier(key) if st is not None else _view_tier(views[name], key)
            if tiers is not None:
                tiers.append((name, t))
            if t is not None:
                wait = self._wait_of(name)
                if waits is not None:
                    waits.append((name, wait))
                out.append((wait, _TIER_RANK[t], name))
                if len(out) >= limit:
                    break
        if observer is not None and tiers is not None and waits is not None:
            observer.tiers(key, tiers)
            observer.waits(waits)
        return out

    def peer_ready_s(self, key: str, exclude: str) -> float | None:
        """Seconds until an agent other than `exclude` can serve a verified copy of `key` to a
        peer (0: it holds one now; more: it is fetching one), or None when none can."""
        observer = self.observer
        if observer is not None:
            observer.holders(key, self.holder_names(key))
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
                if observer is not None:
                    observer.agent(name)  # its copy's progress, and what the pass gave it to fetch
                return ready
        return None

    # -- one job

    def place(self, job: JobView, *, now: float) -> Binding | Waiting | Unplaceable:
        s = self.settings
        self.effects = []
        keys = job.artifact_keys
        arts = tuple((k, self.size(k)) for k in keys)
        total = sum(size for _, size in arts)
        aged = now - job.created_at > s.max_hot_wait_age_s
        if job.failed_agents and self.observer is not None:
            self.observer.whole_fleet()  # whether every agent failed the job depends on the whole fleet
        failed = self._failed(job)
        cap = s.holder_candidates
        free_cands, model_has_free_holder = self._free_candidates(keys, failed)
        if self.observer is not None:
            self.observer.free_candidates(tuple(free_cands))
        best: _Option | None = None
        for name in free_cands:
            best = self._better(best, arts, self.state(name), total, job.overrun_s)
        # Busy agents holding the checkpoint: waiting only pays off for the checkpoint
        # (LoRAs and VAEs load in well under a second), and only for a job not pending long.
        busy_cands = self.busy_holders(keys[0], 2 * cap, failed) if not aged else []
        busy_cands.sort()
        if self.observer is not None:
            # Past the limit, which busy holders were found depends on the order agents are indexed in.
            cut = tuple(sorted(name for _, _, name in busy_cands)) if len(busy_cands) >= 2 * cap else None
            self.observer.busy_candidates(len(busy_cands), cut)
            if len(busy_cands) > cap:
                self.observer.truncated()
        for wait_lb, _, name in busy_cands[:cap]:
            if best is not None and wait_lb >= best.cost_s:
                if self.observer is not None:
                    self.observer.bound(wait_lb)
                break  # sorted by wait: no busy agent left can beat the best
            best = self._better(best, arts, self.state(name), total, job.overrun_s)
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
            if self.observer is not None:
                self.observer.cold(tuple(cold))
            for name in cold:
                best = self._better(best, arts, self.state(name), total, job.overrun_s)
        elif self.observer is not None:
            self.observer.bound(cold_floor)
        if best is None:
            if aged:
                reserved = self._reserve(job, arts, total, [*free_cands, *cold])
                if reserved is not None:
                    return reserved
            largest = max(arts, key=lambda a: a[1])
            budgets = [v.disk_capacity_bytes for v in self.views.values() if v.disk_capacity_bytes is not None]
            if budgets and len(budgets) == len(self.views) and largest[1] > max(budgets):
                return Unplaceable(job.key, f"{largest[0]} ({_gb(largest[1])}) is larger than every Ready agent's "
                                            f"disk budget (largest {_gb(max(budgets))})")
            if not free_cands and not busy_cands and not cold:
                return Unplaceable(job.key, f"no Ready agent with a free slot can fit {_gb(total)} and has not failed this job")
            return Unplaceable(job.key, f"no candidate agent can fit or make room for {_gb(total)} (models in use or held)")
        run_s = job.expected_run_s if job.expected_run_s is not None else s.default_run_s
        st = best.agent
        if best.bind_s > 0:
            waiting, done_s = self.waiting_on(job, best)
            # Reserve the agent's next free slot so later jobs in this pass see the queue.
            self._apply_wait(st, job.key, done_s)
            return waiting
        self._commit(job, best, run_s)
        return Binding(
            job.key, st.name, best.cost_s, best.tier, _reason(best),
            load_s=best.load_s, evict_s=best.evict_s, evicts=best.evicts, wait_s=best.wait_s,
        )

    def _free_candidates(self, keys: tuple[str, ...], failed: frozenset[str]) -> tuple[dict[str, None], bool]:
        """Free agents that hold some of the job's artifacts (best tier first), and whether one of
        them holds its checkpoint."""
        cap = self.settings.holder_candidates
        free_cands: dict[str, None] = {}
        model_has_free_holder = False
        for key in keys:
            if len(free_cands) >= cap:
                break
            found = sorted(self.free_holders(key, 2 * cap, failed))
            model_has_free_holder = model_has_free_holder or (key == keys[0] and bool(found))
            for _, name in found[: cap - len(free_cands)]:
                free_cands[name] = None
        return free_cands, model_has_free_holder

    def _failed(self, job: JobView) -> frozenset[str]:
        """The agents placing `job` leaves out."""
        failed = job.failed_agents
        if failed and self.all_failed(failed):
            # Each eligible agent failed it once (retryably: other failures end the job). Rather
            # than wait for an agent that never comes, try them again: the attempts bound it.
            return frozenset()
        return failed

    def free_candidates(self, job: JobView) -> tuple[str, ...]:
        """The free holders placing `job` would now weigh (see `PassObserver.free_candidates`)."""
        return tuple(self._free_candidates(job.artifact_keys, self._failed(job))[0])

    def busy_candidates(self, job: JobView) -> tuple[str, ...]:
        """The busy holders of its checkpoint placing `job` would now find, by name (see
        `PassObserver.busy_candidates`)."""
        found = self.busy_holders(job.artifact_keys[0], 2 * self.settings.holder_candidates, self._failed(job))
        return tuple(sorted(name for _, _, name in found))

    def cold_pick(self, job: JobView) -> tuple[str, ...]:
        """The free agents placing `job` would now take from the cold ranking, when it looks
        there at all (see `PassObserver.cold`)."""
        keys = job.artifact_keys
        failed = self._failed(job)
        free_cands, _ = self._free_candidates(keys, failed)
        cold: dict[str, None] = {}
        self._add_cold_candidates(cold, free_cands, failed, sum(self.size(k) for k in keys))
        return tuple(cold)

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
        s = self.settings
        wait = max(st.busy) if st.busy else s.default_remaining_s
        # The job takes the agent once those jobs finish: later jobs in the pass see it busy.
        run_s = job.expected_run_s if job.expected_run_s is not None else s.default_run_s
        self._apply_reserve(st, job.key, wait + best.load_s + run_s)
        return Waiting(
            job.key, st.name, wait, best.cost_s + wait,
            f"pending {_age_s(job, self.now):.0f}s; agent {st.name} reserved until the jobs pinning what must make room finish",
            reserved=True,
        )

    def _better(self, best: _Option | None, arts: tuple[tuple[str, int], ...], st: _Agent, total: int,
                overrun_s: float = 0.0) -> _Option | None:
        if best is not None:
            # Bound first: an option whose cost before evictions already exceeds the best cannot win,
            # and valuing evictions is most of the work.
            floor = self._floor(arts, st, total, overrun_s)
            if floor is None or floor > best.cost_s:
                if self.observer is not None:
                    self.observer.floor(st.name, floor)
                return best
        opt = self._option(arts, st, total, overrun_s)
        if self.observer is not None:
            self.observer.option(st.name, opt)
        if opt is None:
            return best
        if best is None or (opt.cost_s, opt.agent.name) < (best.cost_s, best.agent.name):
            return opt
        return best

    def _option(self, arts: tuple[tuple[str, int], ...], st: _Agent, total: int,
                overrun_s: float) -> _Option | None:
        """Running the job on `st` (or None: it does not fit)."""
        if not self._fits(st.view, total):
            return None
        bind = st.bind_wait_s()
        if bind > 0:
            bind += overrun_s  # waiting broke a promise to this job: wait that much longer
        # It cannot start before it is bound (an agent reserved in this pass has fewer jobs than slots).
        return self._evaluate(arts, st, max(st.start_wait_s(), bind), bind, ignore_in_use=bind > 0)

    def waiting_on(self, job: JobView, opt: _Option) -> tuple[Waiting, float]:
        """The outcome of `job` waiting for the busy agent of `opt`, and when the job would be done there."""
        run_s = job.expected_run_s if job.expected_run_s is not None else self.settings.default_run_s
        name = opt.agent.name
        return Waiting(
            job.key, name, opt.wait_s, opt.cost_s,
            f"waiting {opt.wait_s:.1f}s for busy agent {name} ({opt.tier} hit) is cheaper than loading elsewhere",
        ), opt.start_s + run_s

    def option_for(self, job: JobView, name: str) -> _Option | None:
        """The option of running `job` on agent `name` as the pass stands (None: it does not fit);
        its `cost_s` and `signature()` are what placing the job weighs."""
        arts = tuple((k, self.size(k)) for k in job.artifact_keys)
        return self._option(arts, self.state(name), sum(size for _, size in arts),
                            job.overrun_s)

    def wait_lower_bound(self, name: str) -> float:
        """Seconds until agent `name` could start one more job, as far as the pass knows."""
        return self._wait_lower_bound(name)

    def _wait_lower_bound(self, name: str) -> float:
        wait = self._wait_of(name)
        if self.observer is not None:
            self.observer.fact(name, "wait", "", wait)
        return wait

    def _wait_of(self, name: str) -> float:
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
        heap = self._cold()
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

    def option_floor(self, job: JobView, name: str) -> float | None:
        """A lower bound of the cost of running `job` on agent `name` (its option without what
        loading would evict), cheap to compute; None: it does not fit."""
        arts = tuple((k, self.size(k)) for k in job.artifact_keys)
        return self._floor(arts, self.state(name), sum(size for _, size in arts),
                           job.overrun_s)

    def _floor(self, arts: tuple[tuple[str, int], ...], st: _Agent, total: int,
               overrun_s: float) -> float | None:
        if not self._fits(st.view, total):
            return None
        bind = st.bind_wait_s()
        if bind > 0:
            bind += overrun_s
        wait = max(st.start_wait_s(), bind)
        loads = self._loads(arts, st)
        if loads is None:
            return None
        load, fetch, _, _, penalty, _, _, _, _ = loads
        return max(wait, bind + fetch) + load - fetch + penalty

    def _loads(
        self, arts: tuple[tuple[str, int], ...], st: _Agent
    ) -> tuple[float, float, int, int, float, list[str], list[str], Tier, list[str]] | None:
        """(load, fetch, VRAM needed, disk needed, download penalty, loaded, downloaded, checkpoint tier,
        downloaded from peers); None when the agent would have to download something but cannot (a full or failing disk)."""
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
            elif not st.can_download:
                return None  # its disk is full or failing: only what it holds already
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
        return load, fetch, vram_need, disk_need, penalty, loaded, downloaded, tier, from_peers

    def _evaluate(
        self, arts: tuple[tuple[str, int], ...], st: _Agent, wait: float, bind: float, *, ignore_in_use: bool
    ) -> _Option | None:
        loads = self._loads(arts, st)
        if loads is None:
            return None  # its disk is full or failing: only what it holds already
        load, fetch, vram_need, disk_need, penalty, loaded, downloaded, tier, from_peers = loads
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
            cost, evict_vram, ev_vram, _ = got
            evict_s += cost
        if disk_need > st.disk_free:
            got = self._evict(st, vram=False, need=disk_need - st.disk_free, exclude=set(k for k, _ in arts),
                              ignore_in_use=ignore_in_use)
            if got is None:
                return None
            cost, evict_disk, ev_disk, _ = got
            evict_s += cost
        return _Option(
            st, wait, bind, fetch, load, evict_s, tier, tuple(evict_vram), tuple(evict_disk),
            vram_add=vram_need, disk_add=disk_need,
            evicted_vram_bytes=ev_vram, evicted_disk_bytes=ev_disk,
            loaded=tuple(loaded), downloaded=tuple(downloaded), fetch_penalty_s=penalty, from_peers=tuple(from_peers),
        )

    def _victims(self, st: _Agent, *, vram: bool) -> tuple[tuple[float, str, int, float | None], ...]:
        """Evictable residents of a tier in the order the agent evicts them: (order, key, size, cost).

        Disk victims follow the agent's own rank when it reports one (`disk_rank_s`), and
        are cheapest per byte first otherwise. A victim costs its re-fetch time times a
        weight: a little for any model, more per recent use and per pending job that
        wants it, much less when another agent also holds it. Disk victims in rank order
        carry, instead of their cost, the use part of their weight (None without a rank):
        their order does not depend on demand, and `_victim_cost` finishes the cost for
        the few that are looked at."""
        cached = st.victims.get(vram)
        if cached is not None:
            return cached
        s = self.settings
        ranked = not vram and bool(st.ranks)
        memo_key: list[object] | None = None
        if st.version == 0:
            # The agent as its view shows it: the view keeps its victims between passes while they are
            # valued alike (same settings, sizes and victim clock, and demand unless in rank order).
            memo_key, hit = self._victim_memo(st.view, vram=vram, ranked=ranked)
            if hit is not None:
                st.victims[vram] = hit
                return hit
        out: list[tuple[float, str, int, float | None]] = []
        if vram:
            for key in st.vram:
                size = self.size(key)
                refetch = size / (st.r2g if key in st.ram else st.d2g if key in st.disk else st.dl)
                weight = s.evict_cold_weight + s.evict_demand_weight * min(self.demand.get(key, 0), s.evict_demand_cap)
                if key in st.held_hot:
                    weight += s.evict_hot_target_weight
                cost = weight * refetch
                out.append((cost / max(1, size), key, size, cost))
        elif ranked:
            ranks = st.ranks
            for key in st.disk:
                if key in st.pinned_disk:
                    continue
                rank = ranks.get(key)
                use: float | None = None
                if rank is not None:
                    uses = 2.0 ** min(32.0, (rank - self.victim_now) / s.victim_half_life_s)
                    use = s.evict_use_weight * min(uses, s.evict_use_cap)
                out.append((-math.inf if rank is None else rank, key, self.size(key), use))
        else:
            for key in st.disk:
                if key in st.pinned_disk:
                    continue
                size = self.size(key)
                weight = s.evict_cold_weight + s.evict_demand_weight * min(self.demand.get(key, 0), s.evict_demand_cap)
                cost = weight * size / st.dl  # less for a duplicate: see `_evict`
                out.append((cost / max(1, size), key, size, cost))
        out.sort()
        result = tuple(out)
        st.victims[vram] = result
        if memo_key is not None:
            memo = st.view._victims
            if memo is None:
                memo = {}
                object.__setattr__(st.view, "_victims", memo)
            memo[vram] = (memo_key, result)
        return result

    def _victim_cost(self, st: _Agent, key: str, size: int, use: float | None) -> float:
        """The cost of evicting disk victim `key` (in rank order) from `st`: see `_victims`."""
        s = self.settings
        weight = s.evict_cold_weight + s.evict_demand_weight * min(self.demand.get(key, 0), s.evict_demand_cap)
        if use is not None:
            weight += use
        return weight * size / st.dl  # less for a duplicate: see `_evict`

    def _victim_memo(self, view: AgentView, *, vram: bool, ranked: bool
                     ) -> tuple[list[object], tuple[tuple[float, str, int, float | None], ...] | None]:
        """What the victims of an unchanged agent's tier are valued with beyond its view
        (settings, sizes, victim clock, and demand for each resident unless in rank order), and
        the victims its view remembers when they were valued with the same. The demand is kept
        in the order of the residents it was counted for (a later view of the same residents,
        see `_carry_victims`, may list them in another order)."""
        memo = view._victims
        hit = memo.get(vram) if memo is not None else None
        clock = self.victim_now if ranked else None
        demand = self.demand
        cap = self.settings.evict_demand_cap
        if hit is not None:
            key = hit[0]
            if key[0] is self.settings and key[1] is self.sizes and key[2] == clock:
                if ranked or key[3] is demand:
                    return key, hit[1]  # type: ignore[return-value]
                residents: tuple[str, ...] = key[5]  # type: ignore[assignment]
                wants = tuple(min(demand.get(k, 0), cap) for k in residents)
                if wants == key[4]:
                    key[3] = demand  # the same for these residents: compare by identity next time
                    return key, hit[1]  # type: ignore[return-value]
                return [self.settings, self.sizes, clock, demand, wants, residents], None
        if ranked:
            return [self.settings, self.sizes, clock, None, None, None], None
        residents = tuple(view.vram if vram else view.disk)
        wants = tuple(min(demand.get(k, 0), cap) for k in residents)
        return [self.settings, self.sizes, clock, demand, wants, residents], None

    def _evict(
        self, st: _Agent, *, vram: bool, need: int, exclude: Iterable[str], ignore_in_use: bool,
        duplicates: bool = True,
    ) -> tuple[float, list[str], int, int] | None:
        """(cost, victims, bytes freed, residents looked at) of making `need` bytes of room, or None."""
        cost = 0.0
        freed = 0
        victims: list[str] = []
        discount = self.settings.evict_duplicate_factor if duplicates and not vram else 1.0
        last = self.settings.evict_last_copy_weight if st.peers and duplicates and not vram else 1.0
        ranked = self._victims(st, vram=vram)
        by_rank = not vram and bool(st.ranks)
        observer = self.observer
        if observer is not None and not by_rank:
            # Ordered by cost, which the demand for every resident moves.
            observer.victims(st.name, vram, tuple(k for _, k, _, _ in ranked), False)
        walked = 0
        for _, key, size, c in ranked:
            walked += 1
            if key in exclude or (not ignore_in_use and key in st.in_use):
                continue
            if by_rank:
                c = self._victim_cost(st, key, size, c)
            assert c is not None
            # Counting copies costs a fleet lookup: done only for the victims actually taken.
            if discount != 1.0 or last != 1.0:
                cost += c * discount if self.copies(key) > 1 else c * last
            else:
                cost += c
            freed += size
            victims.append(key)
            if freed >= need:
                break
        if observer is not None and by_rank:
            # Ordered by the agent's ranks: only the residents walked were valued (by demand and clock).
            observer.victims(st.name, vram, tuple(k for _, k, _, _ in ranked[:walked]), True)
        return (cost, victims, freed, walked) if freed >= need else None

    def _drop_free(self, st: _Agent) -> None:
        """The agent has no free slot left: forget it as a free candidate."""
        self.free_names.pop(st.name, None)
        for key in st.view.keys | st.vram | st.disk:
            memo = self.free_memo.get(key)
            if memo is not None:
                memo.pop(st.name, None)

    def _commit(self, job: JobView, opt: _Option, run_s: float) -> None:
        st = opt.agent
        st.log += ((job.key, "bind", opt.start_s + run_s),)
        self.cold_log += ((job.key, "bind", st.name),)
        self.effects.append((st.name, "bind", opt.start_s + run_s))  # never replayed: the job leaves the queue
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
        elif self._cold_heap is not None:
            heapq.heappush(self._cold_heap, (self._cold_rank(st), st.name, st.version))

    # -- what a job does to the fleet, recorded so that a planner with memory can replay it

    def _apply_wait(self, st: _Agent, job_key: str, done_s: float, *, record: bool = True) -> None:
        """The job waits for `st`: it takes the agent's next slot, until `done_s`."""
        heapq.heapreplace(st.busy, done_s)
        st.log += ((job_key, "wait", done_s),)
        if record:
            self.effects.append((st.name, "wait", done_s))

    def _apply_reserve(self, st: _Agent, job_key: str, done_s: float, *, record: bool = True) -> None:
        """The job reserves `st` (see `_reserve`): its free slots are held back, and the job runs until `done_s`."""
        self.free_total -= st.free_slots
        st.free_slots = 0
        st.version += 1
        self._drop_free(st)
        heapq.heappush(st.busy, done_s)
        st.log += ((job_key, "reserve", done_s),)
        self.cold_log += ((job_key, "reserve", st.name),)
        if record:
            self.effects.append((st.name, "reserve", done_s))

    def replay(self, job_key: str, effects: Iterable[tuple[str, str, float]]) -> None:
        """Do to the fleet again what placing `job_key` did in an earlier pass whose inputs (as far
        as that placement read them) were the same: its outcome is the same too."""
        for name, what, value in effects:
            st = self.states.get(name)
            if st is None:
                st = self._new_state(name)  # as `state` builds it, without it counting as a read
            if what == "wait":
                self._apply_wait(st, job_key, value, record=False)
            elif what == "reserve":
                self._apply_reserve(st, job_key, value, record=False)
            else:
                raise PlacementError(f"cannot replay {what!r} for job {job_key!r}")


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
    return sorted(busy)[n - gen_slots]  # (an agent has a few slots: cheaper than heapq.nsmallest)


def _first_free_s(view: AgentView, settings: PlacementSettings) -> float:
    """Lower bound of the wait on an untouched agent, without building its state (kept on the view)."""
    memo = view._first_free
    if memo is not None and memo[0] == settings.default_remaining_s:
        return memo[1]
    wait = _start_wait(_busy_times(view, settings), max(1, view.slots))
    object.__setattr__(view, "_first_free", (settings.default_remaining_s, wait))
    return wait


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
