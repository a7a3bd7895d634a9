"""Build the CacheAgent status from the tiers' snapshots (pure: values in, dict out)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

from stoker.agent.faults import FaultView
from stoker.units import format_usage
from stoker.api.cacheagent import (
    Bandwidths, CacheAgentStatus, CachedModel, DownloadProgress, GpuInfo, LocalFault, ModelFailure, PeerEndpoint,
    RunningJob,
    TierUsage,
)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Where the agent runs."""

    pod: str
    node: str
    zone: str
    gpu_model: str
    vram_bytes: int


@dataclasses.dataclass(frozen=True)
class TierEntryView:
    key: str
    size_bytes: int
    last_used: float


@dataclasses.dataclass(frozen=True)
class TierView:
    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    entries: tuple[TierEntryView, ...]


@dataclasses.dataclass(frozen=True)
class DiskEntryView:
    key: str
    size_bytes: int
    last_used: float
    preloaded: bool
    held: bool
    rank_s: float | None = None
    """The disk tier's eviction rank (Unix seconds, lowest evicted first); None when never evicted."""
    model_uid: str | None = None
    """The ModelCache the copy was fetched for."""
    sha256: str | None = None
    """Digest of the file as downloaded (None for baked-in files): other agents fetch it under this."""


@dataclasses.dataclass(frozen=True)
class DownloadView:
    key: str
    bytes_done: int
    total_bytes: int | None


@dataclasses.dataclass(frozen=True)
class DiskView:
    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    entries: tuple[DiskEntryView, ...]
    downloads: tuple[DownloadView, ...]


def _name(key: str) -> str:
    """ModelCache name of a "namespace/name" key."""
    return key.rsplit("/", 1)[-1]


def _rank(rank_s: float | None) -> float | None:
    # Milliseconds are plenty on a 2 h half-life, and rounding keeps the report stable.
    return None if rank_s is None else round(rank_s, 3)


def _time(ts: float) -> str | None:
    if ts <= 0:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_status(*, identity: Identity, disk: DiskView, ram: TierView, vram: TierView, slots: int,
                 running: Sequence[RunningJob], failures: Sequence[ModelFailure], bandwidth: Bandwidths,
                 observed_generation: int | None, queue_slots: int = 0,
                 local_faults: Sequence[FaultView] = (), accepting: bool = True,
                 hot: Mapping[str, str] | None = None, results_port: int | None = None,
                 peer: PeerEndpoint | None = None) -> CacheAgentStatus:
    """The agent's report: each model once, at its fastest tier, LRU timestamps merged, with
    the disk tier's eviction rank (`models[].rank`, read by placement).

    `queue_slots` jobs may be bound beyond the `slots` that generate at once; `hot` maps the
    keys of the hot replicas kept loaded to their tier (`models[].hot`). `local_faults` make
    the agent `degraded`; a failure listed there is never a model failure. An agent that is
    not `accepting` (shutting down) offers no free slots. `peer` is the endpoint other agents
    fetch this agent's files from (None: it serves none)."""
    models: dict[str, CachedModel] = {}
    last_used: dict[str, float] = {}
    for e in disk.entries:
        models[e.key] = CachedModel(name=_name(e.key), tier="disk", size_bytes=e.size_bytes,
                                    rank=_rank(e.rank_s), preloaded=e.preloaded, held=e.held, uid=e.model_uid,
                                    sha256=None if e.preloaded else e.sha256)
        last_used[e.key] = e.last_used
    for tier_name, tier in (("ram", ram), ("vram", vram)):
        for t in tier.entries:
            base = models.get(t.key)
            models[t.key] = CachedModel(name=_name(t.key), tier=tier_name, size_bytes=base.size_bytes if base else t.size_bytes,
                                        rank=base.rank if base else None,
                                        preloaded=base.preloaded if base else False, held=base.held if base else False,
                                        uid=base.uid if base else None,
                                        sha256=base.sha256 if base else None)
            last_used[t.key] = max(last_used.get(t.key, 0.0), t.last_used)
    hot = hot or {}
    listed = [m.model_copy(update={"last_used": _time(last_used[k]), "hot": hot.get(k)})
              for k, m in sorted(models.items())]
    return CacheAgentStatus(
        pod=identity.pod, node=identity.node, zone=identity.zone,
        gpu=GpuInfo(model=identity.gpu_model, vram_bytes=identity.vram_bytes),
        disk=TierUsage(budget_bytes=disk.budget_bytes, used_bytes=disk.used_bytes, reserved_bytes=disk.reserved_bytes),
        ram=TierUsage(budget_bytes=ram.budget_bytes, used_bytes=ram.used_bytes, reserved_bytes=ram.reserved_bytes),
        vram=TierUsage(budget_bytes=vram.budget_bytes, used_bytes=vram.used_bytes, reserved_bytes=vram.reserved_bytes),
        models=listed,
        disk_usage=format_usage(disk.used_bytes, disk.budget_bytes),
        vram_usage=format_usage(vram.used_bytes, vram.budget_bytes),
        models_on_disk=len(disk.entries),
        hot_models=len(vram.entries),
        downloads=[DownloadProgress(name=_name(d.key), bytes_done=d.bytes_done, bytes_total=d.total_bytes)
                   for d in disk.downloads],
        slots=slots,
        queue_slots=queue_slots,
        free_slots=max(0, slots + queue_slots - len(running)) if accepting else 0,
        running=list(running),
        model_failures=list(failures),
        degraded=bool(local_faults),
        local_faults=[LocalFault(reason=f.reason, message=f.message, since=_time(f.since), last_seen=_time(f.last_seen))
                      for f in local_faults],
        accepting=accepting,
        bandwidth=bandwidth,
        observed_generation=observed_generation,
        results_port=results_port,
        peer=peer,
    )
