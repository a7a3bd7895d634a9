"""The scheduling loop: gather pending jobs and agents, plan with placement, write bindings (shell).

A binding is one write: a merge patch on the GenerationJob (label stoker.dev/agent,
annotations stoker.dev/attempt and stoker.dev/scheduled-at) carrying the
resourceVersion the plan was made from, so a stale cache or a second operator can
never bind a job twice (409: skip, the watch will catch up). The operator writes no
status for it: the bound agent records phase Scheduled when it accepts the job, and
the state machine counts a labelled job as bound whatever its status says. The
Scheduled Event is written in the background, after the burst of bindings.

Writes go through a thread pool (the kubernetes client is synchronous) so that one
pass can bind many jobs at once; a job whose binding is in flight is left out of
later passes until the watch shows it bound.

A pass costs in proportion to what changed: the pending queue comes already sorted
from `State` (kept sorted by `placement.job_order_key` as jobs arrive and leave) and is
read lazily, only as far as free slots last; the pending demand per artifact is kept
incrementally; each namespace keeps a `planner.Planner`, which remembers each waiting
job's outcome until something it was computed from changes, and keeps its promised
start (a job whose agent overruns it goes elsewhere); an agent's `AgentView` object is
reused until its CacheAgent version, readiness or bound jobs change, which is what tells
the planner (and its fleet index) that the agent changed. A pass reads only the agents
`State`'s change feed names and those whose Lease lapsed since (a heap of lapse times),
and every agent every few seconds.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import urllib3.exceptions
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION, SCHEDULED_AT_ANNOTATION, UNBOUND_ANNOTATION
from stoker.kube import Objects
from stoker.operator import events, metrics, placement, planner
from stoker.operator.state import ObservedJob, State, agent_view, format_time, measured_sizes, unknown_size_bytes

log = logging.getLogger(__name__)


class Writer:
    """Runs writes on a thread pool, one at a time per object, and remembers which version
    of each object it last acted on so that the loops do not repeat themselves while the
    watch catches up."""

    def __init__(self, api: client.ApiClient, *, threads: int = 16,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        self.api = api
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="stoker-write")
        self.is_leader = is_leader
        self._objects: dict[str, Objects] = {}
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._acted: dict[str, str] = {}
        # Events wait while every write thread has work: bindings and status come first.
        self.events = events.EventRecorder(api, busy=lambda: self.busy_count() > threads)

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
            except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
                # The API server is unreachable or restarting: the next pass tries again.
                log.warning("write on %s failed: %s: %s", key, type(exc).__name__, str(exc)[:200])
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
        """Record a Kubernetes Event in the background, aggregated with similar ones (see `events`)."""
        self.events.record(obj, reason=reason, message=message, warning=warning)

    def busy_count(self) -> int:
        with self._lock:
            return len(self._busy)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.events.shutdown()


def _by_name(agent: Any) -> str:
    return agent.name


_WALK_EVERY_S = 10.0
"""Read every agent of a namespace at least this often, not only those the change feed names."""


class _Fleet:
    """One namespace's agents as placement saw them last: the reused views and the planner."""

    __slots__ = ("planner", "views", "out", "at", "usable", "vram", "walked_at", "uids_version", "lapses",
                 "silence_s", "silent", "sizes", "sizes_version")

    def __init__(self, settings: placement.PlacementSettings) -> None:
        self.planner = planner.Planner(settings)
        self.views: dict[str, tuple[tuple[str, bool, int, int], placement.AgentView]] = {}
        """agent key -> (CacheAgent resourceVersion, ready, bound-jobs version, ModelCache uids version), view."""
        self.out: list[placement.AgentView] = []
        """The views by agent name: the order they are handed to the planner in."""
        self.at: dict[str, int] = {}
        """agent key -> its place in `out`."""
        self.usable: set[str] = set()
        """Agents Ready, uncordoned and with a free slot: a pass with none plans nothing."""
        self.vram: Counter[int] = Counter()
        """VRAM budget -> agents reporting it."""
        self.walked_at = -math.inf
        """Monotonic time of the last pass that read every agent."""
        self.uids_version = -1
        self.lapses: list[tuple[float, str]] = []
        """Heap of (monotonic time, agent key) at which an agent read as ready stops being so
        unless its Lease is renewed (a renewal touches the agent; stale entries are harmless)."""
        self.silence_s = math.inf
        """The shortest silence of the Lease watch after which a lapsed agent counts as ready."""
        self.silent = False
        self.sizes: dict[str, placement.ArtifactInfo] = {}
        self.sizes_version: tuple[int, int | None] = (-1, None)
        """(State.sizes_version, largest VRAM budget) the sizes were worked out with."""


