"""Discrete-event fleet simulation in virtual time.

Agents have a disk budget (accounted by the agent's real `DiskCacheState`), a RAM
tier and a VRAM tier (evicted by the agent's real `plan_eviction`), one download
link, and one GPU. A job bound to an agent has its missing artifacts downloaded in
the background while earlier jobs run (the agent prefetches for its next
`prefetch_depth` jobs); the GPU runs the first of those whose files are all present
(a job waiting for a download does not block ready ones behind it), loading missing
artifacts into VRAM from RAM or disk, then generating. Agents are interrupted as a Poisson process per
agent-hour; the control plane notices after `detect_s` (the lease grace) and puts
the agent's jobs back in the queue; a replacement pod with an empty cache (except
baked-in models) arrives after `replace_delay_s`.

Each agent fetches one file at a time, from the model source at `download_bytes_per_s`
or, for policies whose agents fetch from each other (`Policy.peer_fetch`), from a live
peer that holds a verified copy: at `peer_bytes_per_s`, limited by the holder's upload
cap (`peer_upload_bytes_per_s` shared by `peer_upload_slots` transfers at a time; a
fetch waits for a free slot). A file another agent is still fetching is taken from that
agent once its copy is complete (never a partial file), so concurrent misses of one
model fan out from the first copy. A holder that vanishes mid-transfer loses the fetch
its remaining bytes, which are resumed (HTTP Range) from another peer or the source.
Bytes are counted by origin (source or peer) and by why the fetching agent lacked the
file (`MissCause`).

Routing is a `Policy`: it is offered the pending jobs at every scheduling
opportunity and returns bindings. Push policies (load balancers) bind every job at
once to some agent's local queue; pull policies (Stoker) bind only into free slots
and leave the rest pending. The interruption schedule depends only on the seed, so
every policy faces the same failures.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stoker.sim import adapter
from stoker.sim.workload import Family, JobRequest, Trace

__all__ = [
    "AgentState",
    "Origin",
    "Transfer",
    "FleetConfig",
    "JobRecord",
    "MissCause",
    "Policy",
    "SimError",
    "SimResult",
    "Simulator",
    "Tier",
    "interruption_schedule",
    "simulate",
]

GB = 10**9


class SimError(Exception):
    """The simulation reached an impossible state (a bug, not a workload property)."""


class MissCause:
    """Why a download happened, judged fleet-wide at the moment it started."""

    FIRST = "first"
    """Never downloaded before in this run (compulsory)."""
    DUPLICATE = "duplicate"
    """Another live agent had it on disk or was downloading it."""
    EVICTED = "evicted"
    """Every copy had been evicted by agents' LRU."""
    INTERRUPTED = "interrupted"
    """The last copy vanished with an interrupted agent."""
    ALL = ("first", "duplicate", "evicted", "interrupted")


class Origin:
    """Where a fetch's bytes came from."""

    SOURCE = "source"
    PEER = "peer"
    ALL = ("source", "peer")


class Tier:
    VRAM = "vram"
    RAM = "ram"
    DISK = "disk"
    MISS = "miss"
    ALL = ("vram", "ram", "disk", "miss")


@dataclass(frozen=True)
class FleetConfig:
    """The simulated fleet. Defaults: a 24 GB GPU pod with 50 GB of model disk."""

    n_agents: int = 20
    disk_bytes: int = 50 * GB
    ram_bytes: int = 32 * GB
    """Pinned host memory for the RAM tier."""
    vram_bytes: int = 24 * GB
    vram_reserved_bytes: int = 4 * GB
    """VRAM kept for activations and the pipeline's own buffers, not for weights."""
    download_bytes_per_s: float = 400e6
    """From the model source, per agent."""
    peer_bytes_per_s: float = 1.25e9
    """From another agent in the cluster (10 Gbit/s), per fetching agent."""
    peer_upload_bytes_per_s: float = 1e9
    """An agent's upload cap for serving peers, shared by its upload slots."""
    peer_upload_slots: int = 2
    """Transfers an agent serves at once (each at the cap / slots)."""
    disk_to_gpu_bytes_per_s: float = 2e9
    ram_to_gpu_bytes_per_s: float = 20e9
    inference_s: dict[Family, float] = field(
        default_factory=lambda: {Family.SD15: 3.0, Family.SDXL: 10.0, Family.SD3: 15.0, Family.FLUX: 20.0}
    )
    """Seconds per generation by model family (a catalog row's `inference_s` overrides it)."""
    lora_apply_s: float = 0.15
    slots: int = 3
    """Jobs an agent accepts at once under late binding (one on the GPU, the rest staging)."""
    prefetch_depth: int = 3
    """How many queued jobs an agent downloads ahead for."""
    interruptions_per_agent_hour: float = 1.0
    detect_s: float = 15.0
    """Lease grace: time until the control plane sees a vanished agent."""
    replace_delay_s: float = 90.0
    baked: tuple[str, ...] = ()
    """Artifacts baked into the image: on every agent, free of budget, never downloaded."""
    zones: int = 3
    seed: int = 1

    def __post_init__(self) -> None:
        if self.replace_delay_s < self.detect_s:
            raise SimError(
                f"replace_delay_s ({self.replace_delay_s}) must be >= detect_s ({self.detect_s}): "
                "a replacement pod reuses its slot only after the old pod was noticed gone"
            )

    @property
    def vram_weights_bytes(self) -> int:
        return self.vram_bytes - self.vram_reserved_bytes


