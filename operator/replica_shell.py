"""Warm replicas, applied: CacheAgent spec.holds and ModelCache status (shell).

`apply_once()` builds the replica planner's inputs from observed state, calls
`replicas.plan_replicas`, and writes only what changed: an agent's holds when its
order list differs, a ModelCache's status when its content differs. The fields that
move with every job (demand, lastUsed, the fleet use rank) are refreshed at most every
`demand_refresh_s`, except that useRank is written at once when it moved by
`userank.PUBLISH_MIN_CHANGE_S` or more (`is_status_write_due`): a busy model costs a
status write every half minute, not one per job or per pass.

Both writes carry resourceVersion preconditions. spec.holds is a compare-and-swap:
when the CacheAgent changed since it was observed (usually the agent's own status
report), the write re-reads it and retries only if spec.holds is still what the plan
was made from; otherwise the next pass plans again from the newer object.

Events on the ModelCache: ReplicaAdded / ReplicaReleased and HotReplicaAdded /
HotReplicaReleased for each order, and one per condition change: TargetMet /
TargetNotMet (Ready), CopiesExist / NoCopies (Available), SourceFailed /
SourceRecovered (Failed).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from stoker import userank
from stoker.api import Condition, ConditionStatus
from stoker.api.modelcache import ModelCacheStatus, ModelCopy
from stoker.operator import metrics, peer_copies, placement, replicas, sourcehealth
from stoker.operator.scheduler import Writer
from stoker.operator.state import (ObservedAgent, ObservedModel, State, agent_from_body, agent_view, current_copies,
                                   format_time, measured_sizes, model_size_bytes)
from stoker.units import format_bytes

CONDITION_EVENTS = {
    ("Ready", True): ("TargetMet", False), ("Ready", False): ("TargetNotMet", False),
    ("Available", True): ("CopiesExist", False), ("Available", False): ("NoCopies", True),
    ("Failed", True): ("SourceFailed", True), ("Failed", False): ("SourceRecovered", False),
}
"""(condition type, new status) -> (Event reason, is a warning)."""

log = logging.getLogger(__name__)

MODEL_LABEL = "stoker.dev/model"
"""The scale subresource's selector names the model with this label (HPA requires a selector)."""


@dataclasses.dataclass(frozen=True)
class Copies:
    """One ModelCache's copies as the agents report them."""

    entries: list[dict[str, Any]]
    """The status `copies` entries (by agent name)."""
    size_bytes: int | None = None
    """The size of a copy as an agent measured it (None: no agent reported one)."""
    digests: dict[str, int] = dataclasses.field(default_factory=dict)
    """How many agents report each digest for their copy (downloaded copies only)."""


@functools.lru_cache(maxsize=1 << 16)
def _copy_entry(agent: str, tier: str, held: bool) -> dict[str, Any]:
    """A status `agents` entry (shared between calls: never modified). The same few per agent
    turn up on every pass over a large fleet; validating and dumping each one every time cost
    more than the replica plan."""
    return ModelCopy(agent=agent, tier=tier, held=held).wire()  # type: ignore[arg-type]


def copies_by_model(agents: list[ObservedAgent], model_uids: dict[str, str]) -> dict[str, Copies]:
    """Model name -> its copies on `agents` (one namespace's): one pass over the agents. A copy fetched
    for an earlier ModelCache of the same name (another uid) is nobody's copy (see current_copies)."""
    entries: dict[str, list[dict[str, Any]]] = {}
    sizes: dict[str, int] = {}
    digests: dict[str, dict[str, int]] = {}
    for a in sorted(agents, key=lambda a: a.name):
        status = a.resource.status
        if status is None:
            continue
        held = {h.model for h in a.resource.spec.holds}
        seen: set[str] = set()
        for entry in current_copies(a, model_uids):
            if entry.name not in seen:
                seen.add(entry.name)
                entries.setdefault(entry.name, []).append(_copy_entry(a.name, entry.tier, entry.name in held))
                if entry.size_bytes > 0:
                    sizes.setdefault(entry.name, entry.size_bytes)
                if entry.sha256:
                    counts = digests.setdefault(entry.name, {})
                    counts[entry.sha256] = counts.get(entry.sha256, 0) + 1
        for d in status.downloads:
            if d.name not in seen:
                seen.add(d.name)
                entries.setdefault(d.name, []).append(_copy_entry(a.name, "downloading", d.name in held))
    return {name: Copies(found, sizes.get(name), digests.get(name, {})) for name, found in entries.items()}


def _round_rate(value: float) -> float:
    """Two significant digits: enough for people and autoscale, few rewrites as it decays."""
    if value <= 0:
        return 0.0
    digits = 1 - int(math.floor(math.log10(value)))
    return round(value, max(0, digits))


