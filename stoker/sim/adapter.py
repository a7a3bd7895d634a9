"""The one place where the simulator meets the real decision code.

The engine and policies call the agent's eviction and cache accounting, the
operator's placement and its planner with memory (and replica planning, when present) and the shared use ranks
(`stoker.userank`: the agents' rank function and the operator's fleet rank) only
through the names imported here, which are the originals (never copies), so a test
can check identity. The view builders translate simulator state into the operator's input
types, the way the operator's shell translates CacheAgent status and pending
GenerationJobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from stoker.agent.disk_cache import (
    CachedItem,
    DiskCacheState,
    InsufficientCache,
    eviction_rank,
    plan_eviction,
)
from stoker.operator.placement import (
    AgentView,
    ArtifactInfo,
    Binding,
    JobView,
    PlacementSettings,
    count_demand,
    job_order_key,
    plan_bindings,
    plan_placement,
)
from stoker.operator.planner import Planner, PromiseSettings
from stoker.userank import DEFAULT_HALF_LIFE_S, FleetRank, add_use

if TYPE_CHECKING:
    from stoker.sim.engine import AgentState, JobRecord, Simulator

__all__ = [
    "AgentView",
    "add_use",
    "ArtifactInfo",
    "Binding",
    "CachedItem",
    "DiskCacheState",
    "FleetRank",
    "InsufficientCache",
    "JobView",
    "PlacementSettings",
    "agent_view",
    "DEFAULT_HALF_LIFE_S",
    "artifact_map",
    "count_demand",
    "job_order_key",
    "job_view",
    "new_disk_cache",
    "plan_bindings",
    "plan_eviction",
    "plan_placement",
    "Planner",
    "PromiseSettings",
]


def new_disk_cache(
    budget_bytes: int, *, baked: dict[str, int] | None = None, now: float = 0.0,
    half_life_s: float | None = DEFAULT_HALF_LIFE_S,
) -> DiskCacheState:
    """An empty agent disk cache with the image's baked-in models registered as preloaded.

    `half_life_s=None` gives plain LRU (the baselines); the default is the agent's own."""
    state = DiskCacheState(budget_bytes=budget_bytes, half_life_s=half_life_s)
    for key, size_bytes in sorted((baked or {}).items()):
        state = state.add_preloaded(key, size_bytes, now=now)
    return state


def job_view(sim: Simulator, job: JobRecord) -> JobView:
    return JobView(
        key=str(job.job_id),
        model=job.request.model,
        loras=job.request.loras,
        created_at=job.request.submit_s,
        failed_agents=frozenset(job.failed_agents),
        attempt=job.attempt + 1,
        expected_run_s=sim.inference_s(job),
    )


def _remaining_s(sim: Simulator, agent: AgentState, now: float) -> tuple[float, ...]:
    """Expected remaining seconds of each bound job: the running one, then the rest in
    queue order (one GPU runs them one at a time; a download counts in full)."""
    out: list[float] = []
    fleet = sim.fleet
    t = agent.gpu_free_s if agent.gpu_job is not None else now
    if agent.gpu_job is not None:
        out.append(max(1e-3, t - now))
    for job in agent.jobs:
        if job is agent.gpu_job:
            continue
        load_s = 0.0
        for key in job.request.artifacts:
            size = sim.size[key]
            if key in agent.vram:
                continue
            if key in agent.ram:
                load_s += size / fleet.ram_to_gpu_bytes_per_s
                continue
            if not agent.on_disk(key):
                load_s += size / fleet.download_bytes_per_s
            load_s += size / fleet.disk_to_gpu_bytes_per_s
        t += load_s + sim.inference_s(job)
        out.append(max(1e-3, t - now))
    return tuple(out)


def agent_view(
    sim: Simulator, agent: AgentState, now: float, *, queue_slots: bool = True, frequency_ranks: bool = True,
    peers: bool = False,
) -> AgentView:
    """What the operator would read from this agent's CacheAgent status (assumed fresh).

    The agent has one GPU: one generation slot, and `FleetConfig.slots - 1` queue slots
    whose downloads overlap the running job. `queue_slots=False` reports every slot as a
    generation slot instead (what placement saw before queue slots existed). Disk ranks
    are the agent's own eviction ranks, as its CacheAgent status reports them
    (`models[].rank`, the snapshot's `eviction_rank_s`), or with `frequency_ranks=False`
    the last use of each model (`models[].lastUsed`: what placement sees of an agent
    that reports no rank). `peers`: the agent is in the peer tier (CacheAgent `peer`), with
    the transfer rate one peer fetch gets (its measured `peerBps`)."""
    fleet = sim.fleet
    disk = agent.disk
    downloading = _downloading(sim, agent, now)
    in_use: set[str] = set()
    for job in agent.jobs:
        if job.active:
            in_use.update(job.request.artifacts)
    return AgentView(
        name=agent.name,
        node=agent.name,
        zone=agent.zone,
        ready=agent.visible,
        slots=1 if queue_slots else fleet.slots,
        queue_slots=fleet.slots - 1 if queue_slots else 0,
        free_slots=max(0, fleet.slots - len(agent.jobs)),
        running_remaining_s=_remaining_s(sim, agent, now),
        vram_capacity_bytes=fleet.vram_weights_bytes,
        vram_free_bytes=fleet.vram_weights_bytes - agent.vram_used,
        ram_capacity_bytes=fleet.ram_bytes,
        ram_free_bytes=fleet.ram_bytes - agent.ram_used,
        disk_capacity_bytes=disk.budget_bytes,
        disk_free_bytes=disk.free_bytes,
        vram=frozenset(agent.vram),
        ram=frozenset(agent.ram),
        disk=frozenset(disk.entries),
        disk_rank_s=(
            {i.key: eviction_rank(i)[0] for i in disk.items()} if frequency_ranks
            else {e.key: e.last_used for e in disk.entries.values() if not e.preloaded}
        ),
        downloading=downloading,
        preloaded=agent.baked,
        held=agent.held,
        in_use=frozenset(in_use),
        download_bps=fleet.download_bytes_per_s,
        disk_to_gpu_bps=fleet.disk_to_gpu_bytes_per_s,
        ram_to_gpu_bps=fleet.ram_to_gpu_bytes_per_s,
        serves_peers=peers,
        peer_bps=min(fleet.peer_bytes_per_s, fleet.peer_upload_bytes_per_s / max(1, fleet.peer_upload_slots))
        if peers else None,
    )


def artifact_map(sizes: Mapping[str, int]) -> dict[str, ArtifactInfo]:
    """Every artifact's info, built once per run as the operator keeps it from ModelCache watches."""
    return {k: ArtifactInfo(k, size) for k, size in sizes.items()}


def _downloading(sim: Simulator, agent: AgentState, now: float) -> dict[str, int]:
    downloading: dict[str, int] = {}
    if agent.downloading is not None:
        size = sim.size[agent.downloading]
        transfer = agent.transfer
        rate = transfer.rate if transfer is not None else sim.fleet.download_bytes_per_s
        left_s = max(0.0, agent.download_done_s - now)
        downloading[agent.downloading] = max(0, int(size - min(size, left_s * rate)))
    for key in agent.download_queue:
        downloading.setdefault(key, 0)
    return downloading

