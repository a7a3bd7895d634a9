"""Failure handling: agent liveness, requeues, deadlines, TTL, unavailable models (shell).

Each `reconcile_once()` looks at every observed job and agent and, through the job
state machine (`jobstate`), decides what the operator must write:

- an agent whose Lease has not been renewed within the grace is NotReady (condition
  Ready=False on its CacheAgent); its jobs go back to Pending with attempt + 1;
- an attempt failure reported by the agent (status.attemptFailure) requeues the job
  elsewhere or fails it (AttemptsExhausted, or the agent's reason if not retryable);
- timeoutSeconds after creation the job fails with DeadlineExceeded;
- a job whose model (or LoRA, or VAE) has a source that counts as Failed
  (`sourcehealth`: a permanent failure, or retryable ones piling up across agents)
  fails with ModelUnavailable, when pending or when its attempt just failed on
  fetching, instead of spending its remaining attempts;
- a finished job loses its binding label (so its agent's watch drops it), gets its
  last attempt recorded in history, and is deleted after ttlSecondsAfterFinished;
- an unbind cut short by a crashed operator (label removed, status not yet written) is
  completed.

A bound job is Scheduled for the state machine from the moment its label names an
agent, whatever its status says: the binding is one write, and the agent records
phase Scheduled when it accepts the job (see stoker.api.protocol). Nothing here writes
status to complete a binding.

Unbinding writes the label removal first (preconditioned on the observed version, and
recording the removed binding in UNBOUND_ANNOTATION) and the status second: an agent
stops as soon as the label no longer names it, and the scheduler binds no job whose
unbind is unfinished. Deleting a GenerationJob cancels it: the label disappears with
the object and the agent's watch sees it go.

Events (see stoker/api/protocol.py for who emits which): Requeued, Failed (the
operator's own reasons), Expired (TTL deletion), AgentReady / AgentNotReady.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Callable

from kubernetes import client

from stoker.api import GROUP, VERSION, Condition, ConditionStatus
from stoker.api.conditions import job_conditions
from stoker import metrics as shared_metrics
from stoker.api.protocol import AGENT_FAULT_REASONS, AGENT_LABEL, ATTEMPT_ANNOTATION, SCHEDULED_AT_ANNOTATION, UNBOUND_ANNOTATION
from stoker.kube import now_rfc3339
from stoker.operator import jobstate, metrics, sourcehealth
from stoker.operator.scheduler import Writer
from stoker.operator.state import ObservedAgent, ObservedJob, State, format_time, job_state, status_patch, unbound_value

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _Transition:
    before: jobstate.JobState
    after: jobstate.JobState
    event: str
    message: str
    warning: bool = False


def unavailable_message(art: str, verdict: sourcehealth.SourceVerdict,
                        settings: sourcehealth.SourceHealthSettings) -> str:
    """Why a job of a Failed model fails, and what brings the model back (see sourcehealth)."""
    if verdict.reason == sourcehealth.TOO_LARGE:
        return f"model {art} fits on no agent: {verdict.message}; then submit the job again"
    what = f"model {art} cannot be fetched ({verdict.reason}: {verdict.message})"
    if not verdict.permanent:
        return f"{what}; submit the job again once the source is back"
    return (f"{what}; if its url or sha256 is wrong, delete the ModelCache and create it again with the right "
            f"one (both are immutable); if its Secret or server was at fault, fix that: new jobs try the source "
            f"again once the failure is {settings.permanent_max_age_s / 60:.0f} min old, or at once after any "
            "change of the ModelCache's spec; then submit the job again")


_WALK_EVERY_S = 10.0
"""How often the reconciler looks at every job, whatever changed (see `Reconciler._jobs_to_look_at`)."""


class Reconciler:
    def __init__(self, state: State, writer: Writer, *, lease_grace_s: float | None,
                 default_ttl_s: float | None = None) -> None:
        self.state = state
        self.writer = writer
        self.lease_grace_s = lease_grace_s
        self.default_ttl_s = default_ttl_s
        """ttlSecondsAfterFinished of jobs that set none (None: kept forever)."""
        self._quiet: dict[str, tuple[str, bool | None, frozenset[str], float]] = {}
        """Jobs a pass found nothing to do for: (resourceVersion, its agent's readiness, failed
        models, when a deadline or TTL falls due). A job is looked at again only when one of
        them changes: a pass costs in proportion to what changed, not to every job kept."""
        self._failed: frozenset[str] = frozenset()
        self._settled: dict[str, tuple[ObservedAgent, bool]] = {}
        """Agents whose Ready condition already said their readiness: (the agent as seen, ready)."""
        self._active: set[str] = set()
        """Jobs the last pass looked at and did not find quiet (a write started, or one could not
        start): looked at again on the next pass."""
        self._due: list[tuple[float, str]] = []
        """Heap of (when a quiet job's deadline or TTL falls due, job key)."""
        self._was_ready: dict[str, bool] = {}
        """Each agent's readiness in the last pass: the jobs bound to one that flipped are looked at."""
        self._walked_at = -math.inf
        """Monotonic time of the last pass that looked at every job."""

    def reconcile_once(self, *, now: float | None = None, now_mono: float | None = None) -> int:
        """Start the writes this pass calls for; returns how many were started."""
        now = time.time() if now is None else now
        now_mono = time.monotonic() if now_mono is None else now_mono
        st = self.state
        with st.lock:
            agents = list(st.agents.values())
            inflight = set(st.inflight)
        keys = [a.key for a in agents]
        ready = dict(zip(keys, st.agents_ready(keys, now_mono=now_mono, grace_s=self.lease_grace_s), strict=True))
        metrics.AGENTS.set(len(agents))
        metrics.READY_AGENTS.set(sum(ready.values()))
        started = 0
        settled = self._settled
        if len(settled) > len(agents):
            self._settled = settled = {k: v for k, v in settled.items() if k in ready}
        for a in agents:
            seen = settled.get(a.key)
            if seen is None or seen[0] is not a or seen[1] != ready[a.key]:
                started += self._agent_condition(a, ready[a.key])
        failed_models = st.update_source_health(now=now, now_mono=now_mono, grace_s=self.lease_grace_s, ready=ready)
        metrics.SOURCE_FAILED_MODELS.set(len(failed_models))
        failed = frozenset(failed_models)
        moved = failed != self._failed
        if moved:
            self._failed = failed
        walk = moved or now_mono - self._walked_at >= _WALK_EVERY_S
        failed = self._failed  # the same object while unchanged: compared by identity below
        jobs = self._jobs_to_look_at(ready, walk=walk, now=now, now_mono=now_mono)
        quiet = self._quiet
        active: set[str] = set()
        self._active = active
        for job in jobs:
            bound = job.bound_agent
            bound_ready = None if bound is None else ready.get(f"{job.namespace}/{bound}", False)
            q = quiet.get(job.key)
            if (q is not None and q[0] == job.resource_version and q[1] == bound_ready and q[2] is failed
                    and now < q[3]):
                continue
            if job.key in inflight or not self.writer.may_act(job.key, job.resource_version):
                active.add(job.key)
                continue
            write = self._job(job, ready, failed_models, now)
            if write is None:
                due = self._due_at(job)
                quiet[job.key] = (job.resource_version, bound_ready, failed, due)
                if due != math.inf:
                    heapq.heappush(self._due, (due, job.key))
            else:
                quiet.pop(job.key, None)
                active.add(job.key)
                started += int(self.writer.submit(job.key, job.resource_version, write))
        return started

    def _jobs_to_look_at(self, ready: dict[str, bool], *, walk: bool, now: float, now_mono: float
                         ) -> list[ObservedJob]:
        """Every job on a full walk (the first pass, failed models changed, and every
        `_WALK_EVERY_S` as a safety net); else only those whose inputs may have moved: stored or
        forgotten since, looked at without being found quiet, falling due, or bound to an agent
        whose readiness changed. The others are quiet for the same reasons as before."""
        st = self.state
        touched = st.take_touched_jobs()
        flipped = [k for k, r in ready.items() if self._was_ready.get(k, False) != r]
        flipped += [k for k, r in self._was_ready.items() if r and k not in ready]
        self._was_ready = ready
        if walk:
            self._walked_at = now_mono
            with st.lock:
                jobs = list(st.jobs.values())
            if len(self._quiet) > 2 * len(jobs) + 1000:
                keys = {j.key for j in jobs}
                self._quiet = {k: v for k, v in self._quiet.items() if k in keys}
                self._due = [(t, k) for t, k in self._due if k in keys]
                heapq.heapify(self._due)
            return jobs
        keys = touched | self._active
        due = self._due
        while due and due[0][0] <= now:
            keys.add(heapq.heappop(due)[1])
        with st.lock:
            for agent_key in flipped:
                keys.update(st.bound.get(agent_key, ()))
            jobs = [job for key in keys if (job := st.jobs.get(key)) is not None]
            gone = [key for key in touched if key not in st.jobs]
        for key in gone:
            self._quiet.pop(key, None)
        return jobs

    def _due_at(self, job: ObservedJob) -> float:
        """When time alone may give `job` something to do: its deadline, or its TTL once finished."""
        st = job_state(job)
        if st.terminal:
            ttl_s = job.ttl_s if job.ttl_s is not None else self.default_ttl_s
            return st.finished_at + ttl_s if ttl_s is not None and st.finished_at is not None else math.inf
        return st.deadline if st.deadline is not None else math.inf

    # -- agents

    def _agent_condition(self, agent: ObservedAgent, ready: bool) -> int:
        status = agent.resource.status
        current = next((c for c in (status.conditions if status else []) if c.type == "Ready"), None)
        want = ConditionStatus.TRUE if ready else ConditionStatus.FALSE
        if current is not None and current.status == want:
            self._settled[agent.key] = (agent, ready)  # nothing to do until either changes
            return 0
        key = f"ca:{agent.key}"
        if not self.writer.may_act(key, agent.resource_version):
            return 0
        reason = "LeaseRenewed" if ready else ("LeaseExpired" if current is not None else "NoLease")
        message = ("the agent renews its Lease" if ready else
                   "the agent's Lease was not renewed within its grace period; its jobs are requeued")
        others = [c.wire() for c in (status.conditions if status else []) if c.type != "Ready"]
        cond = Condition(type="Ready", status=want, reason=reason, message=message,
                         last_transition_time=now_rfc3339()).wire()

        def write() -> None:
            body = self.writer.objects(agent.namespace).patch_status(
                "CacheAgent", agent.name, {"conditions": [cond, *others]}, resource_version=agent.resource_version)
            self.state.upsert_agent(body)
            if current is not None or not ready:
                log.info("agent %s is %s", agent.key, "Ready" if ready else "NotReady")
                self.writer.event(agent.ref(), reason="AgentReady" if ready else "AgentNotReady", message=message,
                                  warning=not ready)

        return int(self.writer.submit(key, agent.resource_version, write))

    # -- jobs

    def _job(self, job: ObservedJob, ready: dict[str, bool], failed_models: dict[str, sourcehealth.SourceVerdict],
             now: float) -> Callable[[], None] | None:
        """The write `job` calls for now, or None."""
        if job.terminal:
            if job.bound_agent is not None or self._missing_last_record(job):
                return self._finish(job, now)
            ttl_s = job.ttl_s if job.ttl_s is not None else self.default_ttl_s
            if ttl_s is not None and jobstate.is_expired(job_state(job), ttl_s=ttl_s, now=now):
                return lambda: self._delete(job)
            return None
        before = job_state(job)
        tr = self._decide(job, before, ready, failed_models, now)
        if tr is not None:
            return lambda: self._apply(job, tr)
        return None

    def _decide(self, job: ObservedJob, st: jobstate.JobState, ready: dict[str, bool],
                failed_models: dict[str, sourcehealth.SourceVerdict], now: float) -> _Transition | None:
        after = jobstate.check_deadline(st, now=now)
        if after is not st:
            return _Transition(st, after, "Failed", after.message or "deadline exceeded", warning=True)
        active = st.phase in (jobstate.JobPhase.SCHEDULED, jobstate.JobPhase.RUNNING)
        bound = job.bound_agent
        f = job.attempt_failure
        if active and f is not None and f.attempt == st.attempt and f.agent == st.agent:
            unavailable = self._unavailable(job, failed_models) if f.retryable else None
            if unavailable is not None:
                # The source is down everywhere: another attempt would only fail the same way.
                art, verdict = unavailable
                after = jobstate.model_unavailable(st, now=now, message=(
                    f"attempt {f.attempt} on {f.agent} failed: {f.reason} {f.message}".strip()
                    + f"; {self._unavailable_message(art, verdict)}"))
                return _Transition(st, after, "Failed", after.message or "", warning=True)
            try:
                after = jobstate.fail(st, agent=f.agent, attempt=f.attempt, reason=f.reason, message=f.message,
                                      retryable=f.retryable, now=now,
                                      agent_fault=f.retryable and f.reason in AGENT_FAULT_REASONS)
            except jobstate.InvalidTransition as exc:
                log.debug("%s: ignoring attempt failure: %s", job.key, exc)
            else:
                return self._outcome(st, after, f"attempt {f.attempt} failed on {f.agent}: {f.reason} {f.message}".strip())
        if bound is not None and active and not ready.get(f"{job.namespace}/{bound}", False):
            after = jobstate.agent_lost(st, now=now, agent=bound)
            return self._outcome(st, after, f"agent {bound} stopped renewing its Lease")
        if bound is None and active:
            # A previous unbind wrote the label removal but not the status: finish it.
            after = jobstate.agent_lost(st, now=now)
            return self._outcome(st, after, f"attempt {st.attempt} lost its binding to {st.agent}")
        if job.pending:
            unavailable = self._unavailable(job, failed_models)
            if unavailable is not None:
                after = jobstate.model_unavailable(st, message=self._unavailable_message(*unavailable), now=now)
                return _Transition(st, after, "Failed", after.message or "", warning=True)
        return None

    @staticmethod
    def _unavailable(job: ObservedJob, failed_models: dict[str, sourcehealth.SourceVerdict]
                     ) -> tuple[str, sourcehealth.SourceVerdict] | None:
        for art in job.artifacts:
            verdict = failed_models.get(f"{job.namespace}/{art}")
            if verdict is not None:
                return art, verdict
        return None

    def _unavailable_message(self, art: str, verdict: sourcehealth.SourceVerdict) -> str:
        return unavailable_message(art, verdict, self.state.source_settings)

    @staticmethod
    def _outcome(before: jobstate.JobState, after: jobstate.JobState, why: str) -> _Transition:
        if after.phase is jobstate.JobPhase.PENDING:
            used, _ = jobstate.attempts_used(after.history)
            last = after.history[-1] if after.history else None
            counted = "a fault of its agent, not counted" if last is not None and last.agent_fault else "counted"
            return _Transition(before, after, "Requeued", f"{why}; attempt {after.attempt} is pending ({counted}; "
                               f"{used} of {after.max_attempts} allowed failures used)")
        return _Transition(before, after, "Failed", f"{after.reason}: {after.message}", warning=True)

    def _unlabel(self, job: ObservedJob) -> str:
        """Remove the binding (label and annotations), recording which one it was; returns the new
        resourceVersion."""
        assert job.bound_agent is not None
        attempt = max(1, job.bound_attempt or 0, job.status_attempt)
        body = self.writer.objects(job.namespace).patch("GenerationJob", job.name, {"metadata": {
            "labels": {AGENT_LABEL: None},
            "annotations": {ATTEMPT_ANNOTATION: None, SCHEDULED_AT_ANNOTATION: None,
                            UNBOUND_ANNOTATION: unbound_value(job.bound_agent, attempt)}}},
            resource_version=job.resource_version)
        self.state.upsert_job(body)
        return str(body["metadata"]["resourceVersion"])

    def _apply(self, job: ObservedJob, tr: _Transition) -> None:
        rv = self._unlabel(job) if job.bound_agent is not None else job.resource_version
        patch = status_patch(tr.before, tr.after)
        if patch and tr.after.phase != tr.before.phase:
            patch["conditions"] = job_conditions(job.conditions, phase=tr.after.phase.value, now=now_rfc3339(),
                                                 generation=job.generation, reason=tr.after.reason,
                                                 message=tr.after.message)
            patch["stage"] = None
        if patch:
            body = self.writer.objects(job.namespace).patch_status("GenerationJob", job.name, patch, resource_version=rv)
            self.state.upsert_job(body)
        # Agents write their own reasons: only known ones become label values.
        if tr.event == "Requeued":
            metrics.REQUEUES.labels(reason=shared_metrics.reason_label(tr.after.reason)).inc()
        elif tr.after.phase is jobstate.JobPhase.FAILED:
            metrics.JOB_FAILURES.labels(reason=shared_metrics.reason_label(tr.after.reason or tr.event)).inc()
        log.info("%s: %s (%s)", job.key, tr.event, tr.message)
        self.writer.event(job.ref(), reason=tr.event, message=tr.message, warning=tr.warning)

    @staticmethod
    def _missing_last_record(job: ObservedJob) -> bool:
        attempt = max(1, job.status_attempt, job.bound_attempt or 0)
        agent = job.status_agent or job.bound_agent
        return agent is not None and not any(h.attempt == attempt for h in job.history)

    def _finish(self, job: ObservedJob, now: float) -> Callable[[], None]:
        def run() -> None:
            missing = self._missing_last_record(job)
            rv = self._unlabel(job) if job.bound_agent is not None else job.resource_version
            if not missing:
                return
            st = job_state(job)
            agent = job.status_agent or job.bound_agent or ""
            # Replay the agent's final report through the state machine to get the history record.
            running = dataclasses.replace(st, phase=jobstate.JobPhase.RUNNING, agent=agent, finished_at=None)
            if job.phase is jobstate.JobPhase.SUCCEEDED:
                after = jobstate.succeed(running, agent=agent, attempt=st.attempt, now=job.finished_at or now)
            else:
                after = jobstate.fail(running, agent=agent, attempt=st.attempt, reason=job.reason or "Failed",
                                      message="", retryable=False, now=job.finished_at or now)
            patch = status_patch(running, after)
            for field in ("phase", "agent", "reason", "message"):
                patch.pop(field, None)  # the agent's final word stands
            if job.finished_at is not None:
                patch.pop("finishedAt", None)
            if job.status_agent != agent or job.status_attempt != st.attempt:
                patch.update(agent=agent, attempt=st.attempt)  # the agent finished without recording them
            body = self.writer.objects(job.namespace).patch_status("GenerationJob", job.name, patch, resource_version=rv)
            self.state.upsert_job(body)
        return run

    def _delete(self, job: ObservedJob) -> None:
        # Preconditioned: a job recreated under the same name, or changed since, is left alone.
        self.writer.objects(job.namespace).custom.delete_namespaced_custom_object(
            GROUP, VERSION, job.namespace, "generationjobs", job.name,
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(
                uid=job.uid, resource_version=job.resource_version)))
        ttl_s = job.ttl_s if job.ttl_s is not None else self.default_ttl_s
        message = (f"deleted {ttl_s or 0:.0f}s after it finished ("
                   + ("ttlSecondsAfterFinished)" if job.ttl_s is not None else "the operator's default TTL for finished jobs)"))
        log.info("%s: %s", job.key, message)
        self.writer.event(job.ref(), reason="Expired", message=message)