def _conditions_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    def strip(cs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((c.get("type"), c.get("status"), c.get("reason", ""), c.get("message", "")) for c in cs)
    return strip(a) == strip(b)


VOLATILE_FIELDS = ("demandJobsPerMinute", "lastUsed", "useRank", "useRankCountedThrough")
"""ModelCache status fields that move with every job (see `is_status_write_due`)."""


def is_status_write_due(current: dict[str, Any], new: dict[str, Any], *, since_write_s: float, refresh_s: float,
                        rank_min_change_s: float = userank.PUBLISH_MIN_CHANGE_S) -> bool:
    """Whether the ModelCache status `current` (as on the server) needs rewriting as `new` (pure).

    At once when a field other than the `VOLATILE_FIELDS` differs (copies, targets, conditions
    apart from their timestamps) or useRank moved by `rank_min_change_s` or more; otherwise when
    a volatile field differs and the last write is `refresh_s` old. `new` holds every field,
    None for an absent one."""
    for key, value in new.items():
        if key == "conditions":
            if not _conditions_equal(current.get("conditions", []), value):
                return True
        elif key not in VOLATILE_FIELDS and current.get(key) != value:
            return True
    if userank.is_publish_due(current.get("useRank"), new.get("useRank"), min_change_s=rank_min_change_s):
        return True
    changed = any(current.get(k) != new.get(k) for k in VOLATILE_FIELDS if k != "demandJobsPerMinute")
    changed = changed or current.get("demandJobsPerMinute", 0.0) != new.get("demandJobsPerMinute", 0.0)
    return changed and since_write_s >= refresh_s


class ReplicaShell:
    def __init__(self, state: State, writer: Writer, *, lease_grace_s: float | None,
                 settings: replicas.ReplicaSettings = replicas.ReplicaSettings(), demand_refresh_s: float = 30.0) -> None:
        self.state = state
        self.writer = writer
        self.lease_grace_s = lease_grace_s
        self.settings = settings
        self.demand_refresh_s = demand_refresh_s
        self._status_written: dict[str, float] = {}
        self._wired: dict[str, tuple[ModelCacheStatus, dict[str, Any]]] = {}
        """Model key -> (its status as last seen, that status's wire form): dumped once per change."""
        self._views: dict[str, tuple[tuple[str, bool, int], placement.AgentView]] = {}

    def apply_once(self, *, now: float | None = None, now_mono: float | None = None) -> int:
        now = time.time() if now is None else now
        now_mono = time.monotonic() if now_mono is None else now_mono
        st = self.state
        with st.lock:
            models = list(st.models.values())
            agents = list(st.agents.values())
            failed = dict(st.source_failed)
        started = 0
        shortfall = hot_shortfall = 0
        # Views of agents that are gone are dropped with this pass.
        self._views = {a.key: self._views[a.key] for a in agents if a.key in self._views}
        if len(self._wired) > len(models):
            self._wired = {m.key: self._wired[m.key] for m in models if m.key in self._wired}
        for ns in sorted({m.namespace for m in models} | {a.namespace for a in agents}):
            ns_models = [m for m in models if m.namespace == ns]
            ns_agents = [a for a in agents if a.namespace == ns]
            uids = st.model_uids()
            views = [self._view(a, now_mono, uids) for a in ns_agents]
            measured = measured_sizes(ns_agents, uids)
            targets = []
            for m in ns_models:
                spec = m.resource.spec
                auto = None if spec.autoscale is None else replicas.Autoscale(
                    max_replicas=spec.autoscale.max_replicas, target_jobs_per_minute=spec.autoscale.target_jobs_per_minute)
                targets.append(replicas.ModelTarget(
                    key=m.name, size_bytes=measured.get(m.key) or model_size_bytes(m, ()), replicas=spec.replicas,
                    hot_replicas=spec.hot_replicas, autoscale=auto,
                    demand_per_minute=st.demand_per_minute(m.key, now=now), failed=m.key in failed))
            plan = replicas.plan_replicas(targets, views, now=now, settings=self.settings)
            by_name = {a.name: a for a in ns_agents}
            model_by_name = {m.name: m for m in ns_models}
            for orders in plan.orders:
                started += self._apply_orders(by_name[orders.agent], orders, model_by_name)
            copies = copies_by_model(ns_agents, uids)
            # Agents outside the tier get an empty list, so one that leaves it keeps no stale word.
            duplicates = peer_copies.plan_duplicates(views)
            for name in sorted(by_name):
                started += self._apply_duplicates(by_name[name], sorted(duplicates.get(name, ())))
            for ms in plan.models:
                shortfall += ms.shortfall
                hot_shortfall += ms.hot_shortfall
                started += self._apply_status(model_by_name[ms.key], ms, copies.get(ms.key, Copies([])),
                                              failed.get(m_key(ns, ms.key)), now)
        metrics.REPLICA_SHORTFALL.set(shortfall)
        metrics.HOT_REPLICA_SHORTFALL.set(hot_shortfall)
        return started

    def _apply_orders(self, agent: ObservedAgent, orders: replicas.AgentOrders,
                      models: dict[str, ObservedModel]) -> int:
        want = [{"model": k, "tier": t.value} for k, t in orders.holds]
        have = [h.wire() for h in agent.resource.spec.holds]
        if want == have:
            return 0
        key = f"ca:{agent.key}:holds"
        if not self.writer.may_act(key, agent.resource_version):
            return 0

        def write() -> None:
            # spec.holds is the operator's alone; spec.cordon (people's) is left out of the merge patch.
            objs = self.writer.objects(agent.namespace)
            rv = agent.resource_version
            for _ in range(5):
                try:
                    body = objs.patch("CacheAgent", agent.name, {"spec": {"holds": want}}, resource_version=rv)
                    break
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                fresh = objs.get("CacheAgent", agent.name)
                self.state.upsert_agent(fresh)
                current = agent_from_body(fresh)
                if [h.wire() for h in current.resource.spec.holds] != have:
                    return  # someone else changed the holds: plan again from what is there now
                rv = current.resource_version
            else:
                return
            self.state.upsert_agent(body)
            for k in (*orders.prefetch, *orders.hold):
                if k in models:
                    how = "prefetching it" if k in orders.prefetch else "already on its disk"
                    self.writer.event(models[k].ref(), reason="ReplicaAdded", message=f"agent {agent.name} holds a copy ({how})")
            for k in orders.load_hot:
                if k in models:
                    self.writer.event(models[k].ref(), reason="HotReplicaAdded", message=(
                        f"agent {agent.name} is ordered to keep it loaded; it loads it once its copy is on disk "
                        "(condition Ready counts the copies it reports loaded)"))
            for k in orders.release:
                if k in models:
                    self.writer.event(models[k].ref(), reason="ReplicaReleased",
                                      message=f"agent {agent.name} no longer holds a copy (it may evict it)")
            for k in orders.unload_hot:
                if k in models:
                    self.writer.event(models[k].ref(), reason="HotReplicaReleased",
                                      message=f"agent {agent.name} no longer keeps it loaded")
            log.info("agent %s holds %s", agent.key, ", ".join(f"{h['model']}:{h['tier']}" for h in want) or "nothing")

        return int(self.writer.submit(key, agent.resource_version, write))

    def _apply_duplicates(self, agent: ObservedAgent, want: list[str]) -> int:
        """spec.duplicates: the agent's copies another agent of the peer tier also holds. The
        operator is the field's only writer, so a plain merge patch of it suffices."""
        if sorted(agent.resource.spec.duplicates) == want:
            return 0
        key = f"ca:{agent.key}:duplicates"
        if not self.writer.may_act(key, agent.resource_version):
            return 0

        def write() -> None:
            body = self.writer.objects(agent.namespace).patch("CacheAgent", agent.name, {"spec": {"duplicates": want}})
            self.state.upsert_agent(body)

        return int(self.writer.submit(key, agent.resource_version, write))


    def _view(self, agent: ObservedAgent, now_mono: float, model_uids: dict[str, str]) -> placement.AgentView:
        """The agent's view for replica planning (every slot free), reused while the agent, its
        readiness, its bound jobs and the ModelCache uids are unchanged."""
        st = self.state
        ready = st.agent_ready(agent.key, now_mono=now_mono, grace_s=self.lease_grace_s)
        with st.lock:
            sig = (agent.resource_version, ready, st.agent_jobs_version.get(agent.key, 0), st.uids_version)
        cached = self._views.get(agent.key)
        if cached is None or cached[0] != sig:
            cached = (sig, agent_view(agent, ready=ready, bound=0, in_use=st.agent_load(agent.key)[1],
                                      model_uids=model_uids))
            self._views[agent.key] = cached
        return cached[1]

    def _apply_status(self, model: ObservedModel, ms: replicas.ModelReplicaStatus, copies: Copies,
                      failure: sourcehealth.SourceVerdict | None, now: float) -> int:
        last_used = self.state.last_used.get(model.key)
        rank = self.state.use_rank(model.key)
        old = model.resource.status or ModelCacheStatus()
        old_conds = {c.type: c for c in old.conditions}

        def cond(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
            status = ConditionStatus.TRUE if ok else ConditionStatus.FALSE
            prev = old_conds.get(type_)
            ts = prev.last_transition_time if prev is not None and prev.status == status else format_time(now)
            return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=ts,
                             observed_generation=model.generation).wire()

        conditions = [
            cond("Ready", ms.ready, "TargetMet" if ms.ready else "TargetNotMet",
                 f"{max(0, ms.desired - ms.shortfall)} of {ms.desired} held copies on disk, "
                 f"{ms.desired_hot - ms.hot_shortfall} of {ms.desired_hot} loaded"),
            cond("Available", ms.available, "CopiesExist" if ms.available else "NoCopies",
                 f"{ms.on_disk} agents have it on disk"),
            cond("Failed", failure is not None, failure.reason if failure else "SourceOK",
                 failure.message if failure else "no persistent failures fetching the source"),
        ]
        transitions = []
        for c in conditions:
            prev = old_conds.get(c["type"])
            now_true = c["status"] == ConditionStatus.TRUE
            # A change of status is an Event; so is a first status that reports something (True).
            changed = now_true if prev is None else (prev.status == ConditionStatus.TRUE) != now_true
            if changed:
                reason, warning = CONDITION_EVENTS[(c["type"], now_true)]
                transitions.append((reason, c["message"] if c["type"] != "Failed" or not now_true
                                    else f"{c['reason']}: {c['message']}", warning))
        hint = model.resource.spec.source.size_bytes
        size, size_source = ((copies.size_bytes, "Measured") if copies.size_bytes else
                             (hint, "Spec") if hint else (None, "Unknown"))
        held_on_disk = max(0, ms.desired - ms.shortfall)
        hot_loaded = max(0, ms.desired_hot - ms.hot_shortfall)
        new = {
            "observedGeneration": model.generation,
            "sizeBytes": size,
            "size": format_bytes(size),
            "sizeSource": size_source,
            "sha256": published_sha256(model, copies),
            "desiredReplicas": ms.desired,
            "replicas": held_on_disk,
            "selector": f"{MODEL_LABEL}={model.name}",
            "ready": f"{held_on_disk}/{ms.desired}" + (f" hot {hot_loaded}/{ms.desired_hot}" if ms.desired_hot else ""),
            "desiredHotReplicas": ms.desired_hot,
            "copies": {"disk": ms.on_disk, "ram": ms.in_ram, "vram": ms.in_vram},
            "agents": copies.entries,
            "demandJobsPerMinute": _round_rate(ms.demand_per_minute),
            "lastUsed": format_time(last_used) if last_used else None,
            # A pair from one snapshot: the rank counts no job created after that time (see stoker.userank).
            "useRank": round(rank.rank_s, 3) if rank is not None and rank.rank_s is not None else None,
            "useRankCountedThrough": (format_time(rank.counted_through_s)
                                      if rank is not None and rank.counted_through_s is not None else None),
            "conditions": conditions,
        }
        wired = self._wired.get(model.key)
        if wired is None or wired[0] is not old:
            wired = self._wired[model.key] = (old, old.wire())
        if not is_status_write_due(wired[1], new, since_write_s=now - self._status_written.get(model.key, -math.inf),
                                   refresh_s=self.demand_refresh_s):
            return 0
        new = {k: v for k, v in new.items() if v is not None}
        if size is None and old.size_bytes is not None:
            new["sizeBytes"] = None  # an older status showed a guess: sizes unknown say so
        key = f"mc:{model.key}"
        if not self.writer.may_act(key, model.resource_version):
            return 0

        def write() -> None:
            body = self.writer.objects(model.namespace).patch_status("ModelCache", model.name, new,
                                                                     resource_version=model.resource_version)
            self.state.upsert_model(body)
            self._status_written[model.key] = now
            for reason, message, warning in transitions:
                (log.warning if warning else log.info)("model %s: %s: %s", model.key, reason, message)
                self.writer.event(model.ref(), reason=reason, message=message, warning=warning)

        return int(self.writer.submit(key, model.resource_version, write))


def published_sha256(model: ObservedModel, copies: Copies) -> str | None:
    """The digest agents verify copies from each other against: spec.source.sha256, else the one
    already published (the first verified copy's; it never changes for the ModelCache's life, as
    its URL does not), else the digest most agents report for their copy (ties: by digest)."""
    spec = model.resource.spec.source.sha256
    if spec:
        return spec
    old = model.resource.status.sha256 if model.resource.status is not None else None
    if old:
        return old
    counts = copies.digests
    return min(counts, key=lambda d: (-counts[d], d)) if counts else None


def m_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"
