"""The scheduling loop: gather pending jobs and agents, plan with placement, write bindings (shell).

A binding is one merge patch on the GenerationJob (label stoker.dev/agent and
annotation stoker.dev/attempt) carrying the resourceVersion the plan was made from,
so a stale cache or a second operator can never bind a job twice (409: skip, the
watch will catch up). Then the status patch (phase Scheduled, agent, attempt,
scheduledAt), preconditioned on the version the binding produced: if the agent has
already moved the job on, the reconciler fills in the operator's fields instead.

Writes go through a thread pool (the kubernetes client is synchronous) so that one
pass can bind many jobs at once; a job whose binding is in flight is left out of
later passes until the watch shows it bound.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION
from stoker.kube import Objects
from stoker.operator import metrics, placement
from stoker.operator.state import (ObservedJob, State, agent_view, format_time, job_view, model_failures,
                                  model_size_bytes)

log = logging.getLogger(__name__)


class Writer:
    """Runs writes on a thread pool, one at a time per object, and remembers which version
    of each object it last acted on so that the loops do not repeat themselves while the
    watch catches up."""

    def __init__(self, api: client.ApiClient, *, threads: int = 16,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        self.api = api
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="stoker-write")
        self.event_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="stoker-event")
        self.is_leader = is_leader
        self._objects: dict[str, Objects] = {}
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._acted: dict[str, str] = {}
        self._queued_events = 0
        self.max_queued_events = 100

    def objects(self, namespace: str) -> Objects:
        objs = self._objects.get(namespace)
        if objs is None:
            # Built outside the lock: the first one imports the client's large API modules.
            objs = self._objects.setdefault(namespace, Objects(self.api, namespace))
        return objs

    def may_act(self, key: str, resource_version: str) -> bool:
        with self._lock:
            return key not in self._busy and self._acted.get(key) != resource_version

    def submit(self, key: str, resource_version: str, fn: Callable[[], None], *,
               cleanup: Callable[[], None] | None = None) -> bool:
        """Run `fn` unless a write for `key` is in flight. Once it wrote (or met a conflict), the
        version is remembered and not acted on again; after other errors the next pass retries.
        `cleanup` runs in every case."""
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)

        def run() -> None:
            done = False
            try:
                if self.is_leader():
                    fn()
                    done = True
            except ApiException as exc:
                if exc.status in (404, 409):
                    done = True
                    log.debug("write on %s skipped: %s", key, exc.reason)
                else:
                    log.warning("write on %s failed: %s %s", key, exc.status, exc.reason)
            except Exception:  # a bug in one write must not stop the loop
                log.exception("write on %s failed", key)
            finally:
                with self._lock:
                    self._busy.discard(key)
                    if done:
                        self._acted[key] = resource_version
                        if len(self._acted) > 200_000:
                            self._acted.clear()
                if cleanup is not None:
                    cleanup()

        self.pool.submit(run)
        return True

    def event(self, obj: dict[str, Any], *, reason: str, message: str, warning: bool = False) -> None:
        """Record a Kubernetes Event in the background. Best-effort, like client-go's recorder: when
        more than `max_queued_events` wait (a burst of bindings), further ones are dropped and counted,
        so Events never take API capacity from the writes that matter."""
        with self._lock:
            if self._queued_events >= self.max_queued_events:
                metrics.EVENTS_DROPPED.inc()
                return
            self._queued_events += 1
        ns = obj["metadata"]["namespace"]

        def write() -> None:
            try:
                self.objects(ns).event(obj, reason=reason, message=message, warning=warning,
                                       component="stoker-operator")
            finally:
                with self._lock:
                    self._queued_events -= 1

        self.event_pool.submit(write)

    def busy_count(self) -> int:
        with self._lock:
            return len(self._busy)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.event_pool.shutdown(wait=True, cancel_futures=True)


class Scheduler:
    """One `schedule_once()` per wake-up: a placement pass per namespace, bindings written in the background."""

    def __init__(self, state: State, writer: Writer, *, lease_grace_s: float | None,
                 settings: placement.PlacementSettings = placement.PlacementSettings()) -> None:
        self.state = state
        self.writer = writer
        self.lease_grace_s = lease_grace_s
        self.settings = settings
        self._views: dict[str, tuple[str, placement.JobView]] = {}
        self.last_plan = (0, 0, 0, 0)
        """(jobs, bindings, waiting, unplaceable) of the last pass that planned."""

    def schedule_once(self, *, now: float | None = None, now_mono: float | None = None) -> int:
        """Plan and start writing the bindings of one pass; returns how many were started."""
        now = time.time() if now is None else now
        now_mono = time.monotonic() if now_mono is None else now_mono
        started = time.perf_counter()
        work = self._gather(now_mono)
        total = 0
        for namespace, (jobs, agents, artifacts, by_key) in work.items():
            if not jobs or not any(a.free_slots > 0 and a.ready and not a.cordoned for a in agents):
                continue
            plan = placement.plan_placement(jobs, agents, artifacts, now=now, settings=self.settings)
            for b in plan.bindings:
                job = by_key[b.job_key]
                if self._start_binding(job, b):
                    total += 1
            self.last_plan = (len(jobs), len(plan.bindings), len(plan.waiting), len(plan.unplaceable))
            if plan.bindings:
                log.info("%s: binding %d of %d pending jobs (%d waiting for a busy agent, %d unplaceable)", namespace,
                         len(plan.bindings), len(jobs), len(plan.waiting), len(plan.unplaceable))
        metrics.PASS_SECONDS.observe(time.perf_counter() - started)
        return total

    def _gather(self, now_mono: float) -> dict[str, tuple[list[placement.JobView], list[placement.AgentView],
                                                        list[placement.ArtifactInfo], dict[str, ObservedJob]]]:
        st = self.state
        out: dict[str, Any] = {}
        with st.lock:
            metrics.PENDING_JOBS.set(len(st.pending))
            metrics.BOUND_JOBS.set(sum(len(v) for v in st.bound.values()))
            inflight_per_agent: dict[str, int] = {}
            for agent_key in st.inflight.values():
                inflight_per_agent[agent_key] = inflight_per_agent.get(agent_key, 0) + 1
            failed = model_failures(list(st.agents.values())) if st.pending else {}
            for key in st.pending:
                job = st.jobs[key]
                if key in st.inflight or not self.writer.may_act(key, job.resource_version):
                    continue
                if failed and any(f"{job.namespace}/{a}" in failed for a in job.artifacts):
                    continue  # the reconciler fails it with ModelUnavailable
                cached = self._views.get(key)
                if cached is None or cached[0] != job.resource_version:
                    cached = (job.resource_version, job_view(job))
                    self._views[key] = cached
                ns = out.setdefault(job.namespace, ([], [], [], {}))
                ns[0].append(cached[1])
                ns[3][key] = job
            if len(self._views) > 2 * len(st.pending) + 1000:
                self._views = {k: v for k, v in self._views.items() if k in st.pending}
            for ns_name, (jobs, agents, artifacts, _) in out.items():
                ns_agents = [a for a in st.agents.values() if a.namespace == ns_name]
                for a in ns_agents:
                    bound_keys = st.bound.get(a.key, set())
                    in_use: set[str] = set()
                    for jk in bound_keys:
                        in_use.update(st.jobs[jk].artifacts)
                    ready = st.agent_ready(a.key, now_mono=now_mono, grace_s=self.lease_grace_s)
                    agents.append(agent_view(a, ready=ready, bound=len(bound_keys) + inflight_per_agent.get(a.key, 0),
                                             in_use=in_use))
                wanted = {k for j in jobs for k in j.artifact_keys}
                for m in st.models.values():
                    if m.namespace == ns_name and m.name in wanted:
                        artifacts.append(placement.ArtifactInfo(m.name, model_size_bytes(m, ns_agents)))
        return out

    def _start_binding(self, job: ObservedJob, b: placement.Binding) -> bool:
        attempt = max(1, job.status_attempt)
        with self.state.lock:
            self.state.inflight[job.key] = f"{job.namespace}/{b.agent}"
        def settle() -> None:
            # Bound (the response is in state) or not: either way the write is no longer in flight.
            with self.state.lock:
                self.state.inflight.pop(job.key, None)

        ok = self.writer.submit(job.key, job.resource_version,
                                lambda: self._bind(job, b.agent, attempt, b.cache_tier.value, b.reason), cleanup=settle)
        if not ok:
            settle()
        return ok

    def _bind(self, job: ObservedJob, agent: str, attempt: int, tier: str, why: str) -> None:
        objs = self.writer.objects(job.namespace)
        try:
            body = objs.patch("GenerationJob", job.name, {"metadata": {
                "labels": {AGENT_LABEL: agent}, "annotations": {ATTEMPT_ANNOTATION: str(attempt)}}},
                resource_version=job.resource_version)
        except ApiException as exc:
            if exc.status == 409:
                metrics.BIND_CONFLICTS.inc()
            raise
        now = time.time()
        metrics.BINDINGS.labels(tier=tier).inc()
        metrics.BIND_LATENCY.observe(max(0.0, now - job.created_at))
        # Take the response in at once so that no later pass sees this job as pending.
        self.state.upsert_job(body)
        status = {"phase": "Scheduled", "agent": agent, "attempt": attempt, "scheduledAt": format_time(now),
                  "reason": None, "message": None}
        rv = body["metadata"]["resourceVersion"]
        for _ in range(3):
            try:
                self.state.upsert_job(objs.patch_status("GenerationJob", job.name, status, resource_version=rv))
                break
            except ApiException as exc:
                if exc.status != 409:
                    raise
            # The agent moved the job on (Running) before this write: fill in only the operator's fields.
            current = objs.get("GenerationJob", job.name)
            meta = current["metadata"]
            if ((meta.get("labels") or {}).get(AGENT_LABEL) != agent
                    or (meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION) != str(attempt)):
                break
            rv = meta["resourceVersion"]
            status = {k: v for k, v in status.items() if k in ("agent", "attempt", "scheduledAt")}
        log.debug("bound %s attempt %d to %s (%s)", job.key, attempt, agent, why)
        self.writer.event(job.ref(), reason="Scheduled", message=f"attempt {attempt} bound to {agent}: {why}")
