"""Routing policies compared on the same traces and fleets.

Baselines push every job to an agent as soon as it arrives (the agent queues it
locally and caches with plain LRU): least-connection (what a load balancer gives),
random, and route-to-holder-else-least-loaded (ModelMesh-like). Stoker binds late:
jobs stay pending until an agent has a free slot, and the operator's real placement
planner chooses (`Planner`, placement with memory between passes and promises to
waiting jobs, exactly as the operator runs it); optionally the operator's real replica planner keeps warm
copies (static targets, or autoscaled by demand). Stoker's agents rank disk entries
by use frequency (the agent's `DiskCacheState`); placement reads those ranks from the
agents' views (what the operator reads from CacheAgent `models[].rank`), and the
operator keeps a fleet-wide rank per model (`userank.FleetRank`, counting every job
once at its creation, as the operator's `State` does) that an agent starts a newly
fetched copy from (what it reads from ModelCache `useRank`). The simulated agent reads
the rank counted so far when its download ends; the real one reads the published value
when its download starts (up to `userank.PUBLISH_MIN_CHANGE_S` of rank and one replica
pass behind).
The `stoker-lastused` variant has neither: placement sees only each model's last use
and agents rank new copies as one-offs (a fleet whose agents and operator report no
ranks).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stoker.sim import adapter, replica_driver
from stoker.sim.adapter import PlacementSettings, Planner, PromiseSettings, plan_bindings, plan_placement
from stoker.sim.engine import AgentState, JobRecord, Policy, Simulator

__all__ = [
    "HolderElseLeastLoaded",
    "LeastConnection",
    "POLICIES",
    "Planner",
    "RandomChoice",
    "StokerPolicy",
    "make_policy",
    "plan_bindings",
    "plan_placement",
]


class _PushPolicy:
    """Binds every pending job at once into agents' local queues (no slot limit)."""

    name = "push"
    tick_s = math.inf
    disk_half_life_s = None  # the plain per-node LRU a load balancer's nodes have
    peer_fetch = False  # every node pulls from the model source
    duplicate_discount_s = 0.0

    def __init__(self, *, seed: int = 1) -> None:
        self.rng = random.Random(f"{self.name}-{seed}")
        self.rotation = 0
        self.core_cpu_s = 0.0

    def tick(self, sim: Simulator, now: float) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {}

    def assign(self, sim: Simulator, pending: Sequence[JobRecord], now: float) -> list[tuple[JobRecord, AgentState]]:
        agents = sim.visible_agents
        if not agents:
            return []
        load = {a.name: a.outstanding for a in agents}
        out: list[tuple[JobRecord, AgentState]] = []
        for job in sorted(pending, key=lambda j: (j.request.submit_s, j.job_id)):
            choices = [a for a in agents if a.name not in job.failed_agents] or agents
            agent = self.choose(sim, job, choices, load)
            load[agent.name] += 1
            out.append((job, agent))
        return out

    def least_loaded(self, agents: Sequence[AgentState], load: dict[str, int]) -> AgentState:
        # Ties rotate, as a load balancer's round-robin among equals does.
        low = min(load[a.name] for a in agents)
        tied = [a for a in agents if load[a.name] == low]
        self.rotation += 1
        return tied[self.rotation % len(tied)]

    def choose(self, sim: Simulator, job: JobRecord, agents: Sequence[AgentState], load: dict[str, int]) -> AgentState:
        raise NotImplementedError


class LeastConnection(_PushPolicy):
    """Least outstanding jobs, blind to caches: a plain load balancer."""

    name = "least-conn+LRU"

    def choose(self, sim: Simulator, job: JobRecord, agents: Sequence[AgentState], load: dict[str, int]) -> AgentState:
        return self.least_loaded(agents, load)


class RandomChoice(_PushPolicy):
    name = "random+LRU"

    def choose(self, sim: Simulator, job: JobRecord, agents: Sequence[AgentState], load: dict[str, int]) -> AgentState:
        return agents[self.rng.randrange(len(agents))]


