"""How the operator and the agents talk through the API server.

Field ownership (one writer per field):
- GenerationJob metadata label AGENT_LABEL and annotations ATTEMPT_ANNOTATION and
  SCHEDULED_AT_ANNOTATION: the operator. Present exactly while the job is bound (Scheduled
  or Running). The binding is the operator's only write per job on the scheduling path:
  one merge patch on the main resource carrying metadata.resourceVersion (so a stale cache
  or a second operator can never bind a job twice) that sets the label and both
  annotations and removes UNBOUND_ANNOTATION. A bound job's status stays as it was (phase
  Pending on a first attempt) until its agent accepts it; `kubectl get gj` shows the agent
  from the label meanwhile.
- GenerationJob annotation UNBOUND_ANNOTATION ("<agent>/<attempt>"): the operator, in
  the same patch that removes a binding, so that an unbind whose status write was lost
  (the operator stopped in between) is finished from what the object still says.
- GenerationJob status phase Pending: the API server, from creation (a CRD default on
  status); the operator when it requeues an attempt. The operator also writes history,
  attempt and agent when it requeues, the reason/message of a pending job it cannot place
  (ModelCacheNotFound, NoReadyAgent, TooLargeForAnyAgent, InsufficientVRAM, Unschedulable),
  and terminal Failed for AttemptsExhausted / DeadlineExceeded / ModelUnavailable /
  ModelCacheNotFound / Cancelled.
- GenerationJob status, for the current attempt, by the bound agent, only while the label
  and annotation still name it and its attempt: phase Scheduled when it accepts the
  attempt (stage Queued; this first write records agent, attempt, scheduledAt (copied from
  SCHEDULED_AT_ANNOTATION, never later than the write itself) and the Scheduled condition,
  and clears reason/message; an attempt admitted at once skips it and its first write says
  Running and records them), Running, stage (Queued, Downloading, Loading, Generating,
  Uploading) and progress (debounced: at most one write per progress interval, only when
  the summary changed), timings, cacheHit, result, startedAt, finishedAt, attemptFailure,
  and Succeeded/Failed (non-retryable). The agent clears reason and message (left by an
  earlier attempt's requeue) when an attempt starts and when it succeeds, and never writes
  a startedAt or finishedAt before scheduledAt. Every agent write carries a
  resourceVersion precondition.
- GenerationJob status.conditions (Scheduled, Running, Succeeded, Failed; see
  stoker.api.conditions): whoever moves the job writes the whole list, computed from the
  list on the object it read, with that object's resourceVersion as a precondition, so
  no writer drops another's condition.
- CacheAgent spec.holds and spec.duplicates (its copies another agent of the peer tier also
  holds, evicted first): the operator. spec.cordon: people (kubectl patch).
- CacheAgent status, except conditions: the agent, including models[].hot for the hot
  replicas it keeps loaded (a hold at tier vram or ram is loaded once on disk and kept,
  a hold lowered or released is unloaded unless a job uses it). status.conditions (Ready):
  the operator, from the agent's Lease.
- ModelCache status: the operator, including the scale subresource's status.replicas
  (held copies on disk) and status.selector; spec.replicas: people, `kubectl scale`, or
  a HorizontalPodAutoscaler through the scale subresource.
- Use ranks (`stoker.userank`; seconds on the Unix clock, higher = used more and more
  recently, 2 h half-life). ModelCache status.useRank and useRankCountedThrough: the
  operator, counting every GenerationJob once at its creation (a restarted operator
  counts only jobs created after useRankCountedThrough); rewritten when useRank moved by
  PUBLISH_MIN_CHANGE_S or with the status's other fields. The agents only read useRank:
  one that downloads the model starts its copy's rank from it. CacheAgent
  status.models[].rank: the agent, its own disk eviction rank of each model (lowest
  evicted first); the operator reads it for placement (AgentView.disk_rank_s).
- Lease `<cacheagent name>` (coordination.k8s.io/v1) in the agent's namespace, labelled
  LEASE_LABEL=agent: the agent renews it every LEASE_RENEW_S (and sets the label on every
  renewal); the operator marks the agent NotReady when renewTime is older than
  leaseDurationSeconds, or at once when the agent released it (holderIdentity removed, on
  a clean shutdown). The operator watches only Leases carrying LEASE_LABEL (its own leader
  Lease is labelled LEASE_LABEL=operator), in its own namespace. A starting agent clears
  what an earlier process of its pod reported, and writes its own status before its first
  renewal.
- CacheAgent status.accepting: the agent; false while it starts and once it stops (SIGTERM).
  The operator binds nothing to an agent that is not accepting (as if cordoned).
- CacheAgent status.degraded and localFaults: the agent (see AGENT_FAULT_REASONS below).
- CacheAgent status.modelFailures: the agent lists every fetch or verification
  failure it still stands by (name, reason, retryable, at, and the uid and generation
  of the ModelCache it read); it drops one when a later fetch succeeds or the model's
  hold is released. The operator counts those of the current ModelCache (same uid and
  generation), together with job attempts whose failure reason blames the source
  (HTTPServerError, Timeout, ChecksumMismatch, ...; see stoker.operator.sourcehealth)
  and that happened after the current spec took effect, and sets the ModelCache's
  Failed condition when one is permanent (and under an hour old) or retryable ones pile
  up across agents within ten minutes; then the model's jobs fail with ModelUnavailable.
  The condition clears as soon as a Ready agent reports a copy on disk, the ModelCache
  is created again or its spec changes, or the failures age out.
- The peer tier: CacheAgent status.peer (url of the agent's peer endpoint), models[].sha256
  (the digest of its copy as downloaded) and bandwidth.peerBps: the agent. ModelCache
  status.sha256: the operator, spec.source.sha256 when given, else the digest the first
  agents report for their copies, kept for the ModelCache's life. An agent that needs a
  model reads ModelCache status.agents (holders, and copies being fetched) and each
  holder's CacheAgent status, and fetches from a Ready holder whose copy has the digest
  (`stoker.agent.peer_fetch`); requests carry the fleet's peer credential. A fetch from a
  peer that fails is never listed in modelFailures.

Attempt-failure reasons that are faults of the agent, not of the job (AGENT_FAULT_REASONS):
an attempt that ends with one of them (reported by the agent as a retryable attemptFailure,
or AgentLost from the operator) uses none of the job's maxAttempts; the operator bounds
them apart (stoker.operator.jobstate). Agents report local faults of their own disk or
memory (DiskFull, DiskError, OutOfMemory) with these reasons and in CacheAgent
status.localFaults (degraded), never in status.modelFailures.

Fleets: an operator started with --fleet NAME (chart value `fleet`) manages only the
GenerationJobs, ModelCaches and CacheAgents labelled FLEET_LABEL=NAME; without --fleet, only
those without the label. Users label their jobs and models; an agent started with --fleet
labels the CacheAgent it creates. So two installations in one namespace never act on each
other's objects (each also has its own leader Lease, --leader-lease-name).

Kubernetes Events: one writer per transition, as with status fields. Whoever makes
a transition emits its Event, as the kubelet does for the containers it runs:
- the bound agent, on the GenerationJob: Running (it started the attempt),
  Succeeded, and a Warning named after the reason when its attempt fails;
- the operator, on the GenerationJob: Scheduled, Requeued, FailedScheduling (Warning,
  with the reason a pending job cannot be placed), Failed (AttemptsExhausted,
  DeadlineExceeded, ModelUnavailable, ModelCacheNotFound, Cancelled), Expired
  (ttlSecondsAfterFinished, or the operator's default TTL);
  on the ModelCache: ReplicaAdded, ReplicaReleased, HotReplicaAdded,
  HotReplicaReleased, TargetMet / TargetNotMet, CopiesExist / NoCopies, SourceFailed /
  SourceRecovered; on the CacheAgent: AgentReady / AgentNotReady;
- an agent, on another agent's CacheAgent: PeerChecksumMismatch (Warning) when that agent
  served it bytes that do not match the model's digest (the fetching agent is the one that
  saw it).
The operator does not echo the agent's transitions, so each appears once. Writers
aggregate repeats (count, first and last timestamp) instead of dropping them.
"""

