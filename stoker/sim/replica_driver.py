"""Drives the operator's real replica planner from inside the simulation.

Every tick it updates per-model demand (the planner's own `DemandCounter`) from the
jobs submitted since the last tick, builds the `ModelTarget`s a cluster would have
as ModelCache objects, calls `plan_replicas`, and applies each agent's full list of
holds as a CacheAgent spec update (the agent prefetches the missing ones behind its
jobs and never evicts a held copy).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from stoker.operator.replicas import Autoscale, DemandCounter, ModelTarget, ReplicaSettings, plan_replicas
from stoker.sim import adapter

if TYPE_CHECKING:
    from stoker.sim.engine import Simulator
    from stoker.sim.policies import ReplicaMode

__all__ = ["ReplicaDriver", "plan_replicas"]


class ReplicaDriver:
    def __init__(self, mode: ReplicaMode, *, settings: ReplicaSettings | None = None) -> None:
        self.mode = mode
        self.settings = settings or ReplicaSettings()
        self.demand: dict[str, DemandCounter] = {}
        self.next_job = 0
        self.static: dict[str, int] | None = None
        self.last_plan = None

    def _observe(self, sim: Simulator, now: float) -> None:
        jobs = sim.trace.jobs
        while self.next_job < len(jobs) and jobs[self.next_job].submit_s <= now:
            job = jobs[self.next_job]
            for key in (job.model,):
                counter = self.demand.get(key, DemandCounter())
                self.demand[key] = counter.observe(now=job.submit_s, half_life_s=self.settings.half_life_s)
            self.next_job += 1

    def _static_targets(self, sim: Simulator) -> dict[str, int]:
        # What an operator would mark as main models from earlier traffic: the most
        # requested checkpoints of the first ten minutes, up to a share of fleet disk.
        counts = Counter(j.model for j in sim.trace.jobs if j.submit_s < 600.0)
        budget = self.mode.static_fraction_of_disk * sim.fleet.disk_bytes * sim.fleet.n_agents
        chosen: dict[str, int] = {}
        used = 0
        for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if used + sim.size[key] > budget:
                break
            chosen[key] = 1
            used += sim.size[key]
        return chosen

    def targets(self, sim: Simulator, now: float) -> list[ModelTarget]:
        half_life = self.settings.half_life_s
        out: list[ModelTarget] = []
        if self.mode.autoscale:
            for key, counter in sorted(self.demand.items()):
                rate = counter.rate_per_minute(now=now, half_life_s=half_life)
                if rate < 0.05:
                    continue
                out.append(
                    ModelTarget(
                        key=key,
                        size_bytes=sim.size[key],
                        autoscale=Autoscale(
                            max_replicas=self.mode.max_replicas, target_jobs_per_minute=self.mode.target_jobs_per_minute
                        ),
                        demand_per_minute=rate,
                    )
                )
            return out
        if self.static is None:
            self.static = self._static_targets(sim)
        for key, replicas in sorted(self.static.items()):
            counter = self.demand.get(key, DemandCounter())
            out.append(
                ModelTarget(
                    key=key,
                    size_bytes=sim.size[key],
                    replicas=replicas,
                    demand_per_minute=counter.rate_per_minute(now=now, half_life_s=half_life),
                )
            )
        return out

    def tick(self, sim: Simulator, now: float) -> None:
        self._observe(sim, now)
        agents = sim.visible_agents
        views = [adapter.agent_view(sim, a, now) for a in agents]
        plan = plan_replicas(self.targets(sim, now), views, now=now, settings=self.settings)
        self.last_plan = plan
        by_name = {a.name: a for a in agents}
        for orders in plan.orders:
            agent = by_name[orders.agent]
            keys = frozenset(k for k, _ in orders.holds)
            if keys != agent.held:
                sim.set_holds(agent, keys)