def interruption_schedule(fleet: FleetConfig, *, until_s: float) -> dict[int, list[float]]:
    """Interruption times per agent slot; a replacement's clock starts when it joins."""
    schedule: dict[int, list[float]] = {}
    rate_per_s = fleet.interruptions_per_agent_hour / 3600.0
    for slot in range(fleet.n_agents):
        rng = random.Random(f"interrupt-{fleet.seed}-{slot}")
        times: list[float] = []
        t = 0.0
        while rate_per_s > 0:
            t += rng.expovariate(rate_per_s)
            if t >= until_s:
                break
            times.append(t)
            t += fleet.replace_delay_s
        schedule[slot] = times
    return schedule


@dataclass
class JobRecord:
    """One job's life in the simulation."""

    request: JobRequest
    attempt: int = 0
    agent: str | None = None
    failed_agents: set[str] = field(default_factory=set)
    bind_s: float | None = None
    start_s: float | None = None
    finish_s: float | None = None
    tier: str | None = None
    needed_download: bool = False
    active: bool = False
    """Within the agent's prefetch window: artifacts pinned and fetched."""

    @property
    def job_id(self) -> int:
        return self.request.job_id


@dataclass(eq=False)
class Transfer:
    """One fetch of (the rest of) a file into `dst`."""

    dst: AgentState
    key: str
    size: int
    """Bytes this transfer moves (less than the file after a resume)."""
    origin: str
    src: AgentState | None
    """The serving peer (None for the source)."""
    start_s: float
    """When bytes start to flow (later than the request while it waits for the holder's copy or slot)."""
    end_s: float
    rate: float
    cause: str
    prefetch: bool
    slot: int = -1
    """Upload slot on `src`."""

    def done_bytes(self, now: float) -> int:
        return int(min(self.size, max(0.0, now - self.start_s) * self.rate))


@dataclass
class AgentState:
    """One agent pod (one incarnation of an agent slot)."""

    slot: int
    name: str
    zone: str
    joined_s: float
    disk: adapter.DiskCacheState
    """The agent's own disk accounting: budget, reservations, pins, holds, LRU."""
    baked: frozenset[str]
    alive: bool = True
    visible: bool = True
    """The control plane still counts it as Ready (alive, or vanished but not yet detected)."""
    ram: dict[str, float] = field(default_factory=dict)  # key -> last_used
    ram_used: int = 0
    vram: dict[str, float] = field(default_factory=dict)
    vram_used: int = 0
    jobs: deque[JobRecord] = field(default_factory=deque)
    download_queue: deque[str] = field(default_factory=deque)
    prefetch_queue: deque[str] = field(default_factory=deque)
    downloading: str | None = None
    download_done_s: float = 0.0
    transfer: Transfer | None = None
    """The fetch in progress (of `downloading`)."""
    upload_free_s: list[float] = field(default_factory=list)
    """When each upload slot is free again."""
    uploads: list[Transfer] = field(default_factory=list)
    """Transfers this agent serves or has promised to serve."""
    transient: set[str] = field(default_factory=set)
    """Downloaded without a disk reservation (every byte pinned): used once, then dropped."""
    gpu_job: JobRecord | None = None
    gpu_phase: str = ""
    gpu_free_s: float = 0.0
    held: frozenset[str] = frozenset()
    busy_load_s: float = 0.0
    busy_infer_s: float = 0.0
    version: int = 0
    """Bumped on every state change, so observers can cache what they derive from it."""

    def on_disk(self, key: str) -> bool:
        return self.disk.has(key)

    def is_fetching(self, key: str) -> bool:
        return self.downloading == key or key in self.download_queue or key in self.prefetch_queue

    def tier_of(self, key: str) -> str:
        if key in self.vram:
            return Tier.VRAM
        if key in self.ram:
            return Tier.RAM
        if self.on_disk(key):
            return Tier.DISK
        return Tier.MISS

    @property
    def outstanding(self) -> int:
        return len(self.jobs)


