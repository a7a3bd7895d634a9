"""The job loop: run the GenerationJobs bound to this agent, report what happened (I/O).

Every status write is guarded: it carries the resourceVersion it was computed from and
happens only while the job's label and attempt annotation still name this agent and
attempt (stoker.api.protocol.bound_attempt). A job that is deleted or rebound is
cancelled between denoising steps and its result is never written, nor its image
delivered.

Concurrency: `slots` generations run at once; up to `queue_slots` more jobs are taken in
beside them, and while they wait for a generation slot their files are downloaded (and
pinned on disk at once) and their weights staged (into VRAM when they fit without touching
a model in use, else into the RAM tier), so that a model swap overlaps the running
generation. Jobs bound beyond `slots + queue_slots` wait, Scheduled, without downloading or
staging anything. A job deleted or rebound while it waits lets go of its place, pins and
VRAM at once.

Attempts are told apart by the job's uid as well as its attempt number, so a job deleted
and created again under the same name is a new job.

A live agent never leaves a job Running: a failed attempt is reported with its reason,
status writes are retried with backoff through API server outages (a finished result is
kept until it is written or the attempt is no longer current), and a periodic relist
picks up anything a watch missed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import pathlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pydantic
from kubernetes.client.exceptions import ApiException

from stoker import kube
from stoker.agent import faults, output, pools, results_dir, safetensors_header
from stoker.agent.disk_store import DiskStore, DiskStoreError, ModelSource, Priority
from stoker.agent.job_metrics import JobMetrics
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact, Runner, RunnerError
from stoker.agent.weights import Weights
from stoker.api.base import AGENT_LABEL
from stoker.api.cacheagent import ModelFailure, RunningJob
from stoker.api.conditions import job_conditions
from stoker.api.generationjob import GenerationJob, Stage
from stoker.api.modelcache import ModelCache
from stoker.api.protocol import bound_attempt, scheduled_at

log = logging.getLogger(__name__)

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]


class JobFailed(Exception):
    """The attempt failed. Not retryable: the job fails. Retryable: the operator decides."""

    def __init__(self, reason: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable


def split_runner_time(runner_s: float, build_s: float) -> tuple[float, float]:
    """(build, inference) seconds of a runner call that took `runner_s` and says building its
    modules took `build_s`; a claim beyond the call's own time is capped at it. Pure."""
    build = min(max(0.0, runner_s), max(0.0, build_s))
    return build, max(0.0, runner_s - build)


class Cancelled(Exception):
    """The job was deleted or is no longer bound to this attempt, or the agent is stopping."""


@dataclasses.dataclass
class _Work:
    name: str
    attempt: int
    uid: str = ""
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the attempt is cancelled; worker threads poll it between steps."""
    cancelled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """The same, for waits on the event loop."""
    admitted: bool = False  # holds one of the slots + queue_slots places
    stage: str = "queued"  # queued (downloading, staging, waiting for a slot) | running | reporting
    model: str = ""  # cache key of the checkpoint, for time estimates
    step: int = 0
    steps: int = 0
    reported: Stage = Stage.QUEUED
    """The stage users see (status.stage); the progress loop publishes its changes."""
    keys: tuple[str, ...] = ()
    """Cache keys of the job's files, for its download progress."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    written: dict[str, Any] | None = None  # the job as the last status write left it

    def cancel_attempt(self) -> None:
        """Cancel the attempt (call on the event loop)."""
        self.cancel.set()
        self.cancelled.set()


@dataclasses.dataclass(frozen=True)
class _Final:
    """What an attempt ended with: the status patch to write, and how to record it."""

    patch: dict[str, Any]
    outcome: str  # succeeded | failed
    event: tuple[str, str] | None = None
    warning: bool = False
    phase: str | None = None
    """The phase the patch moves the job to (its conditions are computed at the write), if any."""
    reason: str | None = None
    message: str | None = None


@dataclasses.dataclass(frozen=True)
class JobSettings:
    agent: str
    namespace: str
    slots: int = 1
    """Generations run at once."""
    queue_slots: int = 1
    """Jobs taken in beyond `slots`; their downloads and loads overlap the running generations.
    Jobs bound beyond `slots + queue_slots` wait without downloading or staging."""
    results_dir: pathlib.Path = pathlib.Path("results")
    results_max_bytes: int = 1 << 30
    results_max_age_s: float | None = 24 * 3600.0
    model_not_found_grace_s: float = 10.0
    progress_interval_s: float = 1.0
    resync_interval_s: float = 30.0
    """How often the bound jobs are relisted, in case a watch event was missed."""
    write_backoff_s: float = 0.5
    """First pause after a failed status write; it doubles up to `write_max_backoff_s`."""
    write_max_backoff_s: float = 30.0
    api_timeout_s: float = 60.0
    """A single API request that takes longer counts as failed (and is retried)."""
    shutdown_grace_s: float = 10.0
    """On stop, how long running attempts get to report before they are abandoned."""
    output_policy: output.OutputPolicy = output.OutputPolicy()
    """Where images may be delivered, and how long a delivery may take."""


class Estimates:
    """Moving averages of load seconds and seconds per denoising step, per checkpoint and overall."""

    def __init__(self, *, load_s: float = 2.0, step_s: float = 0.5, weight: float = 0.3) -> None:
        self._default = (load_s, step_s)
        self._weight = weight
        self._by_model: dict[str, tuple[float, float]] = {}
        self._overall: tuple[float, float] | None = None

    def observe(self, model: str, *, load_s: float, inference_s: float, steps: int) -> None:
        step_s = inference_s / max(1, steps)
        for key in (model, None):
            old = self._overall if key is None else self._by_model.get(key)
            new = (load_s, step_s) if old is None else (
                (1 - self._weight) * old[0] + self._weight * load_s, (1 - self._weight) * old[1] + self._weight * step_s)
            if key is None:
                self._overall = new
            else:
                self._by_model[key] = new

    def _get(self, model: str) -> tuple[float, float]:
        return self._by_model.get(model) or self._overall or self._default

    def job_s(self, model: str, steps: int) -> float:
        load_s, step_s = self._get(model)
        return load_s + step_s * steps

    def remaining_s(self, model: str, steps: int, done: int) -> float:
        return self._get(model)[1] * max(0, steps - done)