from __future__ import annotations

import datetime as _dt

from stoker.api.base import AGENT_LABEL, GROUP

ATTEMPT_ANNOTATION = f"{GROUP}/attempt"
FLEET_LABEL = f"{GROUP}/fleet"
SCHEDULED_AT_ANNOTATION = f"{GROUP}/scheduled-at"
UNBOUND_ANNOTATION = f"{GROUP}/unbound"
LEASE_LABEL = f"{GROUP}/lease"
LEASE_DURATION_S = 15
LEASE_RENEW_S = 5
OPERATOR_LEASE = "stoker-operator"
FIELD_MANAGER_OPERATOR = "stoker-operator"
FIELD_MANAGER_AGENT = "stoker-agent"
AGENT_FAULT_REASONS = frozenset({
    "AgentLost", "AgentStopping", "DiskFull", "DiskError", "OutOfMemory", "InsufficientCache", "InsufficientVRAM",
    "ExceedsDiskBudget", "SourceChanged", "APIUnavailable",
})
"""Attempt-failure reasons that blame the agent, not the job (see the module docstring)."""

__all__ = [
    "AGENT_LABEL", "ATTEMPT_ANNOTATION", "SCHEDULED_AT_ANNOTATION", "UNBOUND_ANNOTATION", "LEASE_LABEL",
    "FLEET_LABEL", "fleet_selector", "LEASE_DURATION_S", "LEASE_RENEW_S",
    "OPERATOR_LEASE", "FIELD_MANAGER_OPERATOR", "FIELD_MANAGER_AGENT", "AGENT_FAULT_REASONS", "bound_attempt",
    "scheduled_at",
]


def fleet_selector(fleet: str | None) -> str:
    """The label selector of one fleet's objects (no fleet: the objects without the label)."""
    return f"{FLEET_LABEL}={fleet}" if fleet else f"!{FLEET_LABEL}"


def bound_attempt(job: dict, agent: str) -> int | None:
    """The attempt `agent` may run for this GenerationJob object, or None when the job is
    not bound to it (unbound, bound elsewhere, finished, or being deleted)."""
    meta = job.get("metadata", {})
    if meta.get("deletionTimestamp") or meta.get("labels", {}).get(AGENT_LABEL) != agent:
        return None
    if job.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return None
    try:
        return int(meta.get("annotations", {}).get(ATTEMPT_ANNOTATION, ""))
    except ValueError:
        return None


def scheduled_at(job: dict, now: str) -> str:
    """The status.scheduledAt a bound agent records: the binding's SCHEDULED_AT_ANNOTATION, or
    `now` (RFC 3339) when that is missing or later, so that scheduledAt never follows startedAt
    whatever the clocks of operator and agent say."""
    value = (job.get("metadata", {}).get("annotations") or {}).get(SCHEDULED_AT_ANNOTATION)
    if not value:
        return now
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        current = _dt.datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return now
    return value if parsed <= current else now