class HolderElseLeastLoaded(_PushPolicy):
    """Route to the least loaded agent holding the checkpoint (any tier, or downloading),
    unless every holder has `max_extra` or more jobs beyond the least loaded agent; then
    to the least loaded agent, which loads it (so hot models spread as load requires)."""

    name = "holder-else-least-loaded"

    def __init__(self, *, seed: int = 1, max_extra: int = 2) -> None:
        super().__init__(seed=seed)
        self.max_extra = max_extra

    def choose(self, sim: Simulator, job: JobRecord, agents: Sequence[AgentState], load: dict[str, int]) -> AgentState:
        model = job.request.model
        floor = min(load[a.name] for a in agents)
        holders = [
            a
            for a in agents
            if (model in a.vram or model in a.ram or a.on_disk(model) or a.is_fetching(model))
            and load[a.name] - floor < self.max_extra
        ]
        return self.least_loaded(holders or agents, load)


@dataclass(frozen=True)
class ReplicaMode:
    """How the Stoker policy drives the replica planner."""

    enabled: bool = False
    autoscale: bool = False
    static_fraction_of_disk: float = 0.25
    """Static mode: replica targets of 1 for the models a user would mark as main ones,
    taken by expected popularity until they fill this share of the fleet's disk."""
    max_replicas: int = 4
    target_jobs_per_minute: float = 6.0
    """Autoscale: demand one copy serves."""


class StokerPolicy:
    """Late binding through the operator's real placement core."""

    def __init__(
        self,
        *,
        name: str = "stoker",
        settings: PlacementSettings | None = None,
        replicas: ReplicaMode = ReplicaMode(),
        tick_s: float = 30.0,
        queue_slots: bool = True,
        fleet_ranks: bool = True,
        promises: PromiseSettings | None = PromiseSettings(),
        peer_fetch: bool = False,
        duplicate_discount_s: float = 0.0,
    ) -> None:
        self.name = name
        self.peer_fetch = peer_fetch
        """Agents fetch a model from a peer that holds (or is fetching) it before the source."""
        self.duplicate_discount_s = duplicate_discount_s
        """Agents evict copies another agent also holds this much earlier (the operator's spec.duplicates)."""
        self.queue_slots = queue_slots
        """Report one generation slot plus queue slots (the agent's one GPU), not all as generation slots."""
        self.fleet_ranks = fleet_ranks
        """Agents report their frequency ranks and start new copies from the operator's fleet-wide rank."""
        self._ranks: dict[str, adapter.FleetRank] = {}
        self._counted: set[int] = set()
        self.jobs_examined = 0
        self.disk_half_life_s: float | None = adapter.DEFAULT_HALF_LIFE_S
        self.settings = settings or PlacementSettings()
        self.replicas = replicas
        self.tick_s = tick_s if replicas.enabled else math.inf
        self.core_cpu_s = 0.0
        self.core_calls = 0
        self.replica_cpu_s = 0.0
        self.replica_calls = 0
        self._sim: Simulator | None = None
        self._artifacts: dict[str, adapter.ArtifactInfo] | None = None
        self._job_views: dict[int, tuple[int, adapter.JobView]] = {}
        self._agent_views: dict[str, tuple[int, adapter.AgentView]] = {}
        self._planner = replica_driver.ReplicaDriver(replicas) if replicas.enabled else None
        self.placement = Planner(self.settings, promises=promises)
        """The operator's placement planner, kept between passes as the operator keeps it."""

    def assign(self, sim: Simulator, pending: Sequence[JobRecord], now: float) -> list[tuple[JobRecord, AgentState]]:
        agents = sim.visible_agents
        if not agents:
            return []
        if not any(len(a.jobs) < sim.fleet.slots for a in agents):
            return []  # no free slot anywhere: the operator's loop would not run a pass
        by_name = {a.name: a for a in agents}
        if self._artifacts is None or self._sim is not sim:
            # The operator keeps these between passes (from its watches); so does the shell here.
            self._sim = sim
            self._artifacts = adapter.artifact_map(sim.size)
            self._job_views = {}
            self._agent_views = {}
        if self.fleet_ranks:
            self._count_uses(pending)
        # The queue in order and the demand per artifact, as the operator keeps them between passes
        # (`operator.scheduler`): the planner is called as the operator calls it.
        jobs = sorted((self._job_view(sim, j) for j in pending), key=self._order_key)
        demand = adapter.count_demand(jobs)
        views = [self._agent_view(sim, a, now) for a in agents]
        artifacts = self._artifacts
        started = time.thread_time()
        plan = self.placement.plan(jobs, views, artifacts, now=now, jobs_sorted=True, demand=demand)
        self.core_cpu_s += time.thread_time() - started
        self.core_calls += 1
        self.jobs_examined += plan.jobs_examined
        by_id = {str(j.job_id): j for j in pending}
        return [(by_id[b.job_key], by_name[b.agent]) for b in plan.bindings]

    def _order_key(self, job: adapter.JobView) -> tuple[float, float, str]:
        return adapter.job_order_key(job, settings=self.settings)

    def _count_uses(self, pending: Sequence[JobRecord]) -> None:
        """The operator's fleet-wide rank of each artifact: one use per job, at its creation."""
        empty = adapter.FleetRank()
        for job in pending:
            if job.job_id in self._counted:
                continue
            self._counted.add(job.job_id)
            for key in job.request.artifacts:
                self._ranks[key] = self._ranks.get(key, empty).count(job.request.submit_s)

    def rank_hint(self, key: str) -> float | None:
        """What an agent fetching `key` is told about its use across the fleet."""
        rank = self._ranks.get(key) if self.fleet_ranks else None
        return None if rank is None else rank.rank_s

    def _job_view(self, sim: Simulator, job: JobRecord) -> adapter.JobView:
        cached = self._job_views.get(job.job_id)
        if cached is None or cached[0] != job.attempt:
            cached = (job.attempt, adapter.job_view(sim, job))
            self._job_views[job.job_id] = cached
        return cached[1]

    def _agent_view(self, sim: Simulator, agent: AgentState, now: float) -> adapter.AgentView:
        # A new view when the agent's state changed, as the operator builds one when a CacheAgent
        # changes; between changes the agent's last report (remaining times included) stands.
        cached = self._agent_views.get(agent.name)
        if cached is None or cached[0] != agent.version:
            view = adapter.agent_view(sim, agent, now, queue_slots=self.queue_slots, frequency_ranks=self.fleet_ranks,
                                      peers=self.peer_fetch)
            self._agent_views[agent.name] = (agent.version, view)
            return view
        return cached[1]

    def stats(self) -> dict[str, float]:
        return {
            "core_cpu_s": self.core_cpu_s,
            "core_calls": self.core_calls,
            "replica_cpu_s": self.replica_cpu_s,
            "replica_calls": self.replica_calls,
            "jobs_examined": self.jobs_examined,
            "jobs_placed": self.placement.stats.placed,
            "jobs_reused": self.placement.stats.reused,
            "broken_promises": self.placement.stats.broken_promises,
        }

    def tick(self, sim: Simulator, now: float) -> None:
        if self._planner is None:
            return
        started = time.thread_time()
        self._planner.tick(sim, now)
        self.replica_cpu_s += time.thread_time() - started
        self.replica_calls += 1


