"""The operator's in-memory picture of the cluster, built from watch events (shell).

kopf's `on.event` watchers feed every GenerationJob, CacheAgent, ModelCache and
Lease event into one `State`; nothing here writes to the API server. Objects are
validated with the stoker.api models at this boundary and kept as small frozen
records. The conversions from those records to the pure cores' inputs
(`placement.AgentView`/`JobView`, `jobstate.JobState`, `replicas.ModelTarget`) and
back (status patches) live here too, so the cores never see a raw dict.

Each model's fleet-wide use rank (`stoker.userank.FleetRank`, published as ModelCache
`useRank`) counts every GenerationJob once, at its creation: a job is counted the first
time its uid is seen, into the rank seeded from the model's published status the first
time the model is seen (jobs seen before their model wait for it), so a restarted or
newly elected operator never counts a job twice.

Agent liveness follows the node-lifecycle controller: the operator notes, on its
own monotonic clock, when it last saw each Lease's renewTime change, so clock skew
between agent and operator hosts cannot make an agent look alive or dead.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pydantic

from stoker.api import CacheAgent, GenerationJob, ModelCache
from stoker.api.generationjob import Attempt, AttemptFailure
from stoker.api.protocol import (AGENT_FAULT_REASONS, AGENT_LABEL, ATTEMPT_ANNOTATION, SCHEDULED_AT_ANNOTATION,
                                 UNBOUND_ANNOTATION)
from stoker import userank
from stoker.operator import jobstate, metrics, placement, replicas, sourcehealth

log = logging.getLogger(__name__)

UNKNOWN_SIZE_BYTES = 4 << 30
DISK_FAULTS = frozenset({"DiskFull", "DiskError"})
"""CacheAgent localFaults that keep an agent from downloading (see stoker.agent.faults)."""
UNKNOWN_SIZE_BY_KIND = {"checkpoint": 4 << 30, "lora": 256 << 20, "vae": 320 << 20, "embedding": 1 << 20,
                        "upscaler": 128 << 20, "controlnet": 1536 << 20}
"""Placement's guess for a file whose size no agent measured and no spec gives: typical sizes of
the kind (LoRAs 10-400 MB), so a LoRA without sizeBytes is not planned as a 4 GiB file. Never
shown as a size (ModelCache status.sizeSource says Unknown)."""


def guessed_size_bytes(model: ObservedModel) -> int:
    return UNKNOWN_SIZE_BY_KIND.get(str(model.resource.spec.kind), UNKNOWN_SIZE_BYTES)


def unknown_size_bytes(model: ObservedModel, *, vram_bytes: int | None) -> int:
    """What placement assumes for a file of unknown size: the kind's typical size, at most half
    of `vram_bytes` (the largest VRAM budget in the namespace), so that a guess never makes a
    job fit nowhere; the download measures the real size."""
    guess = guessed_size_bytes(model)
    return guess if not vram_bytes else min(guess, vram_bytes // 2)
EARLY_USES_PER_MODEL = 4096
"""Creation times kept per model for jobs seen before their ModelCache (the newest are kept)."""


class StateError(RuntimeError):
    """Root of the operator shell's errors about observed objects."""


def parse_time(value: str | None) -> float | None:
    """RFC 3339 -> seconds since the epoch (None stays None; unparsable is None)."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- records ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedJob:
    """One GenerationJob as last seen on the watch."""

    key: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    created_at: float
    model: str
    loras: tuple[str, ...]
    vae: str | None
    priority: int
    max_attempts: int
    timeout_s: float
    ttl_s: float | None
    bound_agent: str | None
    """The agent label: set exactly while the job is bound."""
    bound_attempt: int | None
    """The attempt annotation."""
    phase: jobstate.JobPhase
    status_agent: str | None
    status_attempt: int
    history: tuple[Attempt, ...]
    attempt_failure: AttemptFailure | None
    reason: str | None
    finished_at: float | None
    scheduled_at: float | None
    """When the current attempt was bound: the agent's status.scheduledAt, else the binding's annotation."""
    started_at: float | None = None
    generation: int = 1
    conditions: tuple[dict[str, Any], ...] = ()
    """status.conditions as on the server (every writer rewrites the whole list)."""
    message: str | None = None
    missing_grace_s: float | None = None
    """spec.missingModelGraceSeconds (None: the operator's default)."""
    unbound_from: tuple[str, int] | None = None
    """(agent, attempt) of the binding the operator last removed (UNBOUND_ANNOTATION)."""

    @property
    def terminal(self) -> bool:
        return self.phase.terminal

    @property
    def unbinding(self) -> bool:
        """The binding was removed but the status write that goes with it (the attempt's history
        record) never landed: the operator stopped in between. The reconciler finishes it."""
        if self.unbound_from is None or self.bound_agent is not None or self.terminal:
            return False
        attempt = self.unbound_from[1]
        return self.status_attempt <= attempt and not any(h.attempt == attempt for h in self.history)

    @property
    def pending(self) -> bool:
        """Waiting for a binding: unbound, not finished, and not mid-unbind."""
        return self.bound_agent is None and self.phase is jobstate.JobPhase.PENDING and not self.unbinding

    @property
    def roles(self) -> tuple[tuple[str, str], ...]:
        """(ModelCache name, role) of every file the job names, checkpoint first."""
        out = [(self.model, "model"), *((name, "lora") for name in self.loras)]
        if self.vae is not None:
            out.append((self.vae, "vae"))
        return tuple(dict.fromkeys(out))

    @property
    def artifacts(self) -> tuple[str, ...]:
        keys = [self.model, *self.loras]
        if self.vae is not None:
            keys.append(self.vae)
        return tuple(dict.fromkeys(keys))

    def ref(self) -> dict[str, Any]:
        """Enough of the object for Events."""
        return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                             "resourceVersion": self.resource_version}}


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedAgent:
    key: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    resource: CacheAgent

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedModel:
    key: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    generation: int
    resource: ModelCache
    spec_since: float | None = None
    """When the current spec took effect, as far as the metadata tells (see `spec_changed_at`)."""

    def identity(self) -> sourcehealth.ModelIdentity:
        return sourcehealth.ModelIdentity(uid=self.uid, generation=self.generation, spec_since=self.spec_since)

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