class Policy(Protocol):
    name: str
    tick_s: float
    """Interval of `tick` calls (replica planning); math.inf for none."""
    disk_half_life_s: float | None
    """Disk eviction of the policy's agents: the agent's frequency half-life, or None for plain LRU."""
    peer_fetch: bool
    """The policy's agents fetch models from each other before going to the source."""
    duplicate_discount_s: float
    """Taken off the eviction rank of a copy another agent also holds (CacheAgent spec.duplicates
    from the operator); 0 for none."""

    def assign(self, sim: Simulator, pending: Sequence[JobRecord], now: float) -> list[tuple[JobRecord, AgentState]]: ...

    def tick(self, sim: Simulator, now: float) -> None: ...


@dataclass
class SimResult:
    policy: str
    trace_duration_s: float
    end_s: float
    jobs: list[JobRecord]
    bytes_downloaded: int
    """Bytes from model sources."""
    bytes_prefetched: int
    downloads: int
    transient_downloads: int
    jobs_lost: int
    requeues: int
    gpu_seconds: float
    busy_infer_s: float
    busy_load_s: float
    decision_cpu_s: float
    decisions: int
    passes: int
    pass_cpu_s: list[float]
    agents_seen: int
    download_log: list[tuple[float, int]]
    """(time, bytes) of every download started."""
    policy_stats: dict[str, float]
    bytes_by_cause: dict[str, int]
    """Bytes downloaded from sources by why the fleet lacked the file (see `MissCause`)."""
    bytes_from_peers: int = 0
    peer_bytes_by_cause: dict[str, int] = field(default_factory=dict)
    """Bytes fetched from peers, by the same causes."""
    peer_log: list[tuple[float, int]] = field(default_factory=list)
    """(time, bytes) of every peer fetch started."""
    peer_fetches: int = 0
    peer_resumes: int = 0
    """Fetches whose serving peer vanished mid-transfer, resumed elsewhere."""
    peer_prefetched: int = 0


_ARRIVE, _SCHEDULE, _DOWNLOAD, _GPU, _INTERRUPT, _DETECT, _JOIN, _TICK = range(8)