POLICIES = (
    "least-conn",
    "random",
    "holder",
    "stoker-lastused",
    "stoker",
    "stoker+replicas",
    "stoker+autoscale",
    "stoker+peers",
)


PEER_DUPLICATE_DISCOUNT_S = 8 * 3600.0
"""What `stoker+peers` agents take off the rank of a copy another agent also holds, as real agents do
by default (CacheAgent spec.duplicates)."""


def make_policy(key: str, *, seed: int = 1, settings: PlacementSettings | None = None) -> Policy:
    """A fresh policy object for one run, by short name (see `POLICIES`).

    `settings` (placement knobs) apply to the Stoker policies only."""
    if key == "least-conn":
        return LeastConnection(seed=seed)
    if key == "random":
        return RandomChoice(seed=seed)
    if key == "holder":
        return HolderElseLeastLoaded(seed=seed)
    if key == "stoker":
        return StokerPolicy(name="stoker", settings=settings)
    if key == "stoker-lastused":
        return StokerPolicy(name="stoker-lastused", settings=settings, fleet_ranks=False)
    if key == "stoker+replicas":
        return StokerPolicy(name="stoker+replicas", settings=settings, replicas=ReplicaMode(enabled=True))
    if key == "stoker+peers":
        # the agent's default with the peer tier on (AgentSettings.peer_duplicate_discount_s)
        return StokerPolicy(name="stoker+peers", settings=settings, peer_fetch=True,
                            duplicate_discount_s=PEER_DUPLICATE_DISCOUNT_S)
    if key == "stoker+autoscale":
        return StokerPolicy(
            name="stoker+autoscale", settings=settings, replicas=ReplicaMode(enabled=True, autoscale=True)
        )

    raise ValueError(f"unknown policy {key!r}; choose one of {', '.join(POLICIES)}")
