"""The job loop on its own: real weights tiers and loader, an in-memory API server and disk store.

The fakes stand in only for I/O the loop does not own (the API server, downloads, the
pipeline); what is checked is the loop's protocol: which status it writes, when it pins,
stages and delivers, and that a live agent never leaves a job Running.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import itertools
import pathlib
import threading
import types
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from PIL import Image
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from stoker import kube
from stoker.agent import jobs
from stoker.agent.job_metrics import JobMetrics
from stoker.agent.loader import Loader
from stoker.agent.runner import base
from stoker.agent.runner.base import GenerationRequest, LoadedArtifact, Reason, RunnerError
from stoker.agent.weights import Weights
from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION

AGENT = "agent-0"
NS = "ns"
MiB = 2**20

pytestmark = pytest.mark.timeout(120)


# ---- fakes of the I/O around the loop ---------------------------------------------------


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeObjects:
    """The slice of `kube.Objects` the loop uses, over dicts, with scheduled failures."""

    namespace = NS

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str]] = []
        self._versions = itertools.count(1)
        self._failures: list[list[Any]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        self.objects[(kind, obj["metadata"]["name"])] = obj
        return obj

    def edit(self, kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """A write by someone else (the operator): bumps the resourceVersion."""
        with self._lock:
            obj = self.objects[(kind, name)]
            change(obj)
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            return copy.deepcopy(obj)

    def fail(self, op: str, exc: Exception, *, times: int = 1,
             when: Callable[[dict[str, Any]], bool] = lambda _: True) -> None:
        """Make the next `times` calls of `op` (get, patch_status, list) that match `when` raise `exc`."""
        self._failures.append([op, when, exc, times])

    def _maybe_fail(self, op: str, arg: dict[str, Any]) -> None:
        with self._lock:
            for failure in self._failures:
                if failure[0] == op and failure[3] > 0 and failure[1](arg):
                    failure[3] -= 1
                    raise failure[2]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        self._maybe_fail("get", {"kind": kind, "name": name})
        with self._lock:
            obj = self.objects.get((kind, name))
            if obj is None:
                raise ApiException(status=404, reason="Not Found")
            return copy.deepcopy(obj)

    def list(self, kind: str, *, label_selector: str = "") -> dict[str, Any]:
        self._maybe_fail("list", {"kind": kind})
        key, _, value = label_selector.partition("=")
        with self._lock:
            return {"items": [copy.deepcopy(o) for (k, _), o in self.objects.items()
                              if k == kind and o["metadata"].get("labels", {}).get(key) == value]}

    def patch_status(self, kind: str, name: str, status: dict[str, Any], *,
                     resource_version: str | None = None) -> dict[str, Any]:
        self._maybe_fail("patch_status", status)
        with self._lock:
            obj = self.objects.get((kind, name))
            if obj is None:
                raise ApiException(status=404, reason="Not Found")
            if resource_version is not None and resource_version != obj["metadata"]["resourceVersion"]:
                raise ApiException(status=409, reason="Conflict")
            _merge(obj.setdefault("status", {}), status)
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            self.patches.append((name, copy.deepcopy(status)))
            return copy.deepcopy(obj)

    def event(self, obj: dict[str, Any], *, reason: str, message: str, warning: bool = False,
              component: str = "") -> None:
        self.events.append((obj["metadata"]["name"], reason))

    def status(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.objects[("GenerationJob", name)].get("status", {}))


class FakeStore:
    """The disk store's job-facing calls; files are written up front, fetches can be held back."""

    def __init__(self, files: dict[str, pathlib.Path]) -> None:
        self.files = files
        self.cached: set[str] = set()
        self.pins: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.rank_hints: dict[str, float | None] = {}

    async def ensure(self, source: Any, *, priority: Any = None, rank_hint_s: float | None = None) -> pathlib.Path:
        self.rank_hints[source.key] = rank_hint_s
        gate = self.gates.get(source.key)
        if gate is not None:
            await gate.wait()
        self.cached.add(source.key)
        self.log.append(("fetched", source.key))
        return self.files[source.key]

    def is_cached(self, key: str) -> bool:
        return key in self.cached

    def snapshot(self) -> Any:
        return types.SimpleNamespace(downloads=())

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1
        self.log.append(("pin", key))

    def unpin(self, key: str) -> None:
        self.pins[key] -= 1
        self.log.append(("unpin", key))