@dataclasses.dataclass(slots=True)
class LeaseRecord:
    resource_version: str
    renew_time: str | None
    duration_s: float
    observed_at: float
    """Operator monotonic time when renew_time last changed."""
    held: bool = True
    """False once the holder released it (no holderIdentity): the agent shut down."""


def _object_key(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata", {})
    return f"{meta.get('namespace')}/{meta.get('name')}"


def is_older(new_rv: str, old_rv: str) -> bool:
    """True when `new_rv` is an older resourceVersion than `old_rv` (a late event or a stale list).

    resourceVersions are opaque to clients; the API server's are etcd revisions, and an
    unparsable one is never treated as older."""
    try:
        return int(new_rv) < int(old_rv)
    except ValueError:
        return False


def job_from_body(body: Mapping[str, Any]) -> ObservedJob:
    """Validate a GenerationJob dict into a record (raises StateError when it is not one)."""
    try:
        job = GenerationJob.model_validate(body)
    except pydantic.ValidationError as exc:
        meta = body.get("metadata", {})
        raise StateError(f"GenerationJob {meta.get('namespace')}/{meta.get('name')} does not validate: {exc}") from exc
    meta = job.metadata
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    try:
        bound_attempt = int(annotations[ATTEMPT_ANNOTATION]) if ATTEMPT_ANNOTATION in annotations else None
    except ValueError:
        bound_attempt = None
    unbound_from = parse_unbound(annotations.get(UNBOUND_ANNOTATION))
    status = job.status
    spec = job.spec
    ns, name = job.namespace, job.name
    return ObservedJob(
        key=f"{ns}/{name}", namespace=ns, name=name, uid=str(meta.get("uid", "")),
        resource_version=str(meta.get("resourceVersion", "")),
        created_at=parse_time(meta.get("creationTimestamp")) or 0.0,
        model=spec.model, loras=tuple(lr.name for lr in spec.loras), vae=spec.vae,
        priority=spec.priority, max_attempts=spec.max_attempts, timeout_s=float(spec.timeout_seconds),
        ttl_s=None if spec.ttl_seconds_after_finished is None else float(spec.ttl_seconds_after_finished),
        bound_agent=labels.get(AGENT_LABEL) or None, bound_attempt=bound_attempt,
        phase=jobstate.JobPhase(status.phase.value) if status else jobstate.JobPhase.PENDING,
        status_agent=status.agent if status else None,
        status_attempt=status.attempt if status else 0,
        history=tuple(status.history) if status else (),
        attempt_failure=status.attempt_failure if status else None,
        reason=status.reason if status else None,
        finished_at=parse_time(status.finished_at) if status else None,
        scheduled_at=(parse_time(status.scheduled_at) if status else None) or (
            parse_time(annotations.get(SCHEDULED_AT_ANNOTATION)) if labels.get(AGENT_LABEL) else None),
        started_at=parse_time(status.started_at) if status else None,
        generation=int(meta.get("generation") or 1),
        conditions=tuple(c.wire() for c in status.conditions) if status else (),
        message=status.message if status else None,
        missing_grace_s=(None if spec.missing_model_grace_seconds is None else float(spec.missing_model_grace_seconds)),
        unbound_from=unbound_from,
    )


def unbound_value(agent: str, attempt: int) -> str:
    """The UNBOUND_ANNOTATION value recording that `agent`'s binding for `attempt` was removed."""
    return f"{agent}/{attempt}"


def parse_unbound(value: str | None) -> tuple[str, int] | None:
    if not value or "/" not in value:
        return None
    agent, _, attempt = value.rpartition("/")
    try:
        return (agent, int(attempt)) if agent else None
    except ValueError:
        return None


def agent_from_body(body: Mapping[str, Any]) -> ObservedAgent:
    try:
        agent = CacheAgent.model_validate(body)
    except pydantic.ValidationError as exc:
        meta = body.get("metadata", {})
        raise StateError(f"CacheAgent {meta.get('namespace')}/{meta.get('name')} does not validate: {exc}") from exc
    meta = agent.metadata
    return ObservedAgent(key=f"{agent.namespace}/{agent.name}", namespace=agent.namespace, name=agent.name,
                         uid=str(meta.get("uid", "")), resource_version=str(meta.get("resourceVersion", "")),
                         resource=agent)


def model_from_body(body: Mapping[str, Any]) -> ObservedModel:
    try:
        model = ModelCache.model_validate(body)
    except pydantic.ValidationError as exc:
        meta = body.get("metadata", {})
        raise StateError(f"ModelCache {meta.get('namespace')}/{meta.get('name')} does not validate: {exc}") from exc
    meta = model.metadata
    generation = int(meta.get("generation") or 0)
    return ObservedModel(key=f"{model.namespace}/{model.name}", namespace=model.namespace, name=model.name,
                         uid=str(meta.get("uid", "")), resource_version=str(meta.get("resourceVersion", "")),
                         generation=generation, resource=model, spec_since=spec_changed_at(meta, generation=generation))


def spec_changed_at(meta: Mapping[str, Any], *, generation: int) -> float | None:
    """The earliest time after which the object's current spec surely applied: its creation
    while generation is 1, else the latest managedFields entry that writes spec (never before
    the change; later when that writer also changed something else, which only forgets more).
    Metadata times have whole seconds, so a second is added: anything within the second of
    the change counts as older. None when the metadata does not tell."""
    created = parse_time(meta.get("creationTimestamp"))
    if created is None:
        return None
    changed = created
    if generation > 1:
        for entry in meta.get("managedFields") or ():
            if not isinstance(entry, Mapping) or entry.get("subresource"):
                continue
            if "f:spec" in (entry.get("fieldsV1") or {}):
                changed = max(changed, parse_time(entry.get("time")) or changed)
    return changed + 1.0


# --- conversions to the pure cores -------------------------------------------------


def job_state(job: ObservedJob) -> jobstate.JobState:
    """The state machine's view of an observed job (the agent is the label while bound).

    A bound job is Scheduled for the state machine even while its status still says Pending:
    the binding is the label alone, and the agent records phase Scheduled when it accepts the
    job. A job whose unbind was cut short counts as still bound to the agent it was taken from
    (see `ObservedJob.unbinding`), so that the unbind is finished with its history record."""
    history = tuple(
        jobstate.AttemptRecord(a.attempt, a.agent, jobstate.Outcome(a.outcome), a.reason, a.message,
                               parse_time(a.finished_at) or 0.0, agent_fault=a.reason in AGENT_FAULT_REASONS)
        for a in job.history)
    bound_agent, bound_attempt = job.bound_agent, job.bound_attempt
    if job.unbinding:
        assert job.unbound_from is not None
        bound_agent, bound_attempt = job.unbound_from
    phase = job.phase
    if phase is jobstate.JobPhase.PENDING and bound_agent is not None:
        phase = jobstate.JobPhase.SCHEDULED
    active = phase in (jobstate.JobPhase.SCHEDULED, jobstate.JobPhase.RUNNING)
    agent = (job.bound_agent or job.status_agent or bound_agent or "") if active else None
    attempt = max(1, bound_attempt or 0, job.status_attempt)
    return jobstate.JobState(
        phase=phase, agent=agent,
        attempt=attempt, max_attempts=max(job.max_attempts, 1), history=history, reason=job.reason,
        created_at=job.created_at, deadline=job.created_at + job.timeout_s,
        bound_at=job.scheduled_at, finished_at=job.finished_at,
    )


def status_patch(before: jobstate.JobState, after: jobstate.JobState) -> dict[str, Any]:
    """The merge patch that moves a job's status from `before` to `after` (operator fields only)."""
    patch: dict[str, Any] = {}
    if after.phase != before.phase:
        patch["phase"] = after.phase.value
    if after.attempt != before.attempt:
        patch["attempt"] = after.attempt
    if after.agent != before.agent:
        patch["agent"] = after.agent
    if after.history != before.history:
        patch["history"] = [
            Attempt(attempt=r.attempt, agent=r.agent, outcome=r.outcome.value, reason=str(r.reason),
                    message=r.message[:2000], finished_at=format_time(r.at) if r.at else None).wire()
            for r in after.history][-100:]
    if after.reason != before.reason:
        patch["reason"] = None if after.reason is None else str(after.reason)
    if after.message != before.message:
        patch["message"] = after.message
    if after.finished_at != before.finished_at and after.finished_at is not None:
        patch["finishedAt"] = format_time(after.finished_at)
    if after.phase is jobstate.JobPhase.PENDING and before.phase is not jobstate.JobPhase.PENDING:
        # The next attempt starts clean; the old one's report lives in history.
        patch.update({"attemptFailure": None, "scheduledAt": None, "startedAt": None, "progress": None, "stage": None})
    return patch


def job_view(job: ObservedJob) -> placement.JobView:
    state = job_state(job)
    return placement.JobView(
        key=job.key, model=job.model, loras=job.loras, vae=job.vae, priority=float(job.priority),
        created_at=job.created_at, failed_agents=jobstate.failed_agents(state), attempt=state.attempt)


def current_copies(agent: ObservedAgent, model_uids: Mapping[str, str] | None) -> list[Any]:
    """The agent's reported copies that belong to the ModelCache now under their name: a copy fetched
    for an earlier ModelCache of the same name (another uid) is nobody's copy. Baked-in copies and
    copies reported without a uid count for whatever ModelCache has the name."""
    st = agent.resource.status
    if st is None:
        return []
    if not model_uids:
        return list(st.models)
    ns = agent.namespace
    return [m for m in st.models if m.uid is None or model_uids.get(f"{ns}/{m.name}", m.uid) == m.uid]


def agent_view(agent: ObservedAgent, *, ready: bool, bound: int, in_use: Iterable[str],
               model_uids: Mapping[str, str] | None = None) -> placement.AgentView:
    """Placement's view of an agent. Free slots come from the operator's own count of bound
    jobs (`bound`, including writes in flight) rather than the agent's debounced report;
    bindable slots are the generation slots plus the queue slots (jobs whose downloads and
    loads overlap the running generations). Disk ranks are the agent's own eviction ranks
    (`models[].rank`); an agent that reports none gets victims chosen by cost alone."""
    res = agent.resource
    st = res.status
    holds = res.spec.holds
    held = frozenset(h.model for h in holds)
    held_hot = frozenset(h.model for h in holds if h.tier == "vram")
    if st is None:
        return placement.AgentView(name=agent.name, ready=False, cordoned=res.spec.cordon, slots=0, free_slots=0,
                                   held=held, held_hot=held_hot)
    bindable = st.slots + st.queue_slots
    vram, ram, disk, preloaded = set(), set(), set(), set()
    ranks: dict[str, float] = {}
    for m in current_copies(agent, model_uids):
        disk.add(m.name)
        if m.rank is not None and not m.preloaded:
            ranks[m.name] = m.rank
        if m.tier == "vram":
            vram.add(m.name)
        elif m.tier == "ram":
            ram.add(m.name)
        if m.preloaded:
            preloaded.add(m.name)

    def cap(t: Any) -> int | None:
        return t.budget_bytes if t.budget_bytes > 0 else None

    def free(t: Any) -> int:
        return max(0, t.budget_bytes - t.used_bytes - t.reserved_bytes)

    disk_fault = any(f.reason in DISK_FAULTS for f in st.local_faults)
    return placement.AgentView(
        name=agent.name, node=st.node, zone=st.zone, ready=ready, cordoned=res.spec.cordon or not st.accepting,
        can_download=not disk_fault,
        slots=st.slots, queue_slots=st.queue_slots, free_slots=max(0, bindable - bound),
        running_remaining_s=tuple(r.expected_remaining_seconds for r in st.running if r.expected_remaining_seconds > 0),
        vram_capacity_bytes=cap(st.vram), vram_free_bytes=free(st.vram),
        ram_capacity_bytes=cap(st.ram), ram_free_bytes=free(st.ram),
        disk_capacity_bytes=cap(st.disk), disk_free_bytes=free(st.disk),
        vram=frozenset(vram), ram=frozenset(ram), disk=frozenset(disk), disk_rank_s=ranks,
        downloading={d.name: d.bytes_done for d in st.downloads},
        preloaded=frozenset(preloaded), held=held, held_hot=held_hot, in_use=frozenset(in_use),
        download_bps=st.bandwidth.download_bps or None, disk_to_gpu_bps=st.bandwidth.disk_to_gpu_bps or None,
        ram_to_gpu_bps=st.bandwidth.ram_to_gpu_bps or None,
        serves_peers=st.peer is not None, peer_bps=st.bandwidth.peer_bps or None,
    )


def model_size_bytes(model: ObservedModel, agents: Iterable[ObservedAgent]) -> int:
    """Measured size (from an agent's report of a copy of this ModelCache) over the spec's hint over a default."""
    return known_size_bytes(model, agents)[0] or guessed_size_bytes(model)


def known_size_bytes(model: ObservedModel, agents: Iterable[ObservedAgent]) -> tuple[int | None, str]:
    """(size, where it comes from): measured by an agent (a copy of this ModelCache), the spec's
    hint, or (None, unknown)."""
    uids = {model.key: model.uid}
    for a in agents:
        if a.namespace == model.namespace:
            for m in current_copies(a, uids):
                if m.name == model.name and m.size_bytes > 0:
                    return m.size_bytes, "Measured"
    hint = model.resource.spec.source.size_bytes
    return (hint, "Spec") if hint else (None, "Unknown")


def _declared_size(model: ObservedModel) -> object:
    """What of a ModelCache the sizes read (its status, written often, is not part of it)."""
    spec = model.resource.spec
    return model.uid, spec.kind, spec.source.size_bytes


def _reported_sizes(agent: ObservedAgent) -> object:
    """What of an agent's report `measured_sizes` reads."""
    st = agent.resource.status
    if st is None:
        return None
    return (tuple((m.name, m.uid, m.size_bytes) for m in st.models),
            tuple((f.name, f.size_bytes) for f in st.model_failures))


def measured_sizes(agents: Iterable[ObservedAgent], model_uids: Mapping[str, str] | None = None) -> dict[str, int]:
    """"namespace/model" -> size in bytes as some agent reported it (one pass over all reports): the
    size of a copy of the current ModelCache, else the size its source announced to an agent that
    could not hold it."""
    out: dict[str, int] = {}
    announced: dict[str, int] = {}
    for a in agents:
        if a.resource.status is not None:
            for m in current_copies(a, model_uids):
                if m.size_bytes > 0:
                    out.setdefault(f"{a.namespace}/{m.name}", m.size_bytes)
            for f in a.resource.status.model_failures:
                if f.size_bytes:
                    key = f"{a.namespace}/{f.name}"
                    announced[key] = max(announced.get(key, 0), f.size_bytes)
    for key, size in announced.items():
        out.setdefault(key, size)
    return out


def _blamed_artifact(job: ObservedJob, message: str) -> str:
    """Which of the job's artifacts a fetch failure is about: the one its message names
    ("namespace/name: ..." from the agent's disk store, or "model name ..."), else the checkpoint."""
    for art in job.artifacts:
        if f"{job.namespace}/{art}" in message or f"model {art} " in f"{message} ":
            return art
    return job.model


def job_fetch_failures(job: ObservedJob, *, now: float) -> list[sourcehealth.FetchFailure]:
    """Source failures a job's attempts ran into: its history, plus the attempt failure the
    agent just reported (not yet in history; `now` stands for its time)."""
    out: list[sourcehealth.FetchFailure] = []
    seen: set[int] = set()
    for h in job.history:
        if h.outcome == "Failed" and h.reason in sourcehealth.SOURCE_FAILURE_REASONS:
            seen.add(h.attempt)
            out.append(sourcehealth.FetchFailure(
                model=f"{job.namespace}/{_blamed_artifact(job, h.message)}", agent=h.agent, reason=h.reason,
                message=h.message, retryable=h.reason in sourcehealth.RETRYABLE_SOURCE_REASONS, at=parse_time(h.finished_at) or now))
    f = job.attempt_failure
    if f is not None and f.reason in sourcehealth.SOURCE_FAILURE_REASONS and f.attempt not in seen:
        out.append(sourcehealth.FetchFailure(
            model=f"{job.namespace}/{_blamed_artifact(job, f.message)}", agent=f.agent, reason=f.reason,
            message=f.message, retryable=f.retryable, at=now))
    return out


def has_fetch_failures(job: ObservedJob) -> bool:
    if job.attempt_failure is not None and job.attempt_failure.reason in sourcehealth.SOURCE_FAILURE_REASONS:
        return True
    return any(h.outcome == "Failed" and h.reason in sourcehealth.SOURCE_FAILURE_REASONS for h in job.history)


def agent_fetch_failures(agent: ObservedAgent, *, now: float) -> list[sourcehealth.FetchFailure]:
    """The agent's standing fetch failures that the source answered for (`SOURCE_FAILURE_REASONS`):
    a full disk, a cancelled download or a missing Secret on one agent blame no source."""
    st = agent.resource.status
    if st is None:
        return []
    return [sourcehealth.FetchFailure(
        model=f"{agent.namespace}/{f.name}", agent=agent.name, reason=f.reason,
        message=f.message or f"agent {agent.name} reported {f.reason}", retryable=f.retryable,
        at=parse_time(f.at) or now, standing=True, model_uid=f.uid, model_generation=f.generation)
        for f in st.model_failures if f.reason in sourcehealth.SOURCE_FAILURE_REASONS]


# --- the state -------------------------------------------------------------------


class State:
    """Everything the operator knows, updated by watch events from kopf's event loop and read
    by the control loops in other threads; one lock guards it.

    Besides the objects it keeps, incrementally, what the scheduling pass would otherwise
    rebuild every time: per namespace the pending jobs sorted by `placement.job_order_key`
    (with their `JobView`s) and the pending demand per artifact, and per agent a version
    that moves whenever its bound jobs or bindings in flight change (so unchanged agents
    keep the same `AgentView` object and placement's `FleetIndex` skips them)."""

    def __init__(self, *, half_life_s: float = 300.0,
                 placement_settings: placement.PlacementSettings = placement.PlacementSettings(),
                 source_settings: sourcehealth.SourceHealthSettings = sourcehealth.SourceHealthSettings()) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Event()
        self.jobs: dict[str, ObservedJob] = {}
        self.agents: dict[str, ObservedAgent] = {}
        self.models: dict[str, ObservedModel] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self.pending: set[str] = set()
        self.placement_settings = placement_settings
        self.source_settings = source_settings
        self.queues: dict[str, list[tuple[tuple[float, float, str], str]]] = {}
        """namespace -> (job_order_key, job key) of its pending jobs, sorted."""
        self.pending_views: dict[str, placement.JobView] = {}
        self.pending_demand: dict[str, Counter[str]] = {}
        """namespace -> pending jobs per artifact name (placement's `demand`)."""
        self.bound: dict[str, set[str]] = {}
        """agent key -> keys of non-terminal jobs labelled for it."""
        self.bound_jobs = 0
        """The jobs in `bound`, all agents together."""
        self.inflight: dict[str, str] = {}
        """job key -> agent key of bindings written (or being written) but not seen on the watch yet."""
        self.inflight_per_agent: Counter[str] = Counter()
        self.agent_jobs_version: Counter[str] = Counter()
        """agent key -> bumped whenever its bound jobs or bindings in flight change."""
        self.fetch_failing_jobs: set[str] = set()
        """Jobs whose history or attempt failure blames a model source (see sourcehealth)."""
        self.source_failed: dict[str, sourcehealth.SourceVerdict] = {}
        """"namespace/model" -> verdict, for sources that count as Failed (set by the reconciler)."""
        self.demand: dict[str, replicas.DemandCounter] = {}
        self.last_used: dict[str, float] = {}
        self.use_ranks: dict[str, userank.FleetRank] = {}
        """"namespace/model" -> fleet-wide use rank, for the models observed (module docstring)."""
        self._rank_seeded_from: dict[str, str] = {}
        """"namespace/model" -> uid of the ModelCache its rank was seeded from."""
        self._early_uses: dict[str, list[float]] = {}
        """"namespace/model" -> creation times of jobs seen before the model, to count once it is seen."""
        self.half_life_s = half_life_s
        self._seen_uids: set[str] = set()
        self._jobs_per_model: Counter[str] = Counter()
        """"namespace/model" -> jobs seen (by uid) that name it: what the operator keeps about a model
        no ModelCache exists for is dropped with its last job, so deleted jobs leave nothing behind."""
        self.last_lease_event = -1e18
        """Monotonic time of the last Lease event: the leader's own renewals arrive every few
        seconds, so a long silence means the watch is stuck, not that every agent died."""
        self.synced = threading.Event()
        self.touched_jobs: set[str] = set()
        """Jobs stored or forgotten since the reconciler last took them (`take_touched_jobs`)."""
        self.touched_agents: set[str] = set()
        """Agents whose CacheAgent, Lease or bound jobs changed since the scheduler last took them
        (`take_touched_agents`)."""
        self.fleet_version = 0
        """Bumped on every CacheAgent or ModelCache change: the replica planner reruns when it moves."""
        self.sizes_version = 0
        """Bumped when what the artifact sizes are worked out from changes: a ModelCache, or the sizes an
        agent reports (most CacheAgent updates, a job started or finished, leave them alone)."""
        self.uids_version = 0
        """Bumped when a ModelCache appears, goes, or is created again under its name (another uid)."""
        self._model_uids: dict[str, str] = {}
        self._copy_keys: dict[str, tuple[ObservedAgent, int, list[str]]] = {}
        """Agent key -> (the agent as last seen, uids_version, its current copies' model keys), for
        `update_source_health`; used only by the thread that calls it."""

    # -- watch input

    def upsert_job(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        seen = self.jobs.get(_object_key(body))
        if seen is not None and seen.resource_version == meta.get("resourceVersion") and seen.uid == meta.get("uid"):
            return  # the same version again: the watch echoing a write whose response was taken in
        try:
            job = job_from_body(body)
        except StateError as exc:
            log.warning("ignoring %s", exc)
            return
        with self.lock:
            old = self.jobs.get(job.key)
            if old is not None and is_older(job.resource_version, old.resource_version):
                return
            if old is not None and old.uid != job.uid:
                self._forget_job(old)
                old = None
            if old is not None:
                self._unindex(old)
                metrics.count_finished(old, job)
            self.jobs[job.key] = job
            self._index(job)
            self.touched_jobs.add(job.key)
            if job.uid not in self._seen_uids:
                self._seen_uids.add(job.uid)
                for art in set(job.artifacts):
                    mk = f"{job.namespace}/{art}"
                    self._jobs_per_model[mk] += 1
                    counter = self.demand.get(mk, replicas.DemandCounter())
                    self.demand[mk] = counter.observe(now=job.created_at, half_life_s=self.half_life_s)
                    self.last_used[mk] = max(self.last_used.get(mk, 0.0), job.created_at)
                    self._count_use(mk, job.created_at)
        self.changed.set()

    def take_touched_jobs(self) -> set[str]:
        """The jobs stored or forgotten since the last call (for one reader: the reconciler)."""
        with self.lock:
            touched, self.touched_jobs = self.touched_jobs, set()
            return touched

    def _count_use(self, model_key: str, created_s: float) -> None:
        """One job used the model (the caller holds the lock and counts each job once)."""
        rank = self.use_ranks.get(model_key)
        if rank is not None:
            self.use_ranks[model_key] = rank.count(created_s)
            return
        # The model's published rank is not known yet: count the job when the model is seen.
        early = self._early_uses.setdefault(model_key, [])
        early.append(created_s)
        if len(early) > EARLY_USES_PER_MODEL + EARLY_USES_PER_MODEL // 4:  # trimmed in batches
            early.sort()
            del early[:-EARLY_USES_PER_MODEL]

    def _seed_use_rank(self, model: ObservedModel) -> None:
        """Start the model's fleet rank from its published status, the first time this ModelCache
        (by uid) is seen; later versions carry this process's own writes and change nothing."""
        if self._rank_seeded_from.get(model.key) == model.uid:
            return
        st = model.resource.status
        seed = userank.FleetRank.seeded(rank_s=st.use_rank if st else None,
                                        counted_through_s=parse_time(st.use_rank_counted_through) if st else None)
        self.use_ranks[model.key] = seed.count_all(self._early_uses.pop(model.key, ()))
        self._rank_seeded_from[model.key] = model.uid

    def use_rank(self, model_key: str) -> userank.FleetRank | None:
        """The model's fleet-wide use rank as counted so far (None before its ModelCache was seen)."""
        with self.lock:
            return self.use_ranks.get(model_key)

    def delete_job(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata", {})
        key = _object_key(body)
        with self.lock:
            old = self.jobs.get(key)
            if old is not None and old.uid == meta.get("uid", old.uid):
                self._forget_job(old)
        self.changed.set()

    def _forget_job(self, job: ObservedJob) -> None:
        self._unindex(job)
        self.jobs.pop(job.key, None)
        self.touched_jobs.add(job.key)
        self.clear_inflight(job.key)
        if job.uid in self._seen_uids:
            self._seen_uids.discard(job.uid)
            for art in set(job.artifacts):
                mk = f"{job.namespace}/{art}"
                self._jobs_per_model[mk] -= 1
                if self._jobs_per_model[mk] <= 0:
                    del self._jobs_per_model[mk]
                    if mk not in self.models:
                        self._forget_model_use(mk)

    def _forget_model_use(self, model_key: str) -> None:
        """Drop the demand and use counted for a model that has neither a ModelCache nor jobs."""
        self.demand.pop(model_key, None)
        self.last_used.pop(model_key, None)
        self._early_uses.pop(model_key, None)

    def _index(self, job: ObservedJob) -> None:
        if job.pending:
            self.pending.add(job.key)
            view = job_view(job)
            self.pending_views[job.key] = view
            bisect.insort(self.queues.setdefault(job.namespace, []),
                          (placement.job_order_key(view, settings=self.placement_settings), job.key))
            self.pending_demand.setdefault(job.namespace, Counter()).update(job.artifacts)
        if job.bound_agent is not None and not job.terminal:
            agent_key = f"{job.namespace}/{job.bound_agent}"
            keys = self.bound.setdefault(agent_key, set())
            if job.key not in keys:
                keys.add(job.key)
                self.bound_jobs += 1
            self._agent_jobs_changed(agent_key)
        if job.bound_agent is not None or job.terminal:
            # The watch now shows the binding (or the job is over): the write is no longer in flight.
            self.clear_inflight(job.key)
        if has_fetch_failures(job):
            self.fetch_failing_jobs.add(job.key)

    def _unindex(self, job: ObservedJob) -> None:
        if job.key in self.pending:
            self.pending.discard(job.key)
            view = self.pending_views.pop(job.key)
            queue = self.queues[job.namespace]
            entry = (placement.job_order_key(view, settings=self.placement_settings), job.key)
            i = bisect.bisect_left(queue, entry)
            if i < len(queue) and queue[i] == entry:
                del queue[i]
            demand = self.pending_demand[job.namespace]
            demand.subtract(job.artifacts)
            for art in job.artifacts:
                if demand[art] <= 0:
                    del demand[art]
        if job.bound_agent is not None:
            agent_key = f"{job.namespace}/{job.bound_agent}"
            keys = self.bound.get(agent_key)
            if keys is not None and job.key in keys:
                keys.discard(job.key)
                self.bound_jobs -= 1
                self._agent_jobs_changed(agent_key)
                if not keys:
                    del self.bound[agent_key]
        self.fetch_failing_jobs.discard(job.key)

    def _agent_jobs_changed(self, agent_key: str) -> None:
        self.agent_jobs_version[agent_key] += 1
        self.touched_agents.add(agent_key)

    def take_touched_agents(self) -> set[str]:
        """The agents touched since the last call (see `touched_agents`)."""
        with self.lock:
            touched, self.touched_agents = self.touched_agents, set()
            return touched

    def set_inflight(self, job_key: str, agent_key: str) -> None:
        """A binding of `job_key` to `agent_key` is being written (caller holds the lock or not)."""
        with self.lock:
            self.clear_inflight(job_key)
            self.inflight[job_key] = agent_key
            self.inflight_per_agent[agent_key] += 1
            self._agent_jobs_changed(agent_key)

    def clear_inflight(self, job_key: str) -> None:
        with self.lock:
            agent_key = self.inflight.pop(job_key, None)
            if agent_key is not None:
                self.inflight_per_agent[agent_key] -= 1
                if self.inflight_per_agent[agent_key] <= 0:
                    del self.inflight_per_agent[agent_key]
                self._agent_jobs_changed(agent_key)

    def upsert_agent(self, body: Mapping[str, Any]) -> None:
        self._upsert_fleet(self.agents, agent_from_body, body, sizes=_reported_sizes, on_stored=self._agent_stored)

    def _agent_stored(self, agent: ObservedAgent) -> None:
        self.touched_agents.add(agent.key)

    def delete_agent(self, body: Mapping[str, Any]) -> None:
        with self.lock:
            self._delete_fleet(self.agents, body)
            self.touched_agents.add(_object_key(body))

    def upsert_model(self, body: Mapping[str, Any]) -> None:
        self._upsert_fleet(self.models, model_from_body, body, on_stored=self._model_stored, sizes=_declared_size)

    def _model_stored(self, model: ObservedModel) -> None:
        if self._model_uids.get(model.key) != model.uid:
            self._model_uids[model.key] = model.uid
            self.uids_version += 1
        self._seed_use_rank(model)

    def model_uids(self) -> dict[str, str]:
        """"namespace/name" -> uid of every ModelCache observed (a copy counts only for its own; see current_copies)."""
        with self.lock:
            return dict(self._model_uids)

    def delete_model(self, body: Mapping[str, Any]) -> None:
        key = _object_key(body)
        with self.lock:
            self._delete_fleet(self.models, body)
            if self._model_uids.pop(key, None) is not None:
                self.uids_version += 1
            # A ModelCache created again under this name starts from its own (empty) status.
            self.use_ranks.pop(key, None)
            self._rank_seeded_from.pop(key, None)
            if self._jobs_per_model[key] <= 0:
                self._jobs_per_model.pop(key, None)
                self._forget_model_use(key)

    def _upsert_fleet(self, table: dict[str, Any], parse: Callable[[Mapping[str, Any]], Any],
                      body: Mapping[str, Any], *, on_stored: Callable[[Any], None] | None = None,
                      sizes: Callable[[Any], object] | None = None) -> None:
        """Agents and models: keep the newest version seen; every change bumps the fleet version, and
        the sizes version unless `sizes` (what of the item the sizes depend on) is unchanged."""
        try:
            item = parse(body)
        except StateError as exc:
            log.warning("ignoring %s", exc)
            return
        with self.lock:
            old = table.get(item.key)
            if old is not None and is_older(item.resource_version, old.resource_version):
                return
            table[item.key] = item
            self.fleet_version += 1
            if sizes is None or old is None or sizes(old) != sizes(item):
                self.sizes_version += 1
            if on_stored is not None:
                on_stored(item)
        self.changed.set()

    def _delete_fleet(self, table: dict[str, Any], body: Mapping[str, Any]) -> None:
        with self.lock:
            table.pop(_object_key(body), None)
            self.fleet_version += 1
            self.sizes_version += 1
        self.changed.set()

    def upsert_lease(self, body: Mapping[str, Any], *, now_mono: float) -> None:
        meta = body.get("metadata", {})
        spec = body.get("spec") or {}
        key = _object_key(body)
        renew = spec.get("renewTime")
        duration = float(spec.get("leaseDurationSeconds") or 0)
        rv = str(meta.get("resourceVersion", ""))
        held = bool(spec.get("holderIdentity"))
        with self.lock:
            self.last_lease_event = now_mono
            rec = self.leases.get(key)
            if rec is not None and is_older(rv, rec.resource_version):
                return
            if rec is None or rec.renew_time != renew:
                self.leases[key] = LeaseRecord(rv, renew, duration, now_mono, held)
            else:
                rec.resource_version, rec.duration_s, rec.held = rv, duration, held
            self.touched_agents.add(key)
        self.changed.set()

    def delete_lease(self, body: Mapping[str, Any]) -> None:
        key = _object_key(body)
        with self.lock:
            self.leases.pop(key, None)
            self.touched_agents.add(key)
        self.changed.set()

    # -- queries (callers hold no lock; each takes it briefly)

    def agent_ready(self, agent_key: str, *, now_mono: float, grace_s: float | None) -> bool:
        """True while the agent's Lease keeps being renewed (a renewal seen within the grace)."""
        with self.lock:
            return self._ready(agent_key, now_mono, grace_s)

    def agents_ready(self, agent_keys: Iterable[str], *, now_mono: float, grace_s: float | None) -> list[bool]:
        """`agent_ready` of each agent, under one acquisition of the lock (a pass asks for all of them)."""
        with self.lock:
            return [self._ready(key, now_mono, grace_s) for key in agent_keys]

    def readiness(self, agent_key: str, *, now_mono: float, grace_s: float | None) -> tuple[bool, float, float]:
        """(`agent_ready`, the monotonic time until which a renewal already seen keeps it ready, the
        silence of the Lease watch after which an agent whose renewals stopped counts as ready anyway).
        Caller holds the lock."""
        rec = self.leases.get(agent_key)
        if rec is None or rec.renew_time is None or not rec.held:
            return False, -math.inf, math.inf
        limit = grace_s if grace_s is not None else (rec.duration_s or 15.0)
        until = rec.observed_at + limit
        # No news from the Lease watch at all: do not declare agents dead on a stuck stream.
        return now_mono <= until or now_mono - self.last_lease_event > limit, until, limit

    def _ready(self, agent_key: str, now_mono: float, grace_s: float | None) -> bool:
        return self.readiness(agent_key, now_mono=now_mono, grace_s=grace_s)[0]

    def demand_per_minute(self, model_key: str, *, now: float) -> float:
        with self.lock:
            counter = self.demand.get(model_key)
        return 0.0 if counter is None else counter.rate_per_minute(now=now, half_life_s=self.half_life_s)

    def namespaces(self) -> set[str]:
        with self.lock:
            return {a.namespace for a in self.agents.values()} | {j.namespace for j in self.jobs.values()} | {
                m.namespace for m in self.models.values()}

    def agent_load(self, agent_key: str) -> tuple[int, frozenset[str]]:
        """(jobs bound or being bound, artifacts of its bound jobs) for `agent_key`."""
        with self.lock:
            keys = self.bound.get(agent_key, ())
            in_use: set[str] = set()
            for jk in keys:
                in_use.update(self.jobs[jk].artifacts)
            return len(keys) + self.inflight_per_agent.get(agent_key, 0), frozenset(in_use)

    def update_source_health(self, *, now: float, now_mono: float, grace_s: float | None,
                             ready: Mapping[str, bool] | None = None) -> dict[str, sourcehealth.SourceVerdict]:
        """Recompute which model sources count as Failed (see `sourcehealth`), store and return it.
        `ready`: each agent's readiness when the caller has just worked it out."""
        with self.lock:
            agents = list(self.agents.values())
            failing = [self.jobs[k] for k in self.fetch_failing_jobs if k in self.jobs]
            models = list(self.models.values())
            uids, uids_version = dict(self._model_uids), self.uids_version
        identities = {m.key: m.identity() for m in models}
        # Per namespace: the disk budgets of its Ready agents, and per model what is known of its
        # size (the spec's hint, sizes the source announced to agents of the current ModelCache).
        known: dict[str, tuple[list[int], dict[str, list[int]]]] = {}
        for m in models:
            hint = m.resource.spec.source.size_bytes
            known.setdefault(m.namespace, ([], {}))[1].setdefault(m.key, []).extend([hint] if hint else [])
        failures: list[sourcehealth.FetchFailure] = []
        with_copy: set[str] = set()
        memo = self._copy_keys
        for a in agents:
            st = a.resource.status
            if st is None or not (ready[a.key] if ready is not None and a.key in ready
                                  else self.agent_ready(a.key, now_mono=now_mono, grace_s=grace_s)):
                continue
            # An agent's copies change only with its report (or a ModelCache's uid): worked out once per
            # report, not on every pass over a large fleet.
            held = memo.get(a.key)
            if held is None or held[0] is not a or held[1] != uids_version:
                held = memo[a.key] = (a, uids_version, [f"{a.namespace}/{m.name}" for m in current_copies(a, uids)])
            with_copy.update(held[2])
            budgets, sizes = known.setdefault(a.namespace, ([], {}))
            budgets.append(st.disk.budget_bytes)
            if st.model_failures:
                failures.extend(agent_fetch_failures(a, now=now))
                for f in st.model_failures:
                    key = f"{a.namespace}/{f.name}"
                    if f.size_bytes and key in identities and (f.uid is None or f.uid == identities[key].uid):
                        sizes.setdefault(key, []).append(f.size_bytes)
        if len(memo) > len(agents):
            for key in memo.keys() - {a.key for a in agents}:
                del memo[key]
        for job in failing:
            failures.extend(job_fetch_failures(job, now=now))
        verdicts = sourcehealth.plan_source_health(failures, with_copy=with_copy, now=now, models=identities,
                                                   settings=self.source_settings)
        for namespace, (budgets, sizes) in known.items():
            for key, verdict in sourcehealth.plan_oversize(sizes, budgets=budgets, with_copy=with_copy).items():
                verdicts.setdefault(key, verdict)
        with self.lock:
            self.source_failed = verdicts
        return verdicts
