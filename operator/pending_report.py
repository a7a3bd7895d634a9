"""Say why pending jobs cannot be placed, and fail those that waiting cannot help (shell).

`report_once()` runs `unschedulable.diagnose` on every job pending longer than
`min_age_s` (a fresh job is usually bound within a pass or two, and its ModelCache may
reach the watch a moment after it). A diagnosis that differs from what the job shows is
written as status.reason/message and condition Scheduled=False with that reason (the
whole conditions list, with a resourceVersion precondition), with a Warning Event
FailedScheduling, as the scheduler does for Pods. A job whose ModelCache is still missing
after its grace fails with ModelCacheNotFound. A job that only waits for a busy agent
has no diagnosis and costs no write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from stoker import metrics as shared_metrics
from stoker.api.conditions import job_conditions
from stoker.kube import now_rfc3339
from stoker.operator import jobstate, metrics, unschedulable
from stoker.operator.scheduler import Writer
from stoker.operator.state import ObservedJob, State, job_state, known_size_bytes, status_patch

log = logging.getLogger(__name__)


class PendingReporter:
    def __init__(self, state: State, writer: Writer, *, lease_grace_s: float | None, missing_grace_s: float = 60.0,
                 min_age_s: float = 2.0, placement_messages: Callable[[], Mapping[str, str]] = dict) -> None:
        self.state = state
        self.writer = writer
        self.lease_grace_s = lease_grace_s
        self.missing_grace_s = missing_grace_s
        """The grace of jobs that set no spec.missingModelGraceSeconds."""
        self.min_age_s = min_age_s
        self.placement_messages = placement_messages
        """job key -> why the last placement pass found no agent for it."""

    def report_once(self, *, now: float | None = None, now_mono: float | None = None) -> int:
        now = time.time() if now is None else now
        now_mono = time.monotonic() if now_mono is None else now_mono
        st = self.state
        with st.lock:
            jobs = [st.jobs[k] for k in st.pending if k in st.jobs and now - st.jobs[k].created_at >= self.min_age_s]
            if not jobs:
                return 0
            agents = list(st.agents.values())
            models = list(st.models.values())
            inflight = set(st.inflight)
        unplaced = self.placement_messages()
        facts_by_ns: dict[str, tuple[dict[str, unschedulable.ModelFacts], unschedulable.FleetFacts]] = {}
        started = 0
        for job in jobs:
            if job.key in inflight or not self.writer.may_act(job.key, job.resource_version):
                continue
            if job.namespace not in facts_by_ns:
                ns_agents = [a for a in agents if a.namespace == job.namespace]
                facts_by_ns[job.namespace] = (
                    {m.name: unschedulable.ModelFacts(m.name, known_size_bytes(m, ns_agents)[0])
                     for m in models if m.namespace == job.namespace},
                    unschedulable.FleetFacts.of([unschedulable.AgentFacts(
                        name=a.name, ready=st.agent_ready(a.key, now_mono=now_mono, grace_s=self.lease_grace_s),
                        cordoned=a.resource.spec.cordon,
                        disk_budget_bytes=(a.resource.status.disk.budget_bytes or None) if a.resource.status else None,
                        vram_bytes=(a.resource.status.vram.budget_bytes or None) if a.resource.status else None)
                     for a in ns_agents]))
            model_facts, agent_facts = facts_by_ns[job.namespace]
            grace = job.missing_grace_s if job.missing_grace_s is not None else self.missing_grace_s
            diagnosis = unschedulable.diagnose(
                unschedulable.JobFacts(job.key, job.created_at, job.roles, grace),
                models=model_facts, agents=agent_facts, now=now, placement_message=unplaced.get(job.key))
            if diagnosis is None:
                continue
            if diagnosis.fail:
                started += int(self.writer.submit(job.key, job.resource_version,
                                                  lambda job=job, d=diagnosis: self._fail(job, d, now)))
            elif (job.reason, job.message) != (diagnosis.reason.value, diagnosis.message):
                started += int(self.writer.submit(job.key, job.resource_version,
                                                  lambda job=job, d=diagnosis: self._report(job, d)))
        return started

    def _report(self, job: ObservedJob, d: unschedulable.Diagnosis) -> None:
        status = {"reason": d.reason.value, "message": d.message,
                  "conditions": job_conditions(job.conditions, phase="Pending", now=now_rfc3339(),
                                               generation=job.generation, reason=d.reason.value, message=d.message)}
        body = self.writer.objects(job.namespace).patch_status("GenerationJob", job.name, status,
                                                               resource_version=job.resource_version)
        self.state.upsert_job(body)
        if job.reason != d.reason.value:
            log.info("%s cannot be placed: %s: %s", job.key, d.reason.value, d.message,
                     extra={"job": job.key, "model": job.model})
        metrics.UNSCHEDULABLE.labels(reason=d.reason.value).inc()
        self.writer.event(job.ref(), reason="FailedScheduling", message=f"{d.reason.value}: {d.message}", warning=True)

    def _fail(self, job: ObservedJob, d: unschedulable.Diagnosis, now: float) -> None:
        before = job_state(job)
        after = jobstate.unschedulable(before, reason=d.reason.value, message=d.message, now=now)
        patch = status_patch(before, after)
        patch["conditions"] = job_conditions(job.conditions, phase="Failed", now=now_rfc3339(),
                                             generation=job.generation, reason=d.reason.value, message=d.message)
        body = self.writer.objects(job.namespace).patch_status("GenerationJob", job.name, patch,
                                                               resource_version=job.resource_version)
        self.state.upsert_job(body)
        metrics.JOB_FAILURES.labels(reason=shared_metrics.reason_label(d.reason.value)).inc()
        log.info("%s: Failed (%s: %s)", job.key, d.reason.value, d.message, extra={"job": job.key, "model": job.model})
        self.writer.event(job.ref(), reason="Failed", message=f"{d.reason.value}: {d.message}", warning=True)