class JobWorker:
    """Watches this agent's jobs (server-side label selector) and runs each bound attempt."""

    def __init__(self, *, objects: kube.Objects, settings: JobSettings, store: DiskStore, weights: Weights,
                 runner: Runner, metrics: JobMetrics, on_change: Callable[[], None], sleep: Sleep = asyncio.sleep,
                 health: faults.AgentHealth | None = None, results_store: Any = None,
                 threads: pools.Pools = pools.Pools(),
                 on_stop: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.objects, self.settings = objects, settings
        self.on_stop = on_stop
        """Awaited once the agent stops, before any job is handed back: publishes `accepting: false`."""
        self.results_store = results_store
        """S3ResultsStore for jobs without an output URL, or None: the results folder."""
        self.threads = threads
        self.store, self.weights, self.runner, self.metrics = store, weights, runner, metrics
        self.health = health or faults.AgentHealth()
        """Local faults of this agent (shared with the disk tier): loads that ran out of memory or hit a bad disk."""
        self.on_change = on_change
        self._sleep = sleep
        self.work: dict[str, _Work] = {}
        self.model_failures: dict[str, ModelFailure] = {}
        self._model_identity: dict[str, tuple[str | None, int | None]] = {}
        """Cache key -> (uid, generation) of the ModelCache last read for it; its failures name them."""
        self.artifact_sha: dict[str, str] = {}
        """Cache key -> content identity the runner keys its built modules by."""
        self.estimates = Estimates()
        self._latest: dict[str, dict[str, Any]] = {}  # newest object seen per bound job
        self._ended: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()  # (uid, attempt)
        self._generation = asyncio.Semaphore(settings.slots)
        self._admission = asyncio.Semaphore(settings.slots + settings.queue_slots)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # ---- what the status report needs

    def running(self) -> list[RunningJob]:
        """Jobs bound here and not finished, with the seconds each still needs (placement's queue wait)."""
        jobs = []
        for w in sorted(self.work.values(), key=lambda w: w.name):
            if w.stage == "running":
                remaining = self.estimates.remaining_s(w.model, w.steps, w.step)
            elif w.stage == "queued":
                remaining = self.estimates.job_s(w.model, w.steps)
            else:
                remaining = 0.0
            jobs.append(RunningJob(name=w.name, attempt=w.attempt, expected_remaining_seconds=round(remaining, 2)))
        return jobs

    # ---- watching

    async def run(self, stop: asyncio.Event) -> None:
        """Run bound attempts until `stop`; then drain: attempts not generating yet are handed back at
        once (AgentStopping, a fault of the agent), running generations get `shutdown_grace_s` to
        finish, and whatever is left is stopped between steps and handed back."""
        self._loop = asyncio.get_running_loop()
        thread_stop = threading.Event()
        watcher = pools.run_in_thread(
            kube.stream_events, self.objects.custom.list_namespaced_custom_object, stop=thread_stop,
            on_event=self._on_event_threadsafe, group="stoker.dev", version="v1alpha1",
            namespace=self.settings.namespace, plural="generationjobs", label_selector=self._selector,
            name="watch-jobs")
        resync = asyncio.create_task(self._resync_forever(stop))
        try:
            await stop.wait()
            self._stopping = True
            resync.cancel()
            if self.on_stop is not None:
                # The operator must see this agent as not accepting before a job handed back is placed
                # again, or it may bind the job right back here.
                try:
                    await asyncio.wait_for(self.on_stop(), timeout=5)
                except Exception as exc:  # noqa: BLE001 - the handback goes on; the Lease release follows
                    log.warning("could not report that this agent stopped accepting: %s", exc)
            for w in list(self.work.values()):
                if w.stage != "running":
                    w.cancel_attempt()
            if self._tasks:  # the watch goes on meanwhile: a job deleted during the drain is cancelled
                await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_grace_s)
            for w in list(self.work.values()):
                if w.stage != "reporting":
                    w.cancel_attempt()
            if self._tasks:  # let attempts stop between steps and say so
                await asyncio.wait(set(self._tasks), timeout=10)
        finally:
            thread_stop.set()
            resync.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(resync, *self._tasks, return_exceptions=True)

    @property
    def _selector(self) -> str:
        return f"{AGENT_LABEL}={self.settings.agent}"

    def _on_event_threadsafe(self, kind: str, obj: dict[str, Any]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the daemon watch thread may outlive the loop at exit
            self._loop.call_soon_threadsafe(self._on_event, kind, obj)

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":  # deleted, or no longer matching the selector (bound elsewhere)
            uid = _uid(obj)
            latest = self._latest.get(name)
            if latest is not None and _uid(latest) == uid:  # (not a newer job of the same name)
                del self._latest[name]
            current = self.work.get(name)
            if current is not None and current.uid == uid:
                log.info("job %s attempt %d is no longer ours; cancelling", name, current.attempt)
                current.cancel_attempt()
            return
        if bound_attempt(obj, self.settings.agent) is None and name not in self.work:
            self._latest.pop(name, None)  # finished or not (yet) ours: nothing to run or cancel
            return
        self._latest[name] = obj
        self._dispatch(name)

    def _dispatch(self, name: str) -> None:
        """Start, or cancel, the attempt the newest object of `name` asks for."""
        obj = self._latest.get(name)
        attempt = bound_attempt(obj, self.settings.agent) if obj is not None else None
        uid = _uid(obj) if obj is not None else ""
        current = self.work.get(name)
        if current is not None:
            if current.attempt != attempt or current.uid != uid:
                if current.stage != "reporting":  # (a reporting attempt sees its own final write come back)
                    log.info("job %s attempt %d is no longer current; cancelling", name, current.attempt)
                current.cancel_attempt()  # its task re-dispatches the newest object when it ends
            return
        if attempt is None or obj is None or self._stopping or self._has_ended(uid, attempt, obj):
            return
        work = _Work(name=name, attempt=attempt, uid=uid)
        self.work[name] = work
        task = asyncio.create_task(self._run(work, obj), name=f"job {name} attempt {attempt}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.on_change()

    def _has_ended(self, uid: str, attempt: int, obj: dict[str, Any]) -> bool:
        """Whether this agent already ended `attempt` of the job `uid` (so it must never run it again)."""
        if (uid, attempt) in self._ended:
            return True
        failure = (obj.get("status") or {}).get("attemptFailure") or {}
        return failure.get("attempt") == attempt and failure.get("agent") == self.settings.agent

    def _mark_ended(self, work: _Work) -> None:
        self._ended[(work.uid, work.attempt)] = None
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)

    async def _resync_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._sleep(self.settings.resync_interval_s)
            try:
                await self.resync()
            except Exception as exc:  # the watch still runs; try again next round
                log.warning("relisting the jobs bound to %s failed: %s", self.settings.agent, _describe(exc))

    async def resync(self) -> None:
        """Relist the bound jobs: start what a missed event left waiting, cancel what is gone."""
        before = dict(self._latest)  # what was known before the listing was taken
        listing = await self._api(self.objects.list, "GenerationJob", label_selector=self._selector)
        seen = set()
        for item in listing.get("items", []):
            name = item["metadata"]["name"]
            seen.add(name)
            if self._latest.get(name) is before.get(name):  # else a watch event newer than the listing came in
                self._on_event("MODIFIED", item)
        for name, obj in before.items():
            # Gone from the listing and no newer event since: unbound or deleted while a watch event was lost.
            if name not in seen and self._latest.get(name) is obj:
                self._on_event("DELETED", obj)

    # ---- one attempt

    async def _run(self, work: _Work, obj: dict[str, Any]) -> None:
        final: _Final | None
        try:
            try:
                final = await self._attempt(work, obj)
            except Cancelled:
                if self._stopping:
                    log.info("job %s attempt %d stopped: the agent is shutting down", work.name, work.attempt)
                    final = self._failure(work, JobFailed(
                        "AgentStopping", f"agent {self.settings.agent} shut down during the attempt", retryable=True))
                else:
                    log.info("job %s attempt %d cancelled", work.name, work.attempt)
                    self.metrics.jobs.labels("cancelled").inc()
                    final = None
            except Exception as exc:  # a bug or the unexpected: report it, never leave the job Running
                log.exception("job %s attempt %d crashed", work.name, work.attempt)
                final = self._failure(work, JobFailed("AgentError", f"{type(exc).__name__}: {exc}"[:2000], retryable=True))
            if final is not None:
                work.stage = "reporting"
                self.on_change()
                if await self._write_final(work, final):
                    self.metrics.jobs.labels(final.outcome).inc()
                    log.info("job %s attempt %d %s", work.name, work.attempt, final.outcome, extra=self._fields(work))
                else:
                    self.metrics.jobs.labels("cancelled").inc()
        finally:
            self._leave_queue(work)
            self._mark_ended(work)
            self.work.pop(work.name, None)
            self.on_change()
            if not self._stopping:
                self._dispatch(work.name)  # a newer attempt may have arrived meanwhile

    async def _attempt(self, work: _Work, obj: dict[str, Any]) -> _Final:
        try:
            job = GenerationJob.model_validate(obj)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            return self._failure(work, JobFailed(
                "InvalidSpec", f"GenerationJob {self.settings.namespace}/{work.name} cannot be read by this agent "
                f"({problems}); the CRD and the agent may be of different versions: upgrade the agent or recreate "
                "the job", retryable=False))
        work.steps = job.spec.params.steps
        spec = job.spec
        work.keys = tuple(dict.fromkeys(f"{self.settings.namespace}/{n}" for n in (
            spec.model, *(lr.name for lr in spec.loras), *([spec.vae] if spec.vae else []))))
        created = kube.parse_rfc3339(obj["metadata"]["creationTimestamp"]).timestamp()
        # The binding (label and annotations) is the operator's only write: this agent records it in the status.
        accepted = {"agent": self.settings.agent, "attempt": work.attempt, "reason": None, "message": None,
                    "scheduledAt": scheduled_at(obj, kube.now_rfc3339())}
        if self._admission.locked():
            # Beyond slots + queue_slots a job waits here, Scheduled and Queued, downloading and holding nothing.
            # (A job admitted at once skips this write: its first write says Running.)
            if await self._write(work, lambda current: {
                    **accepted, "phase": "Scheduled", "stage": Stage.QUEUED.value,
                    "progress": {"step": 0, "steps": work.steps, "summary": Stage.QUEUED.value},
                    "conditions": self._conditions(current, "Scheduled", message=(
                        f"attempt {work.attempt} accepted by {self.settings.agent}; queued behind its running jobs"))},
                    attempts=1) is False:
                raise Cancelled()
        await self._take(self._admission, work)
        work.admitted = True
        work.timings["queuedSeconds"] = round(max(0.0, time.time() - created), 3)
        # An earlier attempt's reason (why the job was requeued) does not describe this one.
        work.reported = Stage.LOADING if all(self.store.is_cached(k) for k in work.keys) else Stage.DOWNLOADING
        written = await self._write(work, lambda current: {
            **accepted, "phase": "Running", "startedAt": kube.now_rfc3339(), "stage": work.reported.value,
            "progress": self._progress(work), "timings": dict(work.timings), "attemptFailure": None,
            "reason": None, "message": None,
            "conditions": self._conditions(current, "Running", message=(
                f"attempt {work.attempt} started on {self.settings.agent}"))})
        if written is False:
            raise Cancelled()
        log.info("job %s attempt %d started (%s)", work.name, work.attempt, work.reported.value.lower(),
                 extra=self._fields(work))
        await self._event(work, "Running", f"attempt {work.attempt} started on {self.settings.agent}")
        if job.spec.output.url:  # before any download or GPU work: a bad URL fails the job once
            try:
                output.check_output_url(job.spec.output.url, self.settings.output_policy)
            except output.OutputError as exc:
                return self._failure(work, JobFailed(exc.reason, str(exc), retryable=False))
        done = asyncio.Event()
        progress = asyncio.create_task(self._report_progress(work, done))
        try:
            result, hit = await self._execute(work, job, created)
        except JobFailed as exc:
            return self._failure(work, exc)
        finally:
            done.set()
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        work.timings["totalSeconds"] = round(time.time() - created, 3)
        self.health.clear(faults.OUT_OF_MEMORY)  # a whole job loaded and ran
        done = f"image at {result['location']} ({result['bytes']} bytes, checkpoint from {hit})"
        return _Final(patch={
            "phase": "Succeeded", "cacheHit": hit, "timings": dict(work.timings), "finishedAt": kube.now_rfc3339(),
            "result": result, "progress": {"step": work.steps, "steps": work.steps, "summary": "", "downloadedBytes": None,
                         "downloadBytes": None}, "stage": None,
            "attemptFailure": None, "reason": None, "message": None,
        }, outcome="succeeded", event=("Succeeded", done), phase="Succeeded", message=done)

    def _fields(self, work: _Work) -> dict[str, Any]:
        """Structured log fields of an attempt (--log-format json)."""
        return {"job": f"{self.settings.namespace}/{work.name}", "attempt": work.attempt,
                "model": work.keys[0].rsplit("/", 1)[-1] if work.keys else ""}

    def _failure(self, work: _Work, exc: JobFailed) -> _Final:
        log.warning("job %s attempt %d failed: %s: %s", work.name, work.attempt, exc.reason, exc.message,
                    extra=self._fields(work))
        # the CRD bounds both (stoker.api.generationjob): cut to fit rather than have the write refused
        exc = JobFailed(_fit(exc.reason, 128), _fit(exc.message, 2048), retryable=exc.retryable)
        if exc.retryable or exc.reason in _MODEL_REASONS:  # the operator decides: retry elsewhere, or fail
            patch: dict[str, Any] = {"attemptFailure": {
                "attempt": work.attempt, "agent": self.settings.agent, "reason": exc.reason, "message": exc.message,
                "retryable": exc.retryable}, "timings": dict(work.timings)}
        else:
            patch = {"phase": "Failed", "reason": exc.reason, "message": exc.message, "timings": dict(work.timings),
                     "finishedAt": kube.now_rfc3339(), "stage": None,
                     "progress": {"summary": "", "downloadedBytes": None, "downloadBytes": None}}
            return _Final(patch=patch, outcome="failed", event=(exc.reason, exc.message), warning=True, phase="Failed",
                          reason=exc.reason, message=exc.message)
        return _Final(patch=patch, outcome="failed", event=(exc.reason, exc.message), warning=True)

    async def _execute(self, work: _Work, job: GenerationJob, created: float) -> tuple[dict[str, Any], str]:
        spec = job.spec
        refs = [(spec.model, ArtifactKind.CHECKPOINT, 1.0)] + [(l.name, ArtifactKind.LORA, l.weight) for l in spec.loras]
        if spec.vae:
            refs.append((spec.vae, ArtifactKind.VAE, 1.0))
        resolved = [await self._resolve(name, kind) for name, kind, _ in refs]
        sources = [source for source, _ in resolved]
        rank_hints = {source.key: rank for source, rank in resolved}
        work.model = sources[0].key
        uses_weights = getattr(self.runner, "uses_loaded_weights", True)
        was_cached = self.store.is_cached(sources[0].key)
        held = contextlib.ExitStack()  # VRAM holds; entered in worker threads, released here
        pins: list[str] = []
        try:
            t0 = time.perf_counter()
            paths = await self._unless_cancelled(work, self._fetch_all(sources, pins, rank_hints))
            work.timings["downloadSeconds"] = round(time.perf_counter() - t0, 3)
            work.reported = Stage.LOADING
            hit = self.weights.tier_of(sources[0].key, paths[0]) if was_cached and uses_weights else (
                "disk" if was_cached else "miss")
            self._check(work)
            request = _request(job, work)
            loaded: list[LoadedArtifact | None] = [None] * len(sources)
            load_s = 0.0
            if uses_weights and self._generation.locked():
                # Every slot is busy: load now, so the swap overlaps the running generation.
                load_s += await self._in_thread(work, self._stage, work, sources, paths, refs, loaded, held)
            t_wait = time.perf_counter()
            if self._generation.locked():
                work.reported = Stage.QUEUED  # files ready, waiting for a generation slot
            await self._take(self._generation, work)
            work.reported = Stage.LOADING
            try:
                work.timings["slotWaitSeconds"] = round(time.perf_counter() - t_wait, 3)
                self.metrics.queue_wait.observe(max(0.0, time.time() - created))
                self._check(work)
                work.stage = "running"
                self.on_change()
                image, more_load_s, infer_s = await self._in_thread(
                    work, self._load_and_generate, work, sources, paths, refs, loaded, held, request, uses_weights)
                load_s += more_load_s
            finally:
                self._generation.release()
        finally:
            # No worker thread uses these any more (_in_thread waits for it even when cancelled).
            held.close()
            for key in pins:
                self.store.unpin(key)
            self._leave_queue(work)
        # Building the runner's modules is a one-off per checkpoint: timed apart, kept out of the estimates.
        build_s, infer_s = split_runner_time(infer_s, getattr(image, "build_seconds", 0.0))
        self.metrics.load_seconds.observe(load_s)
        self.metrics.inference_seconds.observe(infer_s)
        self.estimates.observe(work.model, load_s=load_s, inference_s=infer_s, steps=request.steps)
        work.timings["loadSeconds"], work.timings["inferenceSeconds"] = round(load_s, 3), round(infer_s, 3)
        work.timings["buildSeconds"] = round(build_s, 3)
        self._check(work)
        if await self._current(work) is None:  # never deliver a stale attempt's image
            raise Cancelled()
        t1 = time.perf_counter()
        work.reported = Stage.UPLOADING
        delivered = await pools.run_in(self.threads.uploads, self._deliver, job, work, image.png)
        work.timings["uploadSeconds"] = round(time.perf_counter() - t1, 3)
        return {"location": delivered.location, "sha256": delivered.sha256, "bytes": delivered.size_bytes,
                "contentType": delivered.content_type, "seed": request.seed}, hit

    def _stage(self, work: _Work, sources: list[ModelSource], paths: list[pathlib.Path],
               refs: list[tuple[str, ArtifactKind, float]], loaded: list[LoadedArtifact | None],
               held: contextlib.ExitStack) -> float:
        """While waiting for a slot: into VRAM what fits without evicting a model in use, the rest
        into the RAM tier. Best effort (the slot loads whatever is missing); returns the seconds spent."""
        t0 = time.perf_counter()
        for i, (source, path, (name, kind, weight)) in enumerate(zip(sources, paths, refs, strict=True)):
            if work.cancel.is_set():
                break
            try:
                if self.weights.tier_of(source.key, path) != "vram" and not self._fits_in_vram(path):
                    self.weights.stage(source.key, path)
                    log.info("staged %s off the GPU for job %s while it waits for a slot", source.key, work.name)
                    continue
                model, tier = held.enter_context(self.weights.use(source.key, path))
            except Exception as exc:  # noqa: BLE001 - staging is an optimisation; the slot reports errors
                log.info("could not stage %s for job %s ahead of its slot: %s", source.key, work.name, exc)
                continue
            if tier != "vram":
                log.info("loaded %s into VRAM for job %s while it waits for a slot", source.key, work.name)
            loaded[i] = self._artifact(source, path, name, kind, weight, model.tensors)
        return time.perf_counter() - t0

    def _fits_in_vram(self, path: pathlib.Path) -> bool:
        snap = self.weights.vram.snapshot()
        idle = sum(e.size_bytes for e in snap.entries if e.in_use == 0)
        return safetensors_header.read_header(path).data_size_bytes <= snap.free_bytes + idle

    def _artifact(self, source: ModelSource, path: pathlib.Path, name: str, kind: ArtifactKind, weight: float,
                  tensors: Any) -> LoadedArtifact:
        sha = source.sha256 or source.digest
        self.artifact_sha[source.key] = sha
        return LoadedArtifact(name=name, kind=kind, tensors=tensors, sha256=sha, weight=weight, path=path)

    def _load_and_generate(self, work: _Work, sources: list[ModelSource], paths: list[pathlib.Path],
                           refs: list[tuple[str, ArtifactKind, float]], loaded: list[LoadedArtifact | None],
                           held: contextlib.ExitStack, request: GenerationRequest,
                           uses_weights: bool) -> tuple[Any, float, float]:
        t0 = time.perf_counter()
        for i, (source, path, (name, kind, weight)) in enumerate(zip(sources, paths, refs, strict=True)):
            if loaded[i] is not None:
                continue
            self._check(work)
            tensors: Any = {}
            if uses_weights:
                try:
                    model, _tier = held.enter_context(self.weights.use(source.key, path))
                except Exception as exc:
                    failure = _as_job_failure(exc)
                    if isinstance(failure, JobFailed) and failure.reason in faults.LOCAL_FAULT_REASONS:
                        self.health.fault(failure.reason, failure.message)
                    raise failure from exc
                tensors = model.tensors
            loaded[i] = self._artifact(source, path, name, kind, weight, tensors)
        load_s = time.perf_counter() - t0
        work.timings["loadSeconds"] = round(load_s, 3)
        self._check(work)
        ckpt, rest = loaded[0], [a for a in loaded[1:] if a is not None]
        assert ckpt is not None
        t1 = time.perf_counter()
        try:
            image = self.runner.generate(
                checkpoint=ckpt, loras=[a for a in rest if a.kind == ArtifactKind.LORA],
                vae=next((a for a in rest if a.kind == ArtifactKind.VAE), None), request=request,
                on_step=lambda i, n: _set_progress(work, i, n), should_cancel=work.cancel.is_set)
        except RunnerError as exc:
            if str(exc.reason) == "Cancelled":
                raise Cancelled() from exc
            raise JobFailed(str(exc.reason), exc.message, retryable=exc.retryable) from exc
        return image, load_s, time.perf_counter() - t1

    def _deliver(self, job: GenerationJob, work: _Work, png: bytes) -> output.OutputResult:
        try:
            if job.spec.output.url:
                return output.put_image(job.spec.output.url, png, output_policy=self.settings.output_policy)
            if self.results_store is not None:
                return self.results_store.put(png, namespace=self.settings.namespace, name=work.name,
                                              attempt=work.attempt)
            written = output.write_result(self.settings.results_dir, png, namespace=self.settings.namespace,
                                          name=work.name, attempt=work.attempt, job_uid=work.uid or None)
            results_dir.clean(self.settings.results_dir, max_bytes=self.settings.results_max_bytes,
                              max_age_s=self.settings.results_max_age_s)
            return written
        except output.OutputError as exc:
            raise JobFailed(exc.reason, str(exc), retryable=exc.retryable) from exc

    # ---- models

    async def _resolve(self, name: str, kind: ArtifactKind) -> tuple[ModelSource, float | None]:
        """The ModelCache `name` as a download source, with its fleet-wide use rank (status.useRank,
        the rank a copy downloaded here starts from); waits a short grace for it to appear."""
        deadline = time.monotonic() + self.settings.model_not_found_grace_s
        waiting_logged = False
        while True:
            try:
                obj = await self._api_retrying(self.objects.get, "ModelCache", name, what=f"reading ModelCache {name}")
                break
            except ApiException as exc:
                if not kube.is_not_found(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise JobFailed("ModelNotFound", f"ModelCache {self.settings.namespace}/{name} does not exist: "
                                    f"create it (kubectl apply) or fix the job's model name", retryable=False) from None
                if not waiting_logged:
                    log.info("waiting up to %.0fs for ModelCache %s/%s to appear", self.settings.model_not_found_grace_s,
                             self.settings.namespace, name)
                    waiting_logged = True
                await self._sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        mc = ModelCache.model_validate(obj)
        if str(mc.spec.kind) != str(kind):
            raise JobFailed("InvalidModelKind", f"ModelCache {name} is a {mc.spec.kind}, but the job uses it as a {kind}",
                            retryable=False)
        key = f"{self.objects.namespace}/{mc.name}"
        self._model_identity[key] = (mc.metadata.get("uid"), mc.metadata.get("generation"))
        try:
            source = await asyncio.to_thread(model_source, self.objects, mc)
        except JobFailed as exc:
            if not exc.retryable:  # the ModelCache itself is unusable here (its credential): say so on it
                self._record_model_failure(key, exc.reason, exc.message)
            raise
        return source, use_rank(mc)

    def _record_model_failure(self, key: str, reason: str, message: str, *, retryable: bool = False,
                              size_bytes: int | None = None) -> None:
        uid, generation = self._model_identity.get(key, (None, None))
        self.model_failures[key] = ModelFailure(
            name=key.rsplit("/", 1)[-1], reason=reason, message=message, retryable=retryable,
            at=kube.now_rfc3339(), uid=uid, generation=generation, size_bytes=size_bytes)
        self.on_change()

    async def _unless_cancelled(self, work: _Work, step: Awaitable[T]) -> T:
        """Await `step`, or stop it and raise Cancelled when the attempt is cancelled first (the job
        was deleted or rebound): its downloads stop unless someone else waits for them, and its
        admission slot is given back at once."""
        task = asyncio.ensure_future(step)
        cancelled = asyncio.ensure_future(work.cancelled.wait())
        try:
            await asyncio.wait({task, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled() or work.cancel.is_set():
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the cancellation is what the caller reports
            raise Cancelled()
        return task.result()

    async def _fetch_all(self, sources: list[ModelSource], pins: list[str],
                         rank_hints: dict[str, float | None]) -> list[pathlib.Path]:
        """Every file on disk, each pinned the moment its fetch returns (a later download cannot evict it)."""
        tasks = [asyncio.create_task(self._fetch(s, pins, rank_hints.get(s.key))) for s in sources]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, source: ModelSource, pins: list[str], rank_hint_s: float | None) -> pathlib.Path:
        try:
            path = await self.store.ensure(source, priority=Priority.JOB, rank_hint_s=rank_hint_s)
        except DiskStoreError as exc:
            if not exc.retryable or exc.size_bytes is not None:  # bad sources, and sizes no budget here holds
                self._record_model_failure(source.key, exc.reason, exc.message, retryable=exc.retryable,
                                           size_bytes=exc.size_bytes)
            raise JobFailed(exc.reason, exc.message, retryable=exc.retryable) from exc
        self.store.pin(source.key)  # no await since ensure returned: nothing evicted it in between
        pins.append(source.key)
        if self.model_failures.pop(source.key, None) is not None:
            self.on_change()
        return path

    # ---- slots and worker threads

    async def _take(self, slots: asyncio.Semaphore, work: _Work) -> None:
        """Acquire one of `slots`; if the attempt is cancelled first, raise Cancelled holding nothing."""
        self._check(work)
        acquire = asyncio.ensure_future(slots.acquire())
        cancelled = asyncio.ensure_future(work.cancelled.wait())
        try:
            await asyncio.wait({acquire, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await _give_back(slots, acquire)
            raise
        finally:
            cancelled.cancel()
        if work.cancel.is_set():
            await _give_back(slots, acquire)
            raise Cancelled()

    def _leave_queue(self, work: _Work) -> None:
        if work.admitted:
            work.admitted = False
            self._admission.release()

    async def _in_thread(self, work: _Work, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread. When the caller is cancelled (the agent stopping past
        its grace), the attempt is cancelled and the thread awaited (it stops between steps)
        before the cancellation goes on, so the caller's cleanup of VRAM holds and pins never
        races a thread still using them."""
        thread = asyncio.ensure_future(pools.run_in(self.threads.compute, fn, *args))
        try:
            return await asyncio.shield(thread)
        except asyncio.CancelledError:
            work.cancel_attempt()
            while not thread.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({thread})
            if not thread.cancelled():
                thread.exception()  # retrieved: the cancellation is what the caller reports
            raise

    # ---- status writes

    def _check(self, work: _Work) -> None:
        if work.cancel.is_set():
            raise Cancelled()

    def _is_current(self, work: _Work, obj: dict[str, Any]) -> bool:
        """Whether `obj` is still the job and attempt `work` runs (not rebound, not a new job of the same name)."""
        return bound_attempt(obj, self.settings.agent) == work.attempt and _uid(obj) == work.uid

    def _progress(self, work: _Work) -> dict[str, Any]:
        """status.progress of the attempt now: steps, the bytes of its downloads, and a summary."""
        # (null clears a field the merge patch would otherwise keep from an earlier stage)
        progress: dict[str, Any] = {"step": work.step, "steps": work.steps, "downloadedBytes": None, "downloadBytes": None}
        stage = work.reported
        summary = stage.value
        if stage is Stage.DOWNLOADING:
            flights = [d for d in self.store.snapshot().downloads if d.key in work.keys]
            done_bytes = sum(d.bytes_done for d in flights)
            progress["downloadedBytes"] = done_bytes
            if flights and all(d.total_bytes for d in flights):
                total = sum(d.total_bytes or 0 for d in flights)
                progress["downloadBytes"] = total
                summary = f"{stage.value} {min(100, int(100 * done_bytes / max(1, total)))}%"
        elif stage is Stage.GENERATING:
            summary = f"{stage.value} {work.step}/{work.steps}"
        progress["summary"] = summary
        return progress

    def _conditions(self, current: dict[str, Any], phase: str, *, reason: str | None = None,
                    message: str | None = None) -> list[dict[str, Any]]:
        """The whole conditions list for `phase`, from the object as read for this write."""
        status = current.get("status") or {}
        return job_conditions(status.get("conditions") or [], phase=phase, now=kube.now_rfc3339(),
                              generation=(current.get("metadata") or {}).get("generation"), reason=reason,
                              message=message)

    async def _report_progress(self, work: _Work, done: asyncio.Event) -> None:
        """Publish the stage, progress and the timings known so far until `done`, at most once per
        `progress_interval_s` and only when they changed; never raises."""
        last: tuple[Any, ...] = ()
        while not done.is_set():
            await self._sleep(self.settings.progress_interval_s)
            if done.is_set():
                return
            progress = self._progress(work)
            now = (work.reported, progress["summary"], tuple(sorted(work.timings.items())))
            if now == last:
                continue
            try:
                if await self._write(work, {"stage": work.reported.value, "progress": progress,
                                            "timings": dict(work.timings)}, attempts=1) is not None:
                    last = now
            except Exception as exc:  # progress is best effort; the final write is not
                log.debug("progress of job %s not written: %s", work.name, _describe(exc))

    async def _current(self, work: _Work) -> dict[str, Any] | None:
        """The job while it is still bound to this attempt, else None (and the attempt is cancelled).
        Retries through API server outages."""
        delay = self.settings.write_backoff_s
        while True:
            try:
                obj = await self._api(self.objects.get, "GenerationJob", work.name)
            except Exception as exc:
                if kube.is_not_found(exc):
                    work.cancel_attempt()
                    return None
                log.warning("cannot read job %s to check its binding (%s); retrying in %.1fs", work.name,
                            _describe(exc), delay)
                await self._sleep(delay)
                delay = min(self.settings.write_max_backoff_s, delay * 2)
                continue
            if not self._is_current(work, obj):
                work.cancel_attempt()
                return None
            return obj

    async def _write(self, work: _Work, status: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]], *,
                     attempts: int | None = 3) -> bool | None:
        """Patch the job's status if it is still bound to this attempt. `status` may be a function
        of the job as read for the write (conditions are computed from the list on it).

        True: written. False: the job is gone or bound to another attempt (the attempt is
        cancelled). None: the API server failed `attempts` times (transient errors are
        retried with backoff; `attempts=None` retries until it answers). Raises
        ApiException when the server refuses the patch itself (400, 422).
        """
        failures = conflicts = 0
        delay = self.settings.write_backoff_s
        while True:
            try:
                obj = await self._api(self.objects.get, "GenerationJob", work.name)
                if not self._is_current(work, obj):
                    work.cancel_attempt()
                    log.info("job %s attempt %d no longer current; not writing its status", work.name, work.attempt)
                    return False
                body = status(obj) if callable(status) else status
                work.written = await self._api(self.objects.patch_status, "GenerationJob", work.name,
                                               ordered_times(body, obj.get("status") or {}),
                                               resource_version=obj["metadata"]["resourceVersion"])
                return True
            except Exception as exc:
                if kube.is_not_found(exc):
                    work.cancel_attempt()
                    return False
                if isinstance(exc, ApiException) and exc.status in (400, 422):
                    raise
                if kube.is_conflict(exc) and conflicts < 5:
                    conflicts += 1  # someone wrote in between: read again at once
                    continue
                conflicts = 0
                failures += 1
                if attempts is not None and failures >= attempts:
                    return None
                log.warning("status write of job %s attempt %d failed (%s); retrying in %.1fs", work.name,
                            work.attempt, _describe(exc), delay)
                await self._sleep(delay)
                delay = min(self.settings.write_max_backoff_s, delay * 2)

    async def _write_final(self, work: _Work, final: _Final) -> bool:
        """Write how the attempt ended, retrying until written or no longer current; True when written."""
        patch: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]] = final.patch
        if final.phase is not None:
            phase, reason, message = final.phase, final.reason, final.message
            patch = lambda current: {**final.patch, "conditions": self._conditions(  # noqa: E731
                current, phase, reason=reason, message=message)}
        try:
            written = await self._write(work, patch, attempts=None)
        except ApiException as exc:  # the patch itself is refused: report that instead, so nothing hangs
            log.error("the API server refused the final status of job %s (%s); reporting the refusal", work.name,
                      _describe(exc))
            patch = {"attemptFailure": {"attempt": work.attempt, "agent": self.settings.agent, "reason": "StatusRejected",
                                        "message": f"the API server refused this attempt's status: {_describe(exc)}"[:1000],
                                        "retryable": True}}
            try:
                written = await self._write(work, patch, attempts=None)
            except ApiException as again:
                log.error("the API server refused even the failure report of job %s (%s)", work.name, _describe(again))
                return False
        if written and final.event is not None:
            await self._event(work, *final.event, warning=final.warning)
        return bool(written)

    async def _event(self, work: _Work, reason: str, message: str, *, warning: bool = False) -> None:
        """An Event on the job as last written (best effort: a lost event never fails the attempt)."""
        if work.written is None:
            return
        try:
            await self._api(self.objects.event, work.written, reason=reason, message=message,
                            warning=warning, component=f"stoker-agent/{self.settings.agent}")
        except Exception as exc:
            log.info("event for job %s not recorded: %s", work.name, _describe(exc))

    # ---- API calls

    async def _api(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in a worker thread, bounded by the API timeout (a hung connection counts as failed)."""
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that races completion.
        call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            done, _ = await asyncio.wait({call}, timeout=self.settings.api_timeout_s)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if not done:
            call.cancel()
            raise TimeoutError(f"no answer from the API server within {self.settings.api_timeout_s:.0f}s")
        return call.result()

    async def _api_retrying(self, fn: Callable[..., T], *args: Any, what: str, attempts: int = 5, **kwargs: Any) -> T:
        """`_api`, retrying transient failures a few times; then a retryable JobFailed."""
        delay = self.settings.write_backoff_s
        for attempt in range(1, attempts + 1):
            try:
                return await self._api(fn, *args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == attempts:
                    raise JobFailed("APIUnavailable", f"{what} failed {attempts} times ({_describe(exc)}); the API "
                                    "server may be overloaded", retryable=True) from None
                log.warning("%s failed (%s); retrying in %.1fs", what, _describe(exc), delay)
                await self._sleep(delay)
                delay = min(self.settings.write_max_backoff_s, delay * 2)
        raise AssertionError("unreachable")


_MODEL_REASONS = {"ChecksumMismatch", "HTTPNotFound", "HTTPForbidden", "InvalidHeader", "PickleRefused", "SizeMismatch"}


def ordered_times(status: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """`status` with startedAt and finishedAt never before the job's scheduledAt (the operator's clock may
    run ahead of this host's, or its write may land first): times in a job's status stay ordered. Pure."""
    scheduled = current.get("scheduledAt")
    if not scheduled:
        return status
    out = dict(status)
    for field in ("startedAt", "finishedAt"):
        value = out.get(field)
        if value and kube.parse_rfc3339(value) < kube.parse_rfc3339(scheduled):
            out[field] = scheduled
    started = out.get("startedAt") or current.get("startedAt")
    if out.get("finishedAt") and started and kube.parse_rfc3339(out["finishedAt"]) < kube.parse_rfc3339(started):
        out["finishedAt"] = started
    return out


is_transient = kube.is_transient


async def _give_back(slots: asyncio.Semaphore, acquire: asyncio.Future[Any]) -> None:
    """Stop waiting for `slots`, releasing the slot if the wait had already got it."""
    acquire.cancel()
    try:
        await acquire
    except asyncio.CancelledError:
        return  # it had not: Semaphore.acquire gives back a wake-up it could not take
    slots.release()


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _uid(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:300]


def _request(job: GenerationJob, work: _Work) -> GenerationRequest:
    params = job.spec.params
    seed = params.seed if params.seed is not None else seed_for(str(job.metadata.get("uid") or work.name))
    return GenerationRequest(
        prompt=params.prompt, negative_prompt=params.negative_prompt, steps=params.steps, cfg_scale=params.cfg_scale,
        width=params.width, height=params.height, seed=seed, sampler=str(params.sampler),
        scheduler=str(params.scheduler), batch_size=params.batch_size)


def seed_for(uid: str) -> int:
    """The seed of a job without one: from its uid, so every attempt makes the same image. Pure."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:4], "big")


def _set_progress(work: _Work, step: int, steps: int) -> None:
    work.step, work.steps = step, steps
    if work.reported is not Stage.UPLOADING:
        work.reported = Stage.GENERATING


def _as_job_failure(exc: Exception) -> Exception:
    """A load failure as the attempt's failure: capacity (retryable), a bad file (not), or a local
    fault of this agent's disk or memory (retryable elsewhere, see `stoker.agent.faults`)."""
    kind = type(exc).__name__
    if kind in ("InsufficientCache", "DeviceOutOfMemory", "OutOfMemoryError"):
        return JobFailed("InsufficientVRAM", str(exc), retryable=True)
    if kind == "HeaderError":
        return JobFailed("InvalidHeader", str(exc), retryable=False)
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return JobFailed("InsufficientVRAM", str(exc), retryable=True)
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc).lower():  # torch's host allocator
        return JobFailed(faults.OUT_OF_MEMORY, f"{exc}; a fault of this agent, not of the model: "
                         f"{faults.advice(faults.OUT_OF_MEMORY)}"[:2000], retryable=True)
    cause = exc if isinstance(exc, (OSError, MemoryError)) else exc.__cause__
    local = faults.classify(cause) if isinstance(cause, (OSError, MemoryError)) else None
    if local is not None:
        return JobFailed(local, f"{exc}; a fault of this agent, not of the model: {faults.advice(local)}"[:2000],
                         retryable=True)
    return exc


def use_rank(mc: ModelCache) -> float | None:
    """The model's fleet-wide use rank as the operator published it (None before it does)."""
    return mc.status.use_rank if mc.status is not None else None


def model_source(objects: kube.Objects, mc: ModelCache, *, resolver: Any = None) -> ModelSource:
    """Map a ModelCache onto the disk tier's source, with the credential its secretRef names
    (looked up by `stoker.agent.credentials`: mounted file, environment, or an allowed API read)."""
    from stoker.agent import credentials as model_credentials

    src = mc.spec.source
    credentials = None
    if src.secret_ref is not None:
        try:
            credentials = (resolver or model_credentials.default_resolver()).lookup(objects, mc.name, src.secret_ref,
                                                                                     src.url)
        except model_credentials.CredentialLookupError as exc:
            raise JobFailed(exc.reason, exc.message, retryable=exc.retryable) from None
    return ModelSource(key=f"{objects.namespace}/{mc.name}", url=src.url, sha256=src.sha256, size_bytes=src.size_bytes,
                       format=str(mc.spec.format), allow_pickle=mc.spec.allow_pickle, credentials=credentials,
                       model_uid=str(mc.metadata.get("uid") or "") or None,
                       published_sha256=mc.status.sha256 if mc.status is not None else None)