class Simulator:
    """Runs one trace through one policy on one fleet."""

    def __init__(self, trace: Trace, fleet: FleetConfig, policy: Policy, *, drain_s: float = 3600.0) -> None:
        self.trace = trace
        self.fleet = fleet
        self.policy = policy
        self.catalog = trace.catalog
        self.size = {a.name: a.size_bytes for a in trace.catalog.artifacts}
        self.family = {a.name: a.family for a in trace.catalog.artifacts}
        self.generation_s = {
            a.name: a.inference_s if a.inference_s is not None else fleet.inference_s[a.family]
            for a in trace.catalog.artifacts
        }
        self.now = 0.0
        self.end_s = trace.duration_s + drain_s
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._schedule_pending = False
        self.agents: list[AgentState] = []
        self._incarnation = [0] * fleet.n_agents
        self.pending: dict[int, JobRecord] = {}
        self.records: dict[int, JobRecord] = {}
        self.bytes_downloaded = 0
        self.bytes_prefetched = 0
        self.downloads = 0
        self.transient_downloads = 0
        self.requeues = 0
        self.decision_cpu_s = 0.0
        self.decisions = 0
        self.passes = 0
        self.pass_cpu_s: list[float] = []
        self.gpu_seconds = 0.0
        self.agents_seen = 0
        self._retired_load_s = 0.0
        self._retired_infer_s = 0.0
        self.finished = 0
        self.download_log: list[tuple[float, int]] = []
        self.bytes_by_cause: dict[str, int] = {}
        self.bytes_from_peers = 0
        self.peer_bytes_by_cause: dict[str, int] = {}
        self.peer_log: list[tuple[float, int]] = []
        self.peer_fetches = 0
        self.peer_resumes = 0
        self.peer_prefetched = 0
        self.peer_fetch = bool(getattr(policy, "peer_fetch", False))
        self.duplicate_discount_s = float(getattr(policy, "duplicate_discount_s", 0.0))
        self._committed: dict[str, int] = {}
        """Live agents holding a complete copy of each artifact (what CacheAgent statuses report)."""
        self._copies: dict[str, int] = {}
        self._lost_by: dict[str, str] = {}
        self._ever: set[str] = set()

    # ---- public helpers for policies ----------------------------------

    @property
    def visible_agents(self) -> list[AgentState]:
        return [a for a in self.agents if a.visible]

    def inference_s(self, job: JobRecord) -> float:
        return self.generation_s[job.request.model] + self.fleet.lora_apply_s * len(job.request.loras)

    def set_holds(self, agent: AgentState, keys: frozenset[str]) -> None:
        """Operator order: keep exactly `keys` on `agent`'s disk, prefetching the missing ones."""
        agent.version += 1
        if not agent.alive:
            agent.held = keys
            return
        disk = agent.disk
        for key in agent.held - keys:
            disk = disk.release(key)
        for key in keys - agent.held:
            disk = disk.hold(key)
        agent.disk = disk
        agent.held = keys
        for key in sorted(keys):
            if not agent.on_disk(key) and not agent.is_fetching(key):
                agent.prefetch_queue.append(key)
        agent.prefetch_queue = deque(k for k in agent.prefetch_queue if k in keys)
        self._pump_download(agent)

    # ---- event plumbing -----------------------------------------------

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, payload))

    def _request_schedule(self) -> None:
        if not self._schedule_pending:
            self._schedule_pending = True
            self._push(self.now, _SCHEDULE, None)

    def run(self) -> SimResult:
        fleet = self.fleet
        for slot in range(fleet.n_agents):
            self._join(slot)
        for job in self.trace.jobs:
            self._push(job.submit_s, _ARRIVE, job)
        for slot, times in interruption_schedule(fleet, until_s=self.end_s).items():
            for t in times:
                self._push(t, _INTERRUPT, slot)
        if math.isfinite(self.policy.tick_s):
            self._push(0.0, _TICK, None)
        last_arrival = self.trace.jobs[-1].submit_s if self.trace.jobs else 0.0
        while self._events:
            at, _, kind, payload = heapq.heappop(self._events)
            if at > self.end_s:
                break
            self.now = at
            if kind == _ARRIVE:
                request: JobRequest = payload  # type: ignore[assignment]
                record = JobRecord(request=request)
                self.records[request.job_id] = record
                self.pending[request.job_id] = record
                self._request_schedule()
            elif kind == _SCHEDULE:
                self._schedule_pending = False
                self._schedule()
            elif kind == _DOWNLOAD:
                self._download_done(payload)  # type: ignore[arg-type]
            elif kind == _GPU:
                self._gpu_done(payload)  # type: ignore[arg-type]
            elif kind == _INTERRUPT:
                self._interrupt(payload)  # type: ignore[arg-type]
            elif kind == _DETECT:
                self._detect(payload)  # type: ignore[arg-type]
            elif kind == _JOIN:
                self._join(payload)  # type: ignore[arg-type]
                self._request_schedule()
            elif kind == _TICK:
                self.policy.tick(self, self.now)
                if self.now < last_arrival or self.pending or any(a.jobs for a in self.agents):
                    self._push(self.now + self.policy.tick_s, _TICK, None)
            if self.finished == len(self.trace.jobs):
                break
        return self._result()

    # ---- scheduling ----------------------------------------------------

    def _schedule(self) -> None:
        if not self.pending:
            return
        pending = list(self.pending.values())
        started = time.thread_time()
        bindings = self.policy.assign(self, pending, self.now)
        spent = time.thread_time() - started
        self.passes += 1
        self.pass_cpu_s.append(spent)
        self.decision_cpu_s += spent
        self.decisions += len(bindings)
        for job, agent in bindings:
            self._bind(job, agent)

    def _bind(self, job: JobRecord, agent: AgentState) -> None:
        if job.job_id not in self.pending:
            raise SimError(f"policy {self.policy.name} bound job {job.job_id} which is not pending")
        if not agent.visible:
            raise SimError(f"policy {self.policy.name} bound job {job.job_id} to agent {agent.name} which is not Ready")
        del self.pending[job.job_id]
        agent.version += 1
        job.agent = agent.name
        job.attempt += 1
        if job.bind_s is None:
            job.bind_s = self.now
        agent.jobs.append(job)
        if agent.alive:
            self._advance(agent)

    # ---- agent mechanics -----------------------------------------------

    def _join(self, slot: int) -> None:
        self._incarnation[slot] += 1
        inc = self._incarnation[slot]
        name = f"agent-{slot:03d}" if inc == 1 else f"agent-{slot:03d}-r{inc - 1}"
        disk = adapter.new_disk_cache(
            self.fleet.disk_bytes, baked={k: self.size[k] for k in self.fleet.baked}, now=self.now,
            half_life_s=self.policy.disk_half_life_s,
        )
        agent = AgentState(
            slot=slot,
            name=name,
            zone=f"zone-{slot % max(1, self.fleet.zones)}",
            joined_s=self.now,
            disk=disk,
            baked=frozenset(self.fleet.baked),
            upload_free_s=[self.now] * max(1, self.fleet.peer_upload_slots),
        )
        self.agents_seen += 1
        if slot < len(self.agents):
            self.agents[slot] = agent
        else:
            self.agents.append(agent)

    def _interrupt(self, slot: int) -> None:
        agent = self.agents[slot]
        if not agent.alive:
            return
        agent.alive = False
        disk = agent.disk
        for key in [*disk.entries, *disk.reservations]:
            if key not in agent.baked:
                self._lose_copy(key, MissCause.INTERRUPTED)
        for key in disk.entries:
            if key not in agent.baked:
                self._committed[key] = self._committed.get(key, 0) - 1
        if agent.transfer is not None:
            self._release_slot(agent.transfer)
            agent.transfer = None
        # Fetches it was serving, or was going to serve, carry on from another peer or the source.
        for upload in list(agent.uploads):
            if upload.dst.alive and upload.dst.transfer is upload:
                self._replan(upload)
            else:
                self._release_slot(upload)
        self.gpu_seconds += self.now - agent.joined_s
        self._retired_load_s += agent.busy_load_s
        self._retired_infer_s += agent.busy_infer_s
        agent.busy_load_s = agent.busy_infer_s = 0.0
        self._push(self.now + self.fleet.detect_s, _DETECT, agent)
        self._push(self.now + self.fleet.replace_delay_s, _JOIN, slot)

    def _detect(self, agent: AgentState) -> None:
        agent.visible = False
        agent.version += 1
        for job in agent.jobs:
            job.failed_agents.add(agent.name)
            job.agent = None
            job.active = False
            job.needed_download = False
            self.pending[job.job_id] = job
            self.requeues += 1
        agent.jobs.clear()
        self._request_schedule()

    def _advance(self, agent: AgentState) -> None:
        """Start downloads for the prefetch window and the GPU on the head job when ready."""
        agent.version += 1
        for job in list(agent.jobs)[: self.fleet.prefetch_depth]:
            if job.active:
                continue
            job.active = True
            for key in job.request.artifacts:
                agent.disk = agent.disk.pin(key, now=self.now)
                if not self._available(agent, key):
                    if key == job.request.model:
                        job.needed_download = True
                    self._fetch(agent, key)
        self._pump_download(agent)
        self._try_start_gpu(agent)

    def _fetch(self, agent: AgentState, key: str) -> None:
        if key in agent.prefetch_queue:
            # A job needs it now: move it ahead of background prefetches.
            agent.prefetch_queue.remove(key)
            agent.download_queue.append(key)
        elif agent.downloading != key and key not in agent.download_queue:
            agent.download_queue.append(key)

    def _pump_download(self, agent: AgentState) -> None:
        if agent.downloading is not None or not agent.alive:
            return
        agent.version += 1
        while agent.download_queue or agent.prefetch_queue:
            prefetch = not agent.download_queue
            key = agent.download_queue.popleft() if not prefetch else agent.prefetch_queue.popleft()
            if agent.on_disk(key) or (key in agent.transient):
                continue
            size = self.size[key]
            cause = self._miss_cause(key)
            if self.duplicate_discount_s > 0:
                # The operator's spec.duplicates: copies another agent also holds go first.
                shared = frozenset(k for k in agent.disk.entries if self._committed.get(k, 0) > 1)
                agent.disk = agent.disk.with_duplicates(shared, discount_s=self.duplicate_discount_s)
            try:
                agent.disk, _, victims = agent.disk.reserve(key, size, now=self.now)
            except adapter.InsufficientCache:
                if prefetch:
                    continue  # a hold that does not fit now is dropped, the planner retries
                agent.transient.add(key)
                self.transient_downloads += 1
            else:
                self._copies[key] = self._copies.get(key, 0) + 1
                for victim in victims:
                    self._lose_copy(victim, MissCause.EVICTED)
                    self._committed[victim] = self._committed.get(victim, 0) - 1
            self._ever.add(key)
            agent.downloading = key
            self.downloads += 1
            self._start_transfer(agent, key, size, prefetch=prefetch, cause=cause)
            return

    def _start_transfer(self, agent: AgentState, key: str, size: int, *, prefetch: bool, cause: str | None = None) -> None:
        """Fetch `size` bytes of `key` into `agent`: from the best peer when its policy fetches from
        peers and some live agent holds or is fetching the file, else from the source."""
        if cause is None:
            cause = self._miss_cause(key, fetching=agent)
        now = self.now
        plan = self._peer_plan(agent, key) if self.peer_fetch else None
        if plan is None:
            rate = self.fleet.download_bytes_per_s
            transfer = Transfer(agent, key, size, Origin.SOURCE, None, now, now + size / rate, rate, cause, prefetch)
            self.bytes_by_cause[cause] = self.bytes_by_cause.get(cause, 0) + size
            self.bytes_downloaded += size
            self.download_log.append((now, size))
            if prefetch:
                self.bytes_prefetched += size
        else:
            src, slot, start = plan
            rate = min(self.fleet.peer_bytes_per_s, self.fleet.peer_upload_bytes_per_s / len(src.upload_free_s))
            transfer = Transfer(agent, key, size, Origin.PEER, src, start, start + size / rate, rate, cause, prefetch, slot)
            src.upload_free_s[slot] = transfer.end_s
            src.uploads.append(transfer)
            self.peer_bytes_by_cause[cause] = self.peer_bytes_by_cause.get(cause, 0) + size
            self.bytes_from_peers += size
            self.peer_log.append((now, size))
            self.peer_fetches += 1
            if prefetch:
                self.peer_prefetched += size
        agent.transfer = transfer
        agent.download_done_s = transfer.end_s
        self._push(transfer.end_s, _DOWNLOAD, (agent, key, transfer))

    def _peer_plan(self, agent: AgentState, key: str) -> tuple[AgentState, int, float] | None:
        """(holder, upload slot, start time) of the soonest peer fetch of `key`, or None when no
        live agent holds a copy or is fetching one it will keep."""
        best: tuple[float, int, str, AgentState, int] | None = None
        for peer in self.agents:
            if peer is agent or not peer.alive or key in peer.transient:
                continue
            if peer.disk.has(key) and key not in peer.disk.reservations:
                ready = self.now
            elif peer.transfer is not None and peer.transfer.key == key:
                if self._fed_by(peer, agent, key):
                    continue  # its copy would come from this agent's own: a cycle, never complete
                ready = peer.transfer.end_s  # its copy, once complete and verified
            else:
                continue
            slot = min(range(len(peer.upload_free_s)), key=peer.upload_free_s.__getitem__)
            start = max(self.now, ready, peer.upload_free_s[slot])
            candidate = (start, len(peer.uploads), peer.name, peer, slot)
            if best is None or candidate[:3] < best[:3]:
                best = candidate
        return None if best is None else (best[3], best[4], best[0])

    def _fed_by(self, peer: AgentState, agent: AgentState, key: str) -> bool:
        """Whether `peer`'s fetch of `key` gets its bytes, directly or through other fetches in
        progress, from `agent` (whose own fetch is being planned again after its holder vanished)."""
        seen: set[int] = set()
        node: AgentState | None = peer
        while node is not None and node.transfer is not None and node.transfer.key == key and id(node) not in seen:
            seen.add(id(node))
            node = node.transfer.src
            if node is agent:
                return True
        return False

    def _release_slot(self, transfer: Transfer) -> None:
        """`transfer` stops before its end: its holder's slot frees, and bytes it will not move are not counted."""
        src = transfer.src
        if src is None or transfer not in src.uploads:
            return
        src.uploads.remove(transfer)
        src.upload_free_s[transfer.slot] = max([self.now, *(u.end_s for u in src.uploads if u.slot == transfer.slot)])
        self._uncount_peer(transfer, transfer.size - transfer.done_bytes(self.now))

    def _replan(self, transfer: Transfer) -> None:
        """The peer serving `transfer` vanished: fetch the bytes still missing from another peer
        or the source, and let fetches that waited for this agent's copy choose again."""
        dst, key = transfer.dst, transfer.key
        done = transfer.done_bytes(self.now)
        self._release_slot(transfer)
        if done > 0:
            self.peer_resumes += 1
        waiting = [u for u in dst.uploads if u.key == key and u.start_s > self.now]
        for upload in waiting:
            self._release_slot(upload)
        self._start_transfer(dst, key, transfer.size - done, prefetch=transfer.prefetch)
        for upload in waiting:
            if upload.dst.alive and upload.dst.transfer is upload:
                self._replan(upload)

    def _uncount_peer(self, transfer: Transfer, size: int) -> None:
        """Take back bytes counted for a peer fetch that will not move them."""
        if size <= 0 or transfer.origin != Origin.PEER:
            return
        self.bytes_from_peers -= size
        self.peer_bytes_by_cause[transfer.cause] -= size
        self.peer_log.append((self.now, -size))
        if transfer.prefetch:
            self.peer_prefetched -= size

    def _miss_cause(self, key: str, *, fetching: AgentState | None = None) -> str:
        """Why the fleet lacked `key` (not counting the copy `fetching` reserved for it)."""
        if key not in self._ever:
            return MissCause.FIRST
        own = 1 if fetching is not None and key in fetching.disk.reservations else 0
        if self._copies.get(key, 0) - own > 0:
            return MissCause.DUPLICATE
        return self._lost_by.get(key, MissCause.EVICTED)

    def _lose_copy(self, key: str, cause: str) -> None:
        self._copies[key] = max(0, self._copies.get(key, 0) - 1)
        # The latest loss: when no copy is left, the one lost last is why (a fetch in progress
        # elsewhere counts as a copy until it too is gone).
        self._lost_by[key] = cause

    def _download_done(self, payload: tuple[AgentState, str, Transfer]) -> None:
        agent, key, transfer = payload
        if not agent.alive or agent.transfer is not transfer:
            return  # the fetch was re-planned (its peer vanished) or the agent is gone
        if transfer.src is not None and transfer in transfer.src.uploads:
            transfer.src.uploads.remove(transfer)
        agent.transfer = None
        agent.version += 1
        agent.downloading = None
        if key in agent.transient:
            pass  # lives only for the job that needs it
        else:
            # The operator's fleet-wide rank of the model, for policies that publish one.
            hint = getattr(self.policy, "rank_hint", None)
            agent.disk = agent.disk.commit(key, now=self.now, rank_hint_s=hint(key) if hint is not None else None)
            self._committed[key] = self._committed.get(key, 0) + 1
        self._pump_download(agent)
        self._try_start_gpu(agent)
        if key in agent.held:
            self._request_schedule()

    def _available(self, agent: AgentState, key: str) -> bool:
        return (
            key in agent.vram
            or key in agent.ram
            or agent.on_disk(key)
            or (key in agent.transient and agent.downloading != key)
        )

    def _try_start_gpu(self, agent: AgentState) -> None:
        if agent.gpu_job is not None or not agent.jobs or not agent.alive:
            return
        if not agent.jobs[0].active:
            self._advance(agent)
            return
        # Run the first job of the prefetch window whose files are all here: a job
        # waiting for a download does not hold the GPU up for the ones behind it.
        job = None
        for candidate in itertools.islice(agent.jobs, self.fleet.prefetch_depth):
            missing = [k for k in candidate.request.artifacts if not self._available(agent, k)]
            if not missing:
                job = candidate
                break
            # Evicted from every tier since the job was accepted: fetch again.
            for key in missing:
                if not agent.is_fetching(key):
                    self._fetch(agent, key)
        if job is None:
            self._pump_download(agent)
            return
        job.tier = Tier.MISS if job.needed_download else agent.tier_of(job.request.model)
        agent.version += 1
        load_s = self._load_into_vram(agent, job)
        agent.gpu_job = job
        agent.gpu_phase = "load"
        agent.gpu_free_s = self.now + load_s + self.inference_s(job)
        agent.busy_load_s += load_s
        self._push(self.now + load_s, _GPU, (agent, job, "load"))

    def _load_into_vram(self, agent: AgentState, job: JobRecord) -> float:
        keys = job.request.artifacts
        missing = [k for k in keys if k not in agent.vram]
        need = sum(self.size[k] for k in missing)
        budget = self.fleet.vram_weights_bytes
        if need:
            items = [adapter.CachedItem(k, self.size[k], t, k in keys) for k, t in agent.vram.items()]
            for victim in adapter.plan_eviction(items, need_bytes=need, free_bytes=budget - agent.vram_used):
                del agent.vram[victim]
                agent.vram_used -= self.size[victim]
        load_s = 0.0
        for key in missing:
            size = self.size[key]
            if key in agent.ram:
                load_s += size / self.fleet.ram_to_gpu_bytes_per_s
            else:
                load_s += size / self.fleet.disk_to_gpu_bytes_per_s
                self._add_to_ram(agent, key, pinned=set(keys))
            agent.vram[key] = self.now
            agent.vram_used += size
        for key in keys:
            agent.vram[key] = self.now
            if key in agent.ram:
                agent.ram[key] = self.now
        return load_s

    def _add_to_ram(self, agent: AgentState, key: str, *, pinned: set[str]) -> None:
        size = self.size[key]
        items = [adapter.CachedItem(k, self.size[k], t, k in pinned) for k, t in agent.ram.items()]
        try:
            victims = adapter.plan_eviction(items, need_bytes=size, free_bytes=self.fleet.ram_bytes - agent.ram_used)
        except adapter.InsufficientCache:
            return
        for victim in victims:
            del agent.ram[victim]
            agent.ram_used -= self.size[victim]
        agent.ram[key] = self.now
        agent.ram_used += size

    def _gpu_done(self, payload: tuple[AgentState, JobRecord, str]) -> None:
        agent, job, phase = payload
        if not agent.alive or agent.gpu_job is not job:
            return
        if phase == "load":
            job.start_s = self.now
            agent.gpu_phase = "infer"
            infer_s = self.inference_s(job)
            agent.busy_infer_s += infer_s
            self._push(self.now + infer_s, _GPU, (agent, job, "infer"))
            return
        job.finish_s = self.now
        self.finished += 1
        agent.version += 1
        agent.gpu_job = None
        agent.gpu_phase = ""
        try:
            agent.jobs.remove(job)
        except ValueError:
            raise SimError(f"agent {agent.name} finished job {job.job_id} which it does not hold") from None
        for key in job.request.artifacts:
            agent.transient.discard(key)
            agent.disk = agent.disk.unpin(key, now=self.now)
        self._advance(agent)
        self._request_schedule()

    # ---- results -------------------------------------------------------

    def _result(self) -> SimResult:
        jobs = [self.records[j.job_id] for j in self.trace.jobs if j.job_id in self.records]
        # Conservation: every submitted job is finished, pending, or bound to a tracked agent.
        accounted = {r.job_id for r in jobs if r.finish_s is not None}
        accounted.update(self.pending)
        for agent in self.agents:
            accounted.update(j.job_id for j in agent.jobs)
        lost = len(self.trace.jobs) - len(accounted)
        load_s = self._retired_load_s + sum(a.busy_load_s for a in self.agents)
        infer_s = self._retired_infer_s + sum(a.busy_infer_s for a in self.agents)
        gpu_seconds = self.gpu_seconds + sum(self.now - a.joined_s for a in self.agents if a.alive)
        return SimResult(
            policy=self.policy.name,
            trace_duration_s=self.trace.duration_s,
            end_s=self.now,
            jobs=jobs,
            bytes_downloaded=self.bytes_downloaded,
            bytes_prefetched=self.bytes_prefetched,
            downloads=self.downloads,
            transient_downloads=self.transient_downloads,
            jobs_lost=lost,
            requeues=self.requeues,
            gpu_seconds=gpu_seconds,
            busy_infer_s=infer_s,
            busy_load_s=load_s,
            decision_cpu_s=self.decision_cpu_s,
            decisions=self.decisions,
            passes=self.passes,
            pass_cpu_s=self.pass_cpu_s,
            agents_seen=self.agents_seen,
            download_log=self.download_log,
            policy_stats=dict(getattr(self.policy, "stats", lambda: {})()),
            bytes_by_cause=dict(self.bytes_by_cause),
            bytes_from_peers=self.bytes_from_peers,
            peer_bytes_by_cause={k: v for k, v in self.peer_bytes_by_cause.items() if v},
            peer_log=self.peer_log,
            peer_fetches=self.peer_fetches,
            peer_resumes=self.peer_resumes,
            peer_prefetched=self.peer_prefetched,
        )


def simulate(
    trace: Trace, fleet: FleetConfig, policy_factory: Callable[[], Policy], *, drain_s: float = 3600.0
) -> SimResult:
    return Simulator(trace, fleet, policy_factory(), drain_s=drain_s).run()