class Scheduler:
    """One `schedule_once()` per wake-up: a placement pass per namespace, bindings written in the background."""

    def __init__(self, state: State, writer: Writer, *, lease_grace_s: float | None,
                 settings: placement.PlacementSettings | None = None) -> None:
        self.state = state
        self.writer = writer
        self.lease_grace_s = lease_grace_s
        self.settings = settings or state.placement_settings
        if self.settings != state.placement_settings:
            raise ValueError("the Scheduler and its State must use the same PlacementSettings (the queue order)")
        self._fleets: dict[str, _Fleet] = {}
        self._touched: dict[str, set[str]] = {}
        """namespace -> agents the change feed named that its next pass has yet to read."""
        self.unplaceable: dict[str, str] = {}
        """job key -> why the last pass that examined it found no agent (read by the pending reporter)."""
        self.last_plan = (0, 0, 0, 0)
        """(jobs examined, bindings, waiting, unplaceable) of the last pass that planned."""

    def schedule_once(self, *, now: float | None = None, now_mono: float | None = None) -> int:
        """Plan and start writing the bindings of one pass; returns how many were started."""
        now = time.time() if now is None else now
        now_mono = time.monotonic() if now_mono is None else now_mono
        started = time.perf_counter()
        st = self.state
        with st.lock:
            metrics.PENDING_JOBS.set(len(st.pending))
            metrics.BOUND_JOBS.set(st.bound_jobs)
            namespaces = [ns for ns, q in st.queues.items() if q]
        total = 0
        for namespace in namespaces:
            total += self._schedule_namespace(namespace, now=now, now_mono=now_mono)
        metrics.PASS_SECONDS.observe(time.perf_counter() - started)
        return total

    def _schedule_namespace(self, namespace: str, *, now: float, now_mono: float) -> int:
        st = self.state
        fleet = self._fleets.get(namespace)
        if fleet is None:
            fleet = self._fleets[namespace] = _Fleet(self.settings)
        views = self._agent_views(namespace, fleet, now_mono)
        if not fleet.usable:
            return 0
        with st.lock:
            queue = list(st.queues.get(namespace, ()))
            demand = dict(st.pending_demand.get(namespace, {}))
            failed = {k.split("/", 1)[1] for k in st.source_failed if k.startswith(f"{namespace}/")}
            # A guess must never make a job infeasible: an unknown size is capped at half the
            # largest VRAM budget (placement refuses agents whose VRAM the job's files exceed).
            vram = max(fleet.vram, default=None)
            if fleet.sizes_version != (st.sizes_version, vram):
                measured = measured_sizes((a for a in st.agents.values() if a.namespace == namespace),
                                          st.model_uids())
                sizes = {m.name: placement.ArtifactInfo(m.name, measured.get(
                    m.key, m.resource.spec.source.size_bytes or unknown_size_bytes(m, vram_bytes=vram)))
                    for m in st.models.values() if m.namespace == namespace}
                if sizes != fleet.sizes:  # the same object while unchanged: the planner's memory rests on it
                    fleet.sizes = sizes
                fleet.sizes_version = (st.sizes_version, vram)
            pending = len(st.pending)
        by_key: dict[str, ObservedJob] = {}
        may_act = self.writer.may_act

        def eligible() -> Any:
            # Read without the lock while planning: single dict/set reads are atomic, and a job
            # that changed meanwhile is either skipped (no longer pending) or taken at its new version.
            for _, key in queue:
                job = st.jobs.get(key)
                view = st.pending_views.get(key)
                if job is None or view is None or key in st.inflight or not may_act(key, job.resource_version):
                    continue
                if failed and any(a in failed for a in job.artifacts):
                    continue  # the reconciler fails it with ModelUnavailable
                if any(f"{namespace}/{a}" not in st.models for a in job.artifacts):
                    continue  # waits for its ModelCache; the pending reporter says so, and fails it after its grace
                by_key[key] = job
                yield view

        plan = fleet.planner.plan(eligible(), views, fleet.sizes, now=now, jobs_sorted=True, demand=demand)
        if fleet.planner.remembered > 2 * pending + 1000:
            with st.lock:
                fleet.planner.retain(st.pending_views)  # jobs deleted or failed while pending
        total = 0
        for b in plan.bindings:
            self.unplaceable.pop(b.job_key, None)
            if self._start_binding(by_key[b.job_key], b):
                total += 1
        for u in plan.unplaceable:
            self.unplaceable[u.job_key] = u.reason
        if len(self.unplaceable) > 100_000:
            self.unplaceable.clear()
        self.last_plan = (plan.jobs_examined, len(plan.bindings), len(plan.waiting), len(plan.unplaceable))
        if plan.bindings:  # (one line per pass, many a second under load: the 10 s summary says it at INFO)
            log.debug("%s: binding %d of %d pending jobs examined (%d waiting for a busy agent, %d unplaceable)",
                      namespace, len(plan.bindings), plan.jobs_examined, len(plan.waiting), len(plan.unplaceable))
        return total

    def _agent_views(self, namespace: str, fleet: _Fleet, now_mono: float) -> list[placement.AgentView]:
        """The namespace's AgentViews in a stable order, reusing each one until it changes. Only
        the agents that may have changed are read: those the change feed names (a CacheAgent,
        Lease or bound job changed) and those whose readiness lapsed; every agent when the
        ModelCache uids moved, the Lease watch fell silent (or spoke again), and every
        `_WALK_EVERY_S` anyway."""
        st = self.state
        with st.lock:
            touched = self._take_touched(namespace)
            lapses = fleet.lapses
            while lapses and lapses[0][0] < now_mono:
                touched.add(heapq.heappop(lapses)[1])
            silent = now_mono - st.last_lease_event > fleet.silence_s
            members = fleet.views
            walk = (silent or fleet.silent or st.uids_version != fleet.uids_version
                    or now_mono - fleet.walked_at > _WALK_EVERY_S
                    or any((key in members) != (key in st.agents) for key in touched))
            if walk:
                keys = [a.key for a in sorted((a for a in st.agents.values() if a.namespace == namespace), key=_by_name)]
                fleet.walked_at, fleet.lapses, fleet.silence_s = now_mono, [], math.inf
                lapses = fleet.lapses
            else:
                keys = [key for key in touched if key in members]
            fleet.silent = silent
            uids_version = fleet.uids_version = st.uids_version
            jobs_version = st.agent_jobs_version
            grace = self.lease_grace_s
            reads = []
            for key in keys:
                ready, until, silence = st.readiness(key, now_mono=now_mono, grace_s=grace)
                if ready and until >= now_mono:
                    heapq.heappush(lapses, (until, key))
                fleet.silence_s = min(fleet.silence_s, silence)
                reads.append((st.agents[key], ready, jobs_version.get(key, 0)))
        uids: dict[str, str] | None = None
        if walk:
            fleet.views, fleet.out, fleet.at, fleet.usable, fleet.vram = {}, [], {}, set(), Counter()
        for a, ready, version in reads:
            sig = (a.resource_version, ready, version, uids_version)
            cached = members.get(a.key)
            if cached is None or cached[0] != sig:
                bound, in_use = st.agent_load(a.key)
                uids = st.model_uids() if uids is None else uids
                cached = (sig, agent_view(a, ready=ready, bound=bound, in_use=in_use, model_uids=uids))
            self._keep(fleet, a.key, cached, walk=walk)
        return list(fleet.out)

    @staticmethod
    def _keep(fleet: _Fleet, key: str, cached: tuple[tuple[str, bool, int, int], placement.AgentView], *,
              walk: bool) -> None:
        """Put an agent's view in its place (appended in a walk, which goes in name order)."""
        view = cached[1]
        if walk:
            fleet.at[key] = len(fleet.out)
            fleet.out.append(view)
        else:
            old = fleet.views[key][1]
            if old is view:
                return
            fleet.out[fleet.at[key]] = view
            if old.vram_capacity_bytes:
                fleet.vram[old.vram_capacity_bytes] -= 1
                if not fleet.vram[old.vram_capacity_bytes]:
                    del fleet.vram[old.vram_capacity_bytes]
        fleet.views[key] = cached
        if view.vram_capacity_bytes:
            fleet.vram[view.vram_capacity_bytes] += 1
        if view.free_slots > 0 and view.ready and not view.cordoned:
            fleet.usable.add(key)
        else:
            fleet.usable.discard(key)

    def _take_touched(self, namespace: str) -> set[str]:
        """The agents of `namespace` the change feed named since its last pass (caller holds the lock)."""
        for key in self.state.take_touched_agents():
            self._touched.setdefault(key.split("/", 1)[0], set()).add(key)
        return self._touched.pop(namespace, set())

    def _start_binding(self, job: ObservedJob, b: placement.Binding) -> bool:
        attempt = max(1, job.status_attempt)
        self.state.set_inflight(job.key, f"{job.namespace}/{b.agent}")

        def settle() -> None:
            # Bound (the response is in state) or not: either way the write is no longer in flight.
            self.state.clear_inflight(job.key)

        ok = self.writer.submit(job.key, job.resource_version,
                                lambda: self._bind(job, b.agent, attempt, b.cache_tier.value, b.reason), cleanup=settle)
        if not ok:
            settle()
        return ok

    def _bind(self, job: ObservedJob, agent: str, attempt: int, tier: str, why: str) -> None:
        objs = self.writer.objects(job.namespace)
        now = time.time()
        try:
            body = objs.patch("GenerationJob", job.name, {"metadata": {
                "labels": {AGENT_LABEL: agent},
                "annotations": {ATTEMPT_ANNOTATION: str(attempt), SCHEDULED_AT_ANNOTATION: format_time(now),
                                UNBOUND_ANNOTATION: None}}},
                resource_version=job.resource_version)
        except ApiException as exc:
            if exc.status == 409:
                metrics.BIND_CONFLICTS.inc()
            raise
        metrics.BINDINGS.labels(tier=tier).inc()
        metrics.BIND_LATENCY.observe(max(0.0, time.time() - job.created_at))
        # Take the response in at once so that no later pass sees this job as pending.
        self.state.upsert_job(body)
        # At DEBUG: hundreds a second under load; the Scheduled Event and the 10 s summary say it.
        log.debug("bound %s attempt %d to %s (%s hit): %s", job.key, attempt, agent, tier, why,
                 extra={"job": job.key, "agent": agent, "model": job.model, "attempt": attempt})
        self.writer.event(job.ref(), reason="Scheduled", message=f"attempt {attempt} bound to {agent}: {why}")
