"""The job loop: run the GenerationJobs bound to this agent, report what happened (I/O).

Every status write is guarded: it carries the resourceVersion it was computed from and
happens only while the job's label and attempt annotation still name this agent and
attempt (stoker.api.protocol.bound_attempt). A job that is deleted or rebound is
cancelled between denoising steps and its result is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from stoker import kube
from stoker.agent import output
from stoker.agent.disk_store import DiskStore, DiskStoreError, ModelSource, Priority
from stoker.agent.download import Credentials
from stoker.agent.job_metrics import JobMetrics
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact, Runner, RunnerError
from stoker.agent.weights import Weights
from stoker.api.base import AGENT_LABEL
from stoker.api.cacheagent import ModelFailure, RunningJob
from stoker.api.generationjob import GenerationJob
from stoker.api.modelcache import ModelCache
from stoker.api.protocol import bound_attempt

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The attempt failed. Not retryable: the job fails. Retryable: the operator decides."""

    def __init__(self, reason: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable


class Cancelled(Exception):
    """The job was deleted or is no longer bound to this attempt."""


@dataclasses.dataclass
class _Work:
    name: str
    attempt: int
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    step: int = 0
    steps: int = 0
    expected_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class JobSettings:
    agent: str
    namespace: str
    slots: int = 1
    results_dir: pathlib.Path = pathlib.Path("results")
    model_not_found_grace_s: float = 10.0
    progress_interval_s: float = 1.0


class JobWorker:
    """Watches this agent's jobs (server-side label selector) and runs each bound attempt."""

    def __init__(self, *, objects: kube.Objects, settings: JobSettings, store: DiskStore, weights: Weights,
                 runner: Runner, metrics: JobMetrics, on_change: Callable[[], None]) -> None:
        self.objects, self.settings = objects, settings
        self.store, self.weights, self.runner, self.metrics = store, weights, runner, metrics
        self.on_change = on_change
        self.work: dict[str, _Work] = {}
        self.model_failures: dict[str, ModelFailure] = {}
        self.artifact_sha: dict[str, str] = {}
        """Cache key -> content identity the runner keys its built modules by."""
        self._slots = asyncio.Semaphore(settings.slots)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- what the status report needs

    def running(self) -> list[RunningJob]:
        return [RunningJob(name=w.name, attempt=w.attempt,
                           expected_remaining_seconds=round(w.expected_s * (1 - w.step / w.steps), 2) if w.steps else w.expected_s)
                for w in sorted(self.work.values(), key=lambda w: w.name)]

    # ---- watching

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        thread_stop = threading.Event()
        selector = f"{AGENT_LABEL}={self.settings.agent}"
        watcher = asyncio.create_task(asyncio.to_thread(
            kube.stream_events, self.objects.custom.list_namespaced_custom_object, stop=thread_stop,
            on_event=self._on_event_threadsafe, group="stoker.dev", version="v1alpha1",
            namespace=self.settings.namespace, plural="generationjobs", label_selector=selector))
        await stop.wait()
        thread_stop.set()
        for w in self.work.values():
            w.cancel.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watcher, timeout=35)

    def _on_event_threadsafe(self, kind: str, obj: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_event, kind, obj)

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        current = self.work.get(name)
        if kind != "DELETED" and obj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            # Our own final write coming back, or the operator ended the job (deadline).
            if current is not None:
                current.cancel.set()
            return
        attempt = None if kind == "DELETED" else bound_attempt(obj, self.settings.agent)
        if current is not None and current.attempt != attempt:
            log.info("job %s attempt %d is no longer ours; cancelling", name, current.attempt)
            current.cancel.set()
            return
        if attempt is None or current is not None:
            return
        work = _Work(name=name, attempt=attempt)
        self.work[name] = work
        task = asyncio.create_task(self._run(work, obj))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.on_change()

    # ---- one attempt

    async def _run(self, work: _Work, obj: dict[str, Any]) -> None:
        t_start = time.time()
        timings: dict[str, float] = {}
        try:
            job = GenerationJob.model_validate(obj)
            created = kube.parse_rfc3339(obj["metadata"]["creationTimestamp"]).timestamp()
            timings["queuedSeconds"] = round(max(0.0, t_start - created), 3)
            self.metrics.queue_wait.observe(timings["queuedSeconds"])
            if not await self._write(work, {"phase": "Running", "agent": self.settings.agent, "attempt": work.attempt,
                                            "startedAt": kube.now_rfc3339(), "progress": {"step": 0, "steps": job.spec.params.steps},
                                            "attemptFailure": None}):
                return
            result, hit = await self._execute(work, job, timings)
            timings["totalSeconds"] = round(time.time() - created, 3)
            await self._write(work, {
                "phase": "Succeeded", "cacheHit": hit, "timings": timings, "finishedAt": kube.now_rfc3339(),
                "result": result, "progress": {"step": work.steps, "steps": work.steps},
            }, final=True, event=("Succeeded", f"image at {result['location']} ({result['bytes']} bytes, checkpoint from {hit})"))
            self.metrics.jobs.labels("succeeded").inc()
        except Cancelled:
            log.info("job %s attempt %d cancelled", work.name, work.attempt)
            self.metrics.jobs.labels("cancelled").inc()
        except JobFailed as exc:
            log.warning("job %s attempt %d failed: %s: %s", work.name, work.attempt, exc.reason, exc.message)
            self.metrics.jobs.labels("failed").inc()
            if exc.retryable or exc.reason in _MODEL_REASONS:
                patch = {"attemptFailure": {"attempt": work.attempt, "agent": self.settings.agent, "reason": exc.reason,
                                            "message": exc.message, "retryable": exc.retryable}, "timings": timings}
            else:
                patch = {"phase": "Failed", "reason": exc.reason, "message": exc.message, "timings": timings,
                         "finishedAt": kube.now_rfc3339()}
            await self._write(work, patch, final=True, event=(exc.reason, exc.message), warning=True)
        except Exception as exc:  # never leave a job stuck Running on a live agent
            log.exception("job %s attempt %d crashed", work.name, work.attempt)
            self.metrics.jobs.labels("failed").inc()
            await self._write(work, {"attemptFailure": {
                "attempt": work.attempt, "agent": self.settings.agent, "reason": "AgentError",
                "message": f"{type(exc).__name__}: {exc}"[:2000], "retryable": True}}, final=True)
        finally:
            self.work.pop(work.name, None)
            self.on_change()

    async def _execute(self, work: _Work, job: GenerationJob, timings: dict[str, float]) -> tuple[dict[str, Any], str]:
        spec = job.spec
        refs = [(spec.model, ArtifactKind.CHECKPOINT, 1.0)] + [(l.name, ArtifactKind.LORA, l.weight) for l in spec.loras]
        if spec.vae:
            refs.append((spec.vae, ArtifactKind.VAE, 1.0))
        sources = [await self._resolve(name, kind) for name, kind, _ in refs]
        was_cached = self.store.is_cached(sources[0].key)
        t0 = time.perf_counter()
        paths = await asyncio.gather(*(self._fetch(s) for s in sources))
        timings["downloadSeconds"] = round(time.perf_counter() - t0, 3)
        self._check(work)
        params = spec.params
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        request = GenerationRequest(
            prompt=params.prompt, negative_prompt=params.negative_prompt, steps=params.steps, cfg_scale=params.cfg_scale,
            width=params.width, height=params.height, seed=seed, sampler=str(params.sampler),
            scheduler=str(params.scheduler), batch_size=params.batch_size)
        work.steps = params.steps
        async with self._slots:
            self._check(work)
            for s in sources:
                self.store.pin(s.key)
            try:
                progress = asyncio.create_task(self._report_progress(work))
                try:
                    image, hit, load_s, infer_s = await asyncio.to_thread(
                        self._load_and_generate, work, sources, paths, refs, request)
                finally:
                    progress.cancel()
            finally:
                for s in sources:
                    self.store.unpin(s.key)
        hit = hit if hit != "disk" or was_cached else "miss"
        self.metrics.tier_hits.labels(hit).inc()
        self.metrics.load_seconds.observe(load_s)
        self.metrics.inference_seconds.observe(infer_s)
        timings["loadSeconds"], timings["inferenceSeconds"] = round(load_s, 3), round(infer_s, 3)
        self._check(work)
        t1 = time.perf_counter()
        delivered = await asyncio.to_thread(self._deliver, job, work, image.png)
        timings["uploadSeconds"] = round(time.perf_counter() - t1, 3)
        return {"location": delivered.location, "sha256": delivered.sha256, "bytes": delivered.size_bytes,
                "contentType": delivered.content_type, "seed": seed}, hit

    def _load_and_generate(self, work: _Work, sources: list[ModelSource], paths: list[pathlib.Path],
                           refs: list[tuple[str, ArtifactKind, float]], request: GenerationRequest) -> tuple[Any, str, float, float]:
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            loaded = []
            hit = "disk"
            for i, (source, path, (name, kind, weight)) in enumerate(zip(sources, paths, refs)):
                try:
                    model, tier = stack.enter_context(self.weights.use(source.key, path))
                except Exception as exc:
                    raise _as_job_failure(exc) from exc
                if i == 0:
                    hit = tier
                self.artifact_sha[source.key] = source.sha256 or source.digest
                loaded.append(LoadedArtifact(name=name, kind=kind, tensors=model.tensors,
                                             sha256=source.sha256 or source.digest, weight=weight, path=path))
            load_s = time.perf_counter() - t0
            self._check(work)
            ckpt, rest = loaded[0], loaded[1:]
            t1 = time.perf_counter()
            try:
                image = self.runner.generate(
                    checkpoint=ckpt, loras=[a for a in rest if a.kind == ArtifactKind.LORA],
                    vae=next((a for a in rest if a.kind == ArtifactKind.VAE), None), request=request,
                    on_step=lambda i, n: _set_progress(work, i, n), should_cancel=work.cancel.is_set)
            except RunnerError as exc:
                if str(exc.reason) == "Cancelled":
                    raise Cancelled() from exc
                raise JobFailed(str(exc.reason), str(exc), retryable=str(exc.reason) == "InsufficientVRAM") from exc
            infer_s = time.perf_counter() - t1
            work.expected_s = 0.8 * work.expected_s + 0.2 * (load_s + infer_s)
            return image, hit, load_s, infer_s

    def _deliver(self, job: GenerationJob, work: _Work, png: bytes) -> output.OutputResult:
        try:
            if job.spec.output.url:
                return output.put_image(job.spec.output.url, png)
            return output.write_result(self.settings.results_dir, png, namespace=self.settings.namespace,
                                       name=work.name, attempt=work.attempt)
        except output.OutputError as exc:
            raise JobFailed("OutputFailed", str(exc), retryable=exc.retryable) from exc

    # ---- models

    async def _resolve(self, name: str, kind: ArtifactKind) -> ModelSource:
        """The ModelCache `name` as a download source; waits a short grace for it to appear."""
        deadline = time.monotonic() + self.settings.model_not_found_grace_s
        while True:
            try:
                obj = await asyncio.to_thread(self.objects.get, "ModelCache", name)
                break
            except Exception as exc:
                if not kube.is_not_found(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise JobFailed("ModelNotFound", f"ModelCache {self.settings.namespace}/{name} does not exist: "
                                    f"create it (kubectl apply) or fix the job's model name", retryable=False) from None
                await asyncio.sleep(1.0)
        mc = ModelCache.model_validate(obj)
        if str(mc.spec.kind) != str(kind):
            raise JobFailed("InvalidModelKind", f"ModelCache {name} is a {mc.spec.kind}, but the job uses it as a {kind}",
                            retryable=False)
        return await asyncio.to_thread(model_source, self.objects, mc)

    async def _fetch(self, source: ModelSource) -> pathlib.Path:
        try:
            path = await self.store.ensure(source, priority=Priority.JOB)
        except DiskStoreError as exc:
            if not exc.retryable:
                self.model_failures[source.key] = ModelFailure(
                    name=source.key.rsplit("/", 1)[-1], reason=exc.reason, message=exc.message, retryable=False,
                    at=kube.now_rfc3339())
                self.on_change()
            raise JobFailed(exc.reason, exc.message, retryable=exc.retryable) from exc
        self.model_failures.pop(source.key, None)
        return path

    # ---- status writes

    def _check(self, work: _Work) -> None:
        if work.cancel.is_set():
            raise Cancelled()

    async def _report_progress(self, work: _Work) -> None:
        last = -1
        while True:
            await asyncio.sleep(self.settings.progress_interval_s)
            if work.step != last:
                last = work.step
                await self._write(work, {"progress": {"step": work.step, "steps": work.steps}})

    async def _write(self, work: _Work, status: dict[str, Any], *, final: bool = False,
                     event: tuple[str, str] | None = None, warning: bool = False) -> bool:
        """Patch the job's status if it is still bound to this attempt; False otherwise."""
        for _ in range(8):
            try:
                obj = await asyncio.to_thread(self.objects.get, "GenerationJob", work.name)
            except Exception as exc:
                if kube.is_not_found(exc):
                    work.cancel.set()
                    return False
                raise
            if bound_attempt(obj, self.settings.agent) != work.attempt:
                work.cancel.set()
                log.info("job %s attempt %d no longer current; not writing %s", work.name, work.attempt, sorted(status))
                return False
            try:
                await asyncio.to_thread(self.objects.patch_status, "GenerationJob", work.name, status,
                                        resource_version=obj["metadata"]["resourceVersion"])
            except Exception as exc:
                if kube.is_conflict(exc):
                    continue
                raise
            if event is not None:
                await asyncio.to_thread(self.objects.event, obj, reason=event[0], message=event[1], warning=warning,
                                        component=f"stoker-agent/{self.settings.agent}")
            return True
        if final:
            log.warning("gave up writing status of job %s after repeated conflicts", work.name)
        return False


_MODEL_REASONS = {"ChecksumMismatch", "HTTPNotFound", "HTTPForbidden", "InvalidHeader", "PickleRefused", "SizeMismatch"}


def _set_progress(work: _Work, step: int, steps: int) -> None:
    work.step, work.steps = step, steps


def _as_job_failure(exc: Exception) -> Exception:
    kind = type(exc).__name__
    if kind == "InsufficientCache":
        return JobFailed("InsufficientVRAM", str(exc), retryable=True)
    if kind == "HeaderError":
        return JobFailed("InvalidHeader", str(exc), retryable=False)
    if isinstance(exc, (RuntimeError,)) and "out of memory" in str(exc).lower():
        return JobFailed("InsufficientVRAM", str(exc), retryable=True)
    return exc


def model_source(objects: kube.Objects, mc: ModelCache) -> ModelSource:
    """Map a ModelCache onto the disk tier's source, reading its credential Secret."""
    src = mc.spec.source
    credentials = None
    if src.secret_ref is not None:
        ref = src.secret_ref
        try:
            secret = objects.core.read_namespaced_secret(ref.name, objects.namespace)
        except Exception as exc:
            raise JobFailed("SecretNotFound", f"cannot read Secret {objects.namespace}/{ref.name} named by ModelCache "
                            f"{mc.name}: create it, and list it in the chart's agent.credentialSecrets", retryable=False) from exc
        import base64

        raw = (secret.data or {}).get(ref.key)
        if raw is None:
            raise JobFailed("SecretKeyMissing", f"Secret {objects.namespace}/{ref.name} has no key {ref.key!r} "
                            f"(named by ModelCache {mc.name})", retryable=False)
        credentials = Credentials.for_header(ref.header, base64.b64decode(raw).decode())
    return ModelSource(key=f"{objects.namespace}/{mc.name}", url=src.url, sha256=src.sha256, size_bytes=src.size_bytes,
                       format=str(mc.spec.format), allow_pickle=mc.spec.allow_pickle, credentials=credentials)