class FakeRunner:
    """Records every call; can hold a generation until released, or fail it."""

    uses_loaded_weights = True

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.error: RunnerError | None = None
        self.during: Callable[[], None] = lambda: None
        self.honours_cancel = True
        """False: a generation that does not look at cancellation until released (one long step)."""
        self.build_seconds = 0.0
        """What the runner says building its modules took."""

    def generate(self, *, checkpoint: LoadedArtifact, loras: Any, vae: Any, request: GenerationRequest,
                 on_step: Callable[[int, int], None], should_cancel: Callable[[], bool]) -> base.GeneratedImage:
        self.calls.append({"checkpoint": checkpoint, "loras": list(loras), "vae": vae, "request": request})
        on_step(1, request.steps)
        self.started.set()
        while not self.hold.wait(0.005):
            if should_cancel() and self.honours_cancel:
                raise RunnerError(Reason.CANCELLED, "cancelled between steps")
        self.during()
        if self.error is not None:
            raise self.error
        on_step(request.steps, request.steps)
        image = Image.new("RGB", (request.width, request.height), (request.seed % 256, 0, 0))
        png = base.encode_png([image], parameters=base.format_parameters(request, model=checkpoint.name))
        return dataclasses.replace(png, build_seconds=self.build_seconds)


def model_file(folder: pathlib.Path, name: str, size_bytes: int) -> pathlib.Path:
    path = folder / f"{name}.safetensors"
    save_file({"weight": torch.zeros(size_bytes // 4)}, str(path))
    return path


def model_cache(name: str, kind: str = "checkpoint") -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": name},
            "spec": {"kind": kind, "source": {"url": f"http://models.test/{name}.safetensors"}}}


def job(name: str, *, attempt: int = 1, model: str = "ckpt", agent: str = AGENT, **params: Any) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "creationTimestamp": kube.now_rfc3339(),
                         "labels": {AGENT_LABEL: agent}, "annotations": {ATTEMPT_ANNOTATION: str(attempt)}},
            "spec": {"model": model, "params": {"prompt": "a fox", "steps": 4, "width": 64, "height": 64, "seed": 5,
                                                "sampler": "euler", **params}},
            "status": {"phase": "Scheduled", "agent": agent, "attempt": attempt}}


class Harness:
    def __init__(self, tmp_path: pathlib.Path, *, slots: int = 1, vram_mib: int = 64, ram_mib: int = 0,
                 grace_s: float = 0.2, **settings: Any) -> None:
        self.objects = FakeObjects()
        files = {}
        for name, kind, size in (("ckpt", "checkpoint", 2 * MiB), ("ckpt-b", "checkpoint", 2 * MiB),
                                 ("ckpt-c", "checkpoint", 2 * MiB), ("lora", "lora", MiB // 4),
                                 ("big", "checkpoint", 8 * MiB)):
            self.objects.add("ModelCache", model_cache(name, kind))
            files[f"{NS}/{name}"] = model_file(tmp_path, name, size)
        self.store = FakeStore(files)
        self.runner = FakeRunner()
        self.loader = Loader()
        self.weights = Weights(loader=self.loader, device=torch.device("cpu"), vram_budget_bytes=vram_mib * MiB,
                               ram_budget_bytes=ram_mib * MiB, ram_tier=ram_mib > 0)
        self.results = tmp_path / "results"
        self.sleeps: list[float] = []
        self.worker = jobs.JobWorker(
            objects=self.objects,  # type: ignore[arg-type]
            settings=jobs.JobSettings(agent=AGENT, namespace=NS, slots=slots, results_dir=self.results,
                                      model_not_found_grace_s=grace_s, progress_interval_s=0.01,
                                      write_backoff_s=0.01, write_max_backoff_s=0.04,
                                      **{"shutdown_grace_s": 5, **settings}),
            store=self.store, weights=self.weights, runner=self.runner,  # type: ignore[arg-type]
            metrics=JobMetrics(CollectorRegistry()), on_change=lambda: None, sleep=self._sleep)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(min(seconds, 0.005))  # virtual time: the loop's pauses are recorded, not waited

    def bind(self, obj: dict[str, Any]) -> None:
        """The operator binds a job: it exists in the API and its event reaches the agent."""
        self.worker._on_event("ADDED", copy.deepcopy(self.objects.add("GenerationJob", obj)))

    def event(self, name: str, kind: str = "MODIFIED") -> None:
        self.worker._on_event(kind, self.objects.get("GenerationJob", name))

    def delete(self, name: str) -> None:
        """The job is deleted and the DELETED event reaches the agent."""
        gone = self.objects.objects.pop(("GenerationJob", name))
        self.worker._on_event("DELETED", copy.deepcopy(gone))

    def in_use(self, key: str) -> bool:
        return any(e.key == key and e.in_use for e in self.weights.vram.snapshot().entries)

    async def until(self, predicate: Callable[[], Any], *, timeout_s: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := predicate()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)
        return value

    async def idle(self) -> None:
        await self.until(lambda: not self.worker._tasks, what="every attempt to end")

    def close(self) -> None:
        self.weights.close()
        self.loader.close()


_live: list[Harness] = []


@pytest.fixture
def harness(tmp_path: pathlib.Path) -> Any:
    def make(**kwargs: Any) -> Harness:
        _live.append(Harness(tmp_path, **kwargs))
        return _live[-1]

    yield make
    for h in _live:
        h.close()
    _live.clear()


def run(coro: Any) -> Any:
    async def released_at_the_end() -> Any:
        try:
            return await coro
        finally:  # a failed test must not leave a held generation blocking the loop's shutdown
            for h in _live:
                h.runner.hold.set()

    return asyncio.run(released_at_the_end())


# ---- the happy path ---------------------------------------------------------------------


def test_a_bound_job_runs_once_and_succeeds_with_its_result_timings_and_an_event(harness) -> None:
    async def main() -> None:
        h = harness()
        h.bind(job("fox"))
        await h.idle()
        status = h.objects.status("fox")
        assert status["phase"] == "Succeeded" and status["cacheHit"] == "miss"
        png = pathlib.Path(status["result"]["location"]).read_bytes()
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert status["result"]["seed"] == 5 and status["progress"] == {"step": 4, "steps": 4, "summary": ""}
        assert {"queuedSeconds", "downloadSeconds", "slotWaitSeconds", "loadSeconds", "buildSeconds", "inferenceSeconds",
                "uploadSeconds", "totalSeconds"} <= set(status["timings"])
        assert h.objects.events == [("fox", "Running"), ("fox", "Succeeded")]
        assert len(h.runner.calls) == 1
        assert h.store.pins == {f"{NS}/ckpt": 0}

    run(main())


def test_an_attempt_this_agent_ended_is_never_run_again(harness) -> None:
    async def main() -> None:
        h = harness()
        obj = job("once")
        h.bind(obj)
        await h.idle()
        h.worker._on_event("MODIFIED", obj)  # a stale copy of the bound, Scheduled object arrives late
        h.worker._on_event("ADDED", obj)
        await h.idle()
        assert len(h.runner.calls) == 1

    run(main())


# ---- never stuck Running ----------------------------------------------------------------


@pytest.mark.parametrize("error", [ApiException(status=503, reason="Service Unavailable"),
                                   ApiException(status=429, reason="Too Many Requests"),
                                   urllib3.exceptions.ProtocolError("Connection aborted."),
                                   ConnectionResetError(104, "reset by peer")], ids=str)
def test_a_transient_api_failure_on_the_final_write_is_retried_with_backoff_until_written(harness, error) -> None:
    async def main() -> None:
        h = harness()
        h.objects.fail("patch_status", error, times=12, when=lambda s: s.get("phase") == "Succeeded")
        h.bind(job("retried"))
        await h.idle()
        assert h.objects.status("retried")["phase"] == "Succeeded"
        assert {0.01, 0.02, 0.04} <= set(h.sleeps) and max(h.sleeps) <= 0.04  # doubling, capped

    run(main())


def test_a_finished_result_is_kept_through_a_long_outage_of_every_api_call(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("outage"))
        await h.until(h.runner.started.is_set)
        for op in ("get", "patch_status"):
            h.objects.fail(op, urllib3.exceptions.MaxRetryError(None, "/", "refused"), times=40)
        h.runner.hold.set()
        await h.idle()
        status = h.objects.status("outage")
        assert status["phase"] == "Succeeded", status
        assert pathlib.Path(status["result"]["location"]).exists()

    run(main())


def test_a_final_status_the_api_server_refuses_is_replaced_by_a_status_rejected_failure(harness) -> None:
    async def main() -> None:
        h = harness()
        h.objects.fail("patch_status", ApiException(status=422, reason="Unprocessable Entity"),
                       when=lambda s: s.get("phase") == "Succeeded")
        h.bind(job("refused"))
        await h.idle()
        failure = h.objects.status("refused")["attemptFailure"]
        assert failure["reason"] == "StatusRejected" and failure["retryable"] is True

    run(main())


def test_a_crash_inside_the_attempt_is_reported_as_a_retryable_agent_error(harness) -> None:
    async def main() -> None:
        h = harness()

        def boom() -> None:
            raise KeyError("unexpected")

        h.runner.during = boom
        h.bind(job("crash"))
        await h.idle()
        failure = h.objects.status("crash")["attemptFailure"]
        assert failure["reason"] == "AgentError" and failure["retryable"] and "KeyError" in failure["message"]

    run(main())


def test_a_conflicting_write_is_read_again_and_applied(harness) -> None:
    async def main() -> None:
        h = harness()
        h.objects.fail("patch_status", ApiException(status=409, reason="Conflict"), times=3,
                       when=lambda s: s.get("phase") == "Succeeded")
        h.bind(job("conflict"))
        await h.idle()
        assert h.objects.status("conflict")["phase"] == "Succeeded"

    run(main())


# ---- only the current attempt writes ----------------------------------------------------


def rebind(h: Harness, name: str, *, attempt: int, agent: str = AGENT) -> None:
    def change(obj: dict[str, Any]) -> None:
        obj["metadata"]["labels"][AGENT_LABEL] = agent
        obj["metadata"]["annotations"][ATTEMPT_ANNOTATION] = str(attempt)
        obj["status"].update(phase="Scheduled", agent=agent, attempt=attempt)

    h.objects.edit("GenerationJob", name, change)


def test_a_new_attempt_that_arrives_while_the_old_one_runs_starts_when_the_old_one_ends(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("again"))
        await h.until(h.runner.started.is_set)
        rebind(h, "again", attempt=2)
        h.event("again")  # the only event: nothing else will wake the loop for attempt 2
        await h.until(lambda: len(h.runner.calls) == 2, what="attempt 2 to start")
        h.runner.hold.set()
        await h.idle()
        status = h.objects.status("again")
        assert (status["phase"], status["attempt"]) == ("Succeeded", 2)
        assert status["result"]["location"].endswith("__again__uid-again.png")
        assert not any(p.get("phase") == "Succeeded" and p.get("attempt") == 1 for _, p in h.objects.patches)
        assert sorted(p.name for p in h.results.iterdir()) == ["ns__again__uid-again.png"]

    run(main())


def test_an_attempt_rebound_after_generating_delivers_nothing(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.during = lambda: rebind(h, "late-move", attempt=2, agent="agent-1")  # no event reaches us
        h.bind(job("late-move"))
        await h.idle()
        assert not h.results.exists() or not list(h.results.iterdir())
        assert h.objects.status("late-move")["phase"] == "Scheduled"

    run(main())


def test_a_relist_starts_a_job_whose_event_was_missed_and_cancels_one_unbound_meanwhile(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("running"))
        await h.until(h.runner.started.is_set)
        h.objects.add("GenerationJob", job("missed"))
        rebind(h, "running", attempt=2, agent="agent-1")  # its DELETED event is lost
        await h.worker.resync()
        await h.until(lambda: "missed" in h.worker.work, what="the missed job to start")
        await h.until(lambda: h.worker.work.get("running") is None, what="the unbound job to be cancelled")
        h.runner.hold.set()
        await h.idle()
        assert h.objects.status("missed")["phase"] == "Succeeded"
        assert h.objects.status("running")["phase"] == "Scheduled"

    run(main())


def test_deleting_a_job_cancels_it_between_steps_without_writing(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("gone"))
        await h.until(h.runner.started.is_set)
        obj = h.objects.get("GenerationJob", "gone")
        del h.objects.objects[("GenerationJob", "gone")]
        h.worker._on_event("DELETED", obj)
        await h.idle()
        assert not any(p.get("phase") in ("Succeeded", "Failed") for _, p in h.objects.patches)

    run(main())


def test_a_job_deleted_and_created_again_under_the_same_name_runs_as_a_new_job(harness) -> None:
    async def main() -> None:
        h = harness()
        h.bind(job("render"))
        await h.idle()
        h.delete("render")
        again = job("render")  # attempt 1 again, but another object
        again["metadata"]["uid"] = "uid-render-2"
        h.bind(again)
        await h.idle()
        assert h.objects.status("render")["phase"] == "Succeeded"
        assert len(h.runner.calls) == 2

    run(main())


def test_a_new_job_under_the_name_of_a_running_one_cancels_the_old_attempt_even_when_its_deletion_was_missed(
        harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("render"))
        await h.until(h.runner.started.is_set, what="the first job generating")
        del h.objects.objects[("GenerationJob", "render")]  # its DELETED event is lost
        again = job("render")
        again["metadata"]["uid"] = "uid-render-2"
        h.bind(again)
        await h.until(lambda: len(h.runner.calls) == 2, what="the new job to start")
        h.runner.hold.set()
        await h.idle()
        assert h.objects.status("render")["phase"] == "Succeeded"
        assert [e for e in h.objects.events if e[1] == "Succeeded"] == [("render", "Succeeded")]

    run(main())


# ---- failures keep their reasons --------------------------------------------------------


def test_a_job_that_cannot_be_parsed_fails_for_good_with_invalid_spec(harness) -> None:
    async def main() -> None:
        h = harness()
        h.bind(job("garbled", steps="many"))
        await h.idle()
        status = h.objects.status("garbled")
        assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
        assert "params.steps" in status["message"]
        assert h.runner.calls == []

    run(main())


def test_a_retryable_runner_error_is_an_attempt_failure_with_its_own_message(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.error = RunnerError(Reason.BACKEND_UNAVAILABLE, "ComfyUI is down", retryable=True)
        h.bind(job("backend"))
        await h.idle()
        failure = h.objects.status("backend")["attemptFailure"]
        assert failure == {"attempt": 1, "agent": AGENT, "reason": "BackendUnavailable",
                           "message": "ComfyUI is down", "retryable": True}
        assert h.objects.status("backend")["phase"] != "Failed"

    run(main())


def test_a_permanent_runner_error_fails_the_job_with_its_reason_and_message(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.error = RunnerError(Reason.UNSUPPORTED_LORA, "LoRA for another base model")
        h.bind(job("bad-lora"))
        await h.idle()
        status = h.objects.status("bad-lora")
        assert (status["phase"], status["reason"], status["message"]) == (
            "Failed", "UnsupportedLora", "LoRA for another base model")

    run(main())


def test_a_model_too_large_for_vram_is_a_retryable_insufficient_vram_failure(harness) -> None:
    async def main() -> None:
        h = harness(vram_mib=4)
        h.bind(job("huge", model="big"))
        await h.idle()
        failure = h.objects.status("huge")["attemptFailure"]
        assert failure["reason"] == "InsufficientVRAM" and failure["retryable"] is True

    run(main())


def test_a_missing_model_cache_fails_after_the_grace_and_one_created_within_it_is_used(harness) -> None:
    async def main() -> None:
        h = harness(grace_s=0.3)
        h.bind(job("never", model="nowhere"))
        await h.idle()
        status = h.objects.status("never")
        assert (status["phase"], status["reason"]) == ("Failed", "ModelNotFound")
        assert "ns/nowhere" in status["message"]

        h = harness(grace_s=30)
        h.objects.fail("get", ApiException(status=404, reason="Not Found"), times=3,
                       when=lambda a: a["name"] == "ckpt-b")
        h.bind(job("soon", model="ckpt-b"))
        await h.idle()
        assert h.objects.status("soon")["phase"] == "Succeeded"

    run(main())


# ---- seeds, pins, file-only runners -----------------------------------------------------


def test_a_job_without_a_seed_uses_the_same_seed_in_every_attempt(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.error = RunnerError(Reason.INSUFFICIENT_VRAM, "out of memory", retryable=True)
        h.bind(job("seedless", seed=None))
        await h.idle()
        h.runner.error = None
        rebind(h, "seedless", attempt=2)
        h.event("seedless")
        await h.idle()
        first, second = (c["request"].seed for c in h.runner.calls)
        assert first == second == jobs.seed_for("uid-seedless")
        assert h.objects.status("seedless")["result"]["seed"] == first

    run(main())


def test_each_file_is_pinned_as_soon_as_it_is_fetched_and_unpinned_after_the_job(harness) -> None:
    async def main() -> None:
        h = harness()
        lora_gate = h.store.gates[f"{NS}/lora"] = asyncio.Event()
        obj = job("pinned")
        obj["spec"]["loras"] = [{"name": "lora", "weight": 0.5}]
        h.bind(obj)
        await h.until(lambda: ("pin", f"{NS}/ckpt") in h.store.log, what="the checkpoint to be pinned")
        assert ("fetched", f"{NS}/lora") not in h.store.log  # pinned while the LoRA still downloads
        lora_gate.set()
        await h.idle()
        log = h.store.log
        assert log.index(("pin", f"{NS}/ckpt")) == log.index(("fetched", f"{NS}/ckpt")) + 1
        assert h.store.pins == {f"{NS}/ckpt": 0, f"{NS}/lora": 0}

    run(main())


def test_each_fetch_carries_its_models_published_fleet_rank_as_the_rank_hint(harness) -> None:
    async def main() -> None:
        h = harness()
        h.objects.edit("ModelCache", "ckpt", lambda mc: mc.update(status={"useRank": 1.8e9}))
        obj = job("ranked")
        obj["spec"]["loras"] = [{"name": "lora", "weight": 0.5}]
        h.bind(obj)
        await h.idle()
        assert h.objects.status("ranked")["phase"] == "Succeeded"
        assert h.store.rank_hints == {f"{NS}/ckpt": 1.8e9, f"{NS}/lora": None}  # the LoRA has no rank yet

    run(main())


def test_a_runner_that_reads_files_gets_pinned_paths_and_nothing_is_loaded_into_the_tiers(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.uses_loaded_weights = False
        pins_during: list[int] = []
        h.runner.during = lambda: pins_during.append(h.store.pins[f"{NS}/ckpt"])
        h.bind(job("files"))
        await h.idle()
        (call,) = h.runner.calls
        assert call["checkpoint"].tensors == {} and call["checkpoint"].path == h.store.files[f"{NS}/ckpt"]
        assert pins_during == [1]
        assert h.weights.vram.snapshot().entries == ()
        assert h.objects.status("files")["cacheHit"] == "miss"

    run(main())


# ---- queue slots: the next job loads while the current one generates --------------------


def test_the_queued_job_is_loaded_into_vram_while_the_running_job_generates(harness) -> None:
    async def main() -> None:
        h = harness(vram_mib=64)
        h.runner.hold.clear()
        h.bind(job("first", model="ckpt"))
        await h.until(h.runner.started.is_set)
        h.bind(job("second", model="ckpt-b"))
        await h.until(lambda: f"{NS}/ckpt-b" in h.weights.vram, what="the second checkpoint in VRAM")
        assert len(h.runner.calls) == 1  # still generating the first
        assert {w.name: w.stage for w in h.worker.work.values()} == {"first": "running", "second": "queued"}
        running = {r.name: r.expected_remaining_seconds for r in h.worker.running()}
        assert running["second"] > running["first"] > 0
        h.runner.hold.set()
        await h.idle()
        second = h.objects.status("second")
        assert second["phase"] == "Succeeded" and second["timings"]["slotWaitSeconds"] > 0

    run(main())


def test_a_queued_job_deleted_while_it_waits_for_a_slot_lets_go_of_its_vram_pins_and_place_at_once(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("first"))
        await h.until(h.runner.started.is_set, what="the first job generating")
        h.bind(job("second", model="ckpt-b"))
        await h.until(lambda: h.in_use(f"{NS}/ckpt-b"), what="the second checkpoint staged in VRAM")
        h.delete("second")
        await h.until(lambda: "second" not in h.worker.work, timeout_s=10, what="the deleted job to let go")
        assert not h.in_use(f"{NS}/ckpt-b") and h.store.pins[f"{NS}/ckpt-b"] == 0
        h.bind(job("third", model="ckpt-c"))  # its place is free again: it stages at once
        await h.until(lambda: h.in_use(f"{NS}/ckpt-c"), what="the next job staged in the freed place")
        assert len(h.runner.calls) == 1  # all while the first job still generates
        h.runner.hold.set()
        await h.idle()
        assert h.objects.status("first")["phase"] == h.objects.status("third")["phase"] == "Succeeded"

    run(main())


def test_jobs_bound_beyond_the_queue_slots_wait_scheduled_without_downloading_or_staging(harness) -> None:
    async def main() -> None:
        h = harness()  # one generation slot and one queue slot
        h.runner.hold.clear()
        h.bind(job("first"))
        await h.until(h.runner.started.is_set, what="the first job generating")
        h.bind(job("second", model="ckpt-b"))
        h.bind(job("third", model="ckpt-c"))
        await h.until(lambda: h.in_use(f"{NS}/ckpt-b"), what="the queued job staged")
        assert ("fetched", f"{NS}/ckpt-c") not in h.store.log and f"{NS}/ckpt-c" not in h.weights.vram
        assert h.objects.status("third")["phase"] == "Scheduled"
        assert {r.name for r in h.worker.running()} == {"first", "second", "third"}  # still counted as bound
        h.runner.hold.set()
        await h.idle()
        assert [h.objects.status(n)["phase"] for n in ("first", "second", "third")] == ["Succeeded"] * 3
        assert [c["checkpoint"].name for c in h.runner.calls] == ["ckpt", "ckpt-b", "ckpt-c"]

    run(main())


def test_a_queued_model_that_does_not_fit_beside_the_running_one_is_staged_in_ram(harness) -> None:
    async def main() -> None:
        h = harness(vram_mib=3, ram_mib=16)
        h.runner.hold.clear()
        h.bind(job("first", model="ckpt"))
        await h.until(h.runner.started.is_set)
        h.bind(job("second", model="ckpt-b"))
        await h.until(lambda: h.weights.ram is not None and f"{NS}/ckpt-b" in h.weights.ram,
                      what="the second checkpoint staged in RAM")
        assert f"{NS}/ckpt-b" not in h.weights.vram
        h.runner.hold.set()
        await h.idle()
        assert h.objects.status("second")["phase"] == "Succeeded"

    run(main())


def test_progress_and_the_timings_known_so_far_are_published_while_the_job_runs(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.hold.clear()
        h.bind(job("watched"))
        await h.until(lambda: h.objects.status("watched").get("progress", {}).get("step") == 1,
                      what="step 1 of 4 published")
        status = h.objects.status("watched")
        assert status["phase"] == "Running" and status["progress"] == {"step": 1, "steps": 4, "summary": "Generating 1/4"}
        assert status["stage"] == "Generating"
        running = next(c for c in status["conditions"] if c["type"] == "Running")
        assert running["status"] == "True"
        assert {"queuedSeconds", "downloadSeconds", "slotWaitSeconds"} <= set(status["timings"])
        h.runner.hold.set()
        await h.idle()

    run(main())


def test_building_the_runners_modules_is_timed_apart_from_inference(harness) -> None:
    async def main() -> None:
        h = harness()
        h.runner.during = lambda: time.sleep(0.5)
        h.runner.build_seconds = 0.45
        h.bind(job("first-use"))
        await h.idle()
        timings = h.objects.status("first-use")["timings"]
        assert timings["buildSeconds"] == 0.45  # (the runner took over 0.5 s)
        assert timings["inferenceSeconds"] >= 0.05

    run(main())


def test_a_runners_time_splits_into_building_and_inference() -> None:
    assert jobs.split_runner_time(0.5, 0.45) == (0.45, 0.5 - 0.45)
    assert jobs.split_runner_time(2.0, 0.0) == (0.0, 2.0)
    assert jobs.split_runner_time(0.3, 0.45) == (0.3, 0.0)  # a claim beyond the call's own time is capped
    assert jobs.split_runner_time(1.0, -1.0) == (0.0, 1.0)


def test_expected_times_are_averaged_per_model_across_jobs() -> None:
    estimates = jobs.Estimates(load_s=2.0, step_s=0.5, weight=0.5)
    assert estimates.job_s("a", 10) == 7.0  # nothing observed: the defaults
    estimates.observe("a", load_s=1.0, inference_s=10.0, steps=10)
    assert estimates.job_s("a", 20) == 21.0 and estimates.remaining_s("a", 20, 15) == 5.0
    estimates.observe("a", load_s=3.0, inference_s=30.0, steps=10)
    assert estimates.job_s("a", 10) == 2.0 + 20.0
    assert estimates.job_s("unseen", 10) == estimates.job_s("a", 10)  # the overall average stands in


def test_stopping_the_agent_reports_the_running_attempt_as_retryable(harness) -> None:
    class NoWatch:
        def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("no watch in this test")

    async def main() -> None:
        h = harness()
        h.objects.custom = NoWatch()  # type: ignore[attr-defined]
        stop = asyncio.Event()
        runner = asyncio.create_task(h.worker.run(stop))
        await asyncio.sleep(0)
        h.runner.hold.clear()
        h.bind(job("interrupted"))
        await h.until(h.runner.started.is_set)
        stop.set()
        await asyncio.wait_for(runner, timeout=60)
        failure = h.objects.status("interrupted")["attemptFailure"]
        assert failure["reason"] == "AgentStopping" and failure["retryable"] is True

    run(main())


def test_an_attempt_stopped_past_the_grace_releases_its_pins_and_vram_only_after_its_thread_returns(harness) -> None:
    class NoWatch:
        def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("no watch in this test")

    async def main() -> None:
        h = harness(shutdown_grace_s=0.05)
        h.objects.custom = NoWatch()  # type: ignore[attr-defined]
        key = f"{NS}/ckpt"
        h.runner.honours_cancel = False  # one long step: the thread outlives the grace
        h.runner.hold.clear()
        h.runner.during = lambda: h.store.log.append(("generated", key))
        stop = asyncio.Event()
        runner = asyncio.create_task(h.worker.run(stop))
        await asyncio.sleep(0)
        h.bind(job("slow"))
        await h.until(h.runner.started.is_set, what="the generation to start")
        stop.set()
        await h.until(lambda: any(t.cancelling() for t in h.worker._tasks) or ("unpin", key) in h.store.log,
                      what="the grace to run out")
        assert ("unpin", key) not in h.store.log and h.in_use(key)  # the thread still uses them
        h.runner.hold.set()
        await asyncio.wait_for(runner, timeout=60)
        log = h.store.log
        assert ("generated", key) in log, "the worker stopped before its generation thread returned"
        assert log.index(("generated", key)) < log.index(("unpin", key))
        assert not h.in_use(key)

    run(main())


def test_transient_errors_are_told_apart_from_refusals() -> None:
    assert jobs.is_transient(ApiException(status=503)) and jobs.is_transient(ApiException(status=429))
    assert jobs.is_transient(urllib3.exceptions.ProtocolError("x")) and jobs.is_transient(TimeoutError())
    assert not jobs.is_transient(ApiException(status=403)) and not jobs.is_transient(ApiException(status=422))
    assert not jobs.is_transient(ValueError("bug"))


def test_free_slots_count_the_queue_slots_and_every_bound_job() -> None:
    from stoker.agent import status_report
    from stoker.api.cacheagent import Bandwidths, RunningJob

    empty = status_report.TierView(budget_bytes=0, used_bytes=0, reserved_bytes=0, entries=())
    disk = status_report.DiskView(budget_bytes=0, used_bytes=0, reserved_bytes=0, entries=(), downloads=())
    identity = status_report.Identity(pod="p", node="n", zone="", gpu_model="cpu", vram_bytes=0)

    def free(running: int) -> tuple[int, int, int]:
        status = status_report.build_status(
            identity=identity, disk=disk, ram=empty, vram=empty, slots=1, queue_slots=1,
            running=[RunningJob(name=f"j{i}", attempt=1) for i in range(running)], failures=[],
            bandwidth=Bandwidths(), observed_generation=None)
        return status.slots, status.queue_slots, status.free_slots

    assert [free(n) for n in (0, 1, 2, 3)] == [(1, 1, 2), (1, 1, 1), (1, 1, 0), (1, 1, 0)]


def test_times_in_a_status_never_go_before_the_binding_whatever_the_clocks() -> None:
    from stoker.agent.jobs import ordered_times

    current = {"scheduledAt": "2026-01-01T00:00:10.000000Z"}
    out = ordered_times({"startedAt": "2026-01-01T00:00:09.500000Z", "phase": "Running"}, current)
    assert out["startedAt"] == "2026-01-01T00:00:10.000000Z" and out["phase"] == "Running"
    assert ordered_times({"startedAt": "2026-01-01T00:00:11Z"}, current)["startedAt"] == "2026-01-01T00:00:11Z"
    done = ordered_times({"finishedAt": "2026-01-01T00:00:09Z"}, {**current, "startedAt": "2026-01-01T00:00:12Z"})
    assert done["finishedAt"] == "2026-01-01T00:00:12Z"
    assert ordered_times({"startedAt": "x"}, {}) == {"startedAt": "x"}


def test_a_models_source_carries_the_digest_the_fleet_published_for_copies_from_peers() -> None:
    from stoker.api.modelcache import ModelCache

    def mc(spec_sha: str | None, status_sha: str | None) -> ModelCache:
        source: dict[str, Any] = {"url": "https://hub.example/m.safetensors"}
        if spec_sha:
            source["sha256"] = spec_sha
        return ModelCache.model_validate({"metadata": {"name": "m", "namespace": "ns"}, "spec": {"source": source},
                                          "status": {"sha256": status_sha} if status_sha else None})

    objects = type("O", (), {"namespace": "ns"})()
    published = jobs.model_source(objects, mc(None, "b" * 64))  # type: ignore[arg-type]
    assert (published.sha256, published.published_sha256, published.verify_sha256) == (None, "b" * 64, "b" * 64)
    spec = jobs.model_source(objects, mc("a" * 64, "a" * 64))  # type: ignore[arg-type]
    assert spec.verify_sha256 == "a" * 64
    unknown = jobs.model_source(objects, mc(None, None))  # type: ignore[arg-type]
    assert unknown.verify_sha256 is None  # no digest: the source only
    # the published digest does not change the file's identity (a new digest in status is not a new model)
    assert published.digest == unknown.digest
