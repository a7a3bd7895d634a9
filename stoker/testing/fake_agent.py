"""A lightweight agent for tests and benchmarks that speaks the agent protocol exactly.

It does everything a real agent does through the API server, and nothing on a GPU:
creates its CacheAgent and reports status (slots and queue slots included), renews
its Lease, watches the jobs labelled for it (server-side label selector), writes
Running then Succeeded with a fake result for the current attempt only (every write
preconditioned on the version it checked) and records the Running and Succeeded
Events as the bound agent does, and obeys spec.holds by reporting held models as on
disk after a delay. Models listed as bad are reported in status.modelFailures
instead (from a hold, or from a job that needed them, which then fails); flaky ones
fail with a retryable reason, in modelFailures and in the attempts of jobs that use
them. Each reported failure names the ModelCache's uid and generation, and a released
hold drops its model's failure, as a real agent does.

Run it in-process (`FakeAgent(...).start()` / `.stop()` / `.crash()`) or as a process
that a test can kill -9:

    python -P -m stoker.testing.fake_agent --kubeconfig K --namespace N --name agent-a \
        --model sd15:vram:4000000000 --job-seconds 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from stoker.api import GROUP, VERSION
from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION, FLEET_LABEL
from stoker.kube import Objects, now_rfc3339

log = logging.getLogger(__name__)


class FakeAgentError(RuntimeError):
    """The fake agent could not register or talk to the API server."""


@dataclasses.dataclass
class FakeAgentConfig:
    name: str
    namespace: str
    slots: int = 1
    queue_slots: int = 0
    node: str = ""
    zone: str = ""
    models: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    """Initial cache: model -> (tier: disk|ram|vram, size_bytes)."""
    preloaded: frozenset[str] = frozenset()
    """Of `models`, the baked-in ones."""
    disk_budget_bytes: int = 50 << 30
    vram_budget_bytes: int = 24 << 30
    job_seconds: float = 0.2
    hold_delay_s: float = 0.3
    lease_duration_s: int = 3
    renew_s: float = 1.0
    default_size_bytes: int = 1 << 30
    bad_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    """model -> reason: downloads of it always fail, not retryable."""
    failing_models: dict[str, str] = dataclasses.field(default_factory=dict)
    """model -> reason: attempts of jobs using it fail here (retryable, so another agent may try)."""
    flaky_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    """model -> retryable source reason (e.g. HTTPServerError): every fetch of it fails that way."""
    download_bps: float = 200e6
    fleet: str | None = None
    """Labels its CacheAgent stoker.dev/fleet=<fleet>, as the real agent's --fleet does."""


class FakeAgent:
    def __init__(self, api: client.ApiClient, cfg: FakeAgentConfig) -> None:
        self.api = api
        self.cfg = cfg
        self.objects = Objects(api, cfg.namespace)
        self.coord = client.CoordinationV1Api(api)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.models: dict[str, dict[str, Any]] = {
            name: {"tier": tier, "size": size, "preloaded": name in cfg.preloaded, "lastUsed": None}
            for name, (tier, size) in cfg.models.items()}
        self.held: set[str] = set()
        self.ordered: set[str] = set()
        """Models in spec.holds the last time it was read."""
        self.failures: dict[str, dict[str, Any]] = {}
        self.running: dict[str, int] = {}
        self.started: set[tuple[str, int]] = set()
        self.completed: list[tuple[str, int]] = []
        self.dirty = threading.Event()
        self.threads: list[threading.Thread] = []
        self._last_status: dict[str, Any] | None = None

    # -- lifecycle

    def start(self) -> FakeAgent:
        try:
            labels = {FLEET_LABEL: self.cfg.fleet} if self.cfg.fleet else {}
            self.objects.create("CacheAgent", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CacheAgent",
                                               "metadata": {"name": self.cfg.name, "labels": labels}, "spec": {}})
        except ApiException as exc:
            if exc.status != 409:
                raise FakeAgentError(f"cannot create CacheAgent {self.cfg.namespace}/{self.cfg.name}: {exc.reason}") from exc
        self._report()
        self._renew()
        for target, name in ((self._lease_loop, "lease"), (self._watch_jobs, "jobs"),
                             (self._holds_loop, "holds"), (self._status_loop, "status")):
            t = threading.Thread(target=target, name=f"{self.cfg.name}-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.dirty.set()
        for t in self.threads:
            t.join(timeout=5)

    crash = stop
    """In-process stand-in for kill -9: everything stops at once, nothing is cleaned up."""

    # -- lease

    def _renew(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        name, ns = self.cfg.name, self.cfg.namespace
        try:  # a merge patch, as the real agent renews (the chart's agent Role has patch, not update)
            self.coord.patch_namespaced_lease(name, ns, {"spec": {
                "renewTime": now_rfc3339(now), "leaseDurationSeconds": self.cfg.lease_duration_s,
                "holderIdentity": name}})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease(ns, client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, namespace=ns),
                spec=client.V1LeaseSpec(holder_identity=name, lease_duration_seconds=self.cfg.lease_duration_s,
                                        acquire_time=now, renew_time=now)))

    def _lease_loop(self) -> None:
        while not self.stop_event.wait(self.cfg.renew_s):
            try:
                self._renew()
            except (ApiException, OSError) as exc:
                log.warning("%s: lease renewal failed: %s", self.cfg.name, exc)

    # -- status

    def _status(self) -> dict[str, Any]:
        with self.lock:
            models = [{"name": n, "tier": m["tier"], "sizeBytes": m["size"], "preloaded": m["preloaded"],
                       "held": n in self.held, **({"lastUsed": m["lastUsed"]} if m["lastUsed"] else {})}
                      for n, m in sorted(self.models.items())]
            disk_used = sum(m["size"] for m in self.models.values() if not m["preloaded"])
            vram_used = sum(m["size"] for m in self.models.values() if m["tier"] == "vram")
            running = [{"name": n, "attempt": a, "expectedRemainingSeconds": self.cfg.job_seconds}
                       for n, a in sorted(self.running.items())]
            return {
                "pod": self.cfg.name, "node": self.cfg.node or self.cfg.name, "zone": self.cfg.zone,
                "gpu": {"model": "fake", "vramBytes": self.cfg.vram_budget_bytes},
                "disk": {"budgetBytes": self.cfg.disk_budget_bytes, "usedBytes": disk_used},
                "vram": {"budgetBytes": self.cfg.vram_budget_bytes, "usedBytes": min(vram_used, self.cfg.vram_budget_bytes)},
                "models": models, "modelsOnDisk": len(models),
                "hotModels": sum(1 for m in models if m["tier"] == "vram"),
                "slots": self.cfg.slots, "queueSlots": self.cfg.queue_slots,
                "freeSlots": max(0, self.cfg.slots + self.cfg.queue_slots - len(running)), "running": running,
                "modelFailures": list(self.failures.values()),
                "bandwidth": {"downloadBps": self.cfg.download_bps, "diskToGpuBps": 2e9, "ramToGpuBps": 20e9},
            }

    def _report(self) -> None:
        status = self._status()
        if status != self._last_status:
            self.objects.patch_status("CacheAgent", self.cfg.name, status)
            self._last_status = status

    def _status_loop(self) -> None:
        while not self.stop_event.is_set():
            self.dirty.wait(1.0)
            if self.stop_event.is_set():
                return
            self.dirty.clear()
            try:
                self._report()
            except (ApiException, OSError) as exc:
                log.warning("%s: status report failed: %s", self.cfg.name, exc)
            self.stop_event.wait(0.1)  # debounce

    # -- holds

    def _holds_loop(self) -> None:
        pending: dict[str, float] = {}
        while not self.stop_event.wait(0.2):
            try:
                spec = self.objects.get("CacheAgent", self.cfg.name).get("spec") or {}
            except (ApiException, OSError):
                continue
            holds = {h["model"]: h.get("tier", "disk") for h in spec.get("holds") or []}
            now = time.monotonic()
            new_bad = [m for m in holds if (m in self.cfg.bad_sources or m in self.cfg.flaky_sources)
                       and m not in self.models and m not in self.failures]
            identities = {m: self._model_identity(m) for m in new_bad}
            with self.lock:
                for model in self.ordered - set(holds):
                    if self.failures.pop(model, None) is not None:
                        self.dirty.set()
                self.ordered = set(holds)
                if set(holds) != self.held:
                    self.held = {m for m in holds if m in self.models}
                    self.dirty.set()
                for model, tier in holds.items():
                    if model in self.models:
                        pass
                    elif model in self.cfg.bad_sources:
                        if model not in self.failures:
                            self._bad_failure(model, identities.get(model, {}))
                        continue
                    elif model in self.cfg.flaky_sources:
                        self._flaky_failure(model, identities.get(model, {}))
                        continue
                    if model not in self.models:
                        due = pending.setdefault(model, now + self.cfg.hold_delay_s)
                        if now >= due:
                            self.models[model] = {"tier": "disk", "size": self.cfg.default_size_bytes,
                                                  "preloaded": False, "lastUsed": None}
                            pending.pop(model, None)
                            self.held.add(model)
                            self.dirty.set()
                    elif tier == "vram" and self.models[model]["tier"] != "vram":
                        self.models[model]["tier"] = "vram"
                        self.dirty.set()
                    if model in self.models:
                        self.held.add(model)

    def _model_identity(self, model: str) -> dict[str, Any]:
        """The uid and generation of ModelCache `model` for a failure report ({} when it cannot be read)."""
        try:
            meta = self.objects.get("ModelCache", model).get("metadata", {})
        except (ApiException, OSError):
            return {}
        return {"uid": meta.get("uid"), "generation": meta.get("generation")}

    def _bad_failure(self, model: str, identity: dict[str, Any]) -> None:
        """Record a non-retryable fetch failure of `model` (callers hold the lock)."""
        self.failures[model] = {"name": model, "reason": self.cfg.bad_sources[model],
                                "message": "the source keeps failing", "retryable": False, "at": now_rfc3339(),
                                **identity}
        self.dirty.set()

    def _flaky_failure(self, model: str, identity: dict[str, Any]) -> None:
        """Record a retryable fetch failure of `model` (callers hold the lock)."""
        if model not in self.failures:
            self.failures[model] = {"name": model, "reason": self.cfg.flaky_sources[model],
                                    "message": f"{self.cfg.namespace}/{model}: the server answered 503",
                                    "retryable": True, "at": now_rfc3339(), **identity}
            self.dirty.set()

    def add_model(self, name: str, *, tier: str = "disk", size_bytes: int | None = None) -> None:
        """A copy of `name` appears in this agent's cache (fetched after all, or copied in)."""
        with self.lock:
            self.models[name] = {"tier": tier, "size": size_bytes or self.cfg.default_size_bytes,
                                 "preloaded": False, "lastUsed": None}
            self.failures.pop(name, None)
            self.cfg.flaky_sources.pop(name, None)
            self.dirty.set()

    def _event(self, obj: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        self.objects.event(obj, reason=reason, message=message, warning=warning, component="stoker-agent")

    # -- jobs

    def _watch_jobs(self) -> None:
        custom = self.objects.custom
        selector = f"{AGENT_LABEL}={self.cfg.name}"
        rv = None
        while not self.stop_event.is_set():
            try:
                if rv is None:
                    listing = custom.list_namespaced_custom_object(GROUP, VERSION, self.cfg.namespace, "generationjobs",
                                                                   label_selector=selector)
                    rv = listing["metadata"]["resourceVersion"]
                    for obj in listing["items"]:
                        self._consider(obj)
                w = watch.Watch()
                for ev in w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, self.cfg.namespace,
                                   "generationjobs", label_selector=selector, resource_version=rv,
                                   timeout_seconds=2, allow_watch_bookmarks=True):
                    obj = ev["object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._consider(obj)
                    if self.stop_event.is_set():
                        w.stop()
                        return
            except ApiException as exc:
                if exc.status == 410:
                    rv = None
                else:
                    self.stop_event.wait(0.5)
            except Exception:  # connection drops: relist
                rv = None
                self.stop_event.wait(0.5)

    def _ours(self, obj: dict[str, Any], attempt: int) -> bool:
        meta = obj.get("metadata", {})
        phase = (obj.get("status") or {}).get("phase", "Pending")
        return ((meta.get("labels") or {}).get(AGENT_LABEL) == self.cfg.name
                and (meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION) == str(attempt)
                and phase not in ("Succeeded", "Failed"))

    def _consider(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        try:
            attempt = int((meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION, ""))
        except ValueError:
            return
        key = (meta["name"], attempt)
        if not self._ours(obj, attempt):
            return
        with self.lock:
            if key in self.started:
                return
            self.started.add(key)
        t = threading.Thread(target=self._run_job, args=(meta["name"], attempt), daemon=True,
                             name=f"{self.cfg.name}-job-{meta['name']}")
        t.start()

    def _write_status(self, name: str, attempt: int, status: dict[str, Any],
                      event: tuple[str, str] | None = None, warning: bool = False) -> bool:
        """Patch the job's status only while it is still ours, preconditioned on the version checked;
        then record `event` (reason, message) on it."""
        for _ in range(10):
            if self.stop_event.is_set():
                return False
            try:
                obj = self.objects.get("GenerationJob", name)
            except ApiException:
                return False
            if not self._ours(obj, attempt):
                return False
            try:
                body = self.objects.patch_status("GenerationJob", name, status,
                                                 resource_version=obj["metadata"]["resourceVersion"])
                if event is not None:
                    self._event(body, *event, warning=warning)
                return True
            except ApiException as exc:
                if exc.status != 409:
                    return False
        return False

    def _run_job(self, name: str, attempt: int) -> None:
        try:
            obj = self.objects.get("GenerationJob", name)
        except ApiException:
            return
        spec = obj["spec"]
        model = spec["model"]
        artifacts = [model, *(lr["name"] for lr in spec.get("loras") or [])] + ([spec["vae"]] if spec.get("vae") else [])
        with self.lock:
            hit = self.models[model]["tier"] if model in self.models else "miss"
            self.running[name] = attempt
            self.dirty.set()
        t0 = time.time()
        try:
            bad = next((a for a in artifacts if a in self.cfg.bad_sources), None)
            if bad is not None:
                identity = self._model_identity(bad)
                with self.lock:
                    self._bad_failure(bad, identity)
                self._write_status(name, attempt, {"phase": "Failed", "reason": self.cfg.bad_sources[bad],
                                                   "message": f"model {bad} cannot be fetched", "finishedAt": now_rfc3339()})
                return
            if not self._write_status(name, attempt, {"phase": "Running", "startedAt": now_rfc3339(), "cacheHit": hit,
                                                      "progress": {"step": 0, "steps": spec["params"].get("steps", 20)}},
                                      event=("Running", f"attempt {attempt} started on {self.cfg.name} ({hit} hit)")):
                return
            flaky = next((a for a in artifacts if a in self.cfg.flaky_sources and a not in self.models), None)
            if flaky is not None:
                identity = self._model_identity(flaky)
                with self.lock:
                    self._flaky_failure(flaky, identity)
            if flaky is not None:
                reason = self.cfg.flaky_sources.get(flaky, "HTTPServerError")
                self._write_status(name, attempt, {"attemptFailure": {
                    "attempt": attempt, "agent": self.cfg.name, "reason": reason,
                    "message": f"{self.cfg.namespace}/{flaky}: the server answered 503", "retryable": True}},
                    event=(reason, f"fetching {flaky} failed"), warning=True)
                return
            failing = next((a for a in artifacts if a in self.cfg.failing_models), None)
            if self.stop_event.wait(self.cfg.job_seconds):
                return  # crashed mid-job: nothing more is written
            if failing is not None:
                self._write_status(name, attempt, {"attemptFailure": {
                    "attempt": attempt, "agent": self.cfg.name, "reason": self.cfg.failing_models[failing],
                    "message": f"{failing} failed on {self.cfg.name}", "retryable": True}})
                return
            png = f"{name}:{attempt}:{self.cfg.name}".encode()
            done = self._write_status(name, attempt, {
                "phase": "Succeeded", "finishedAt": now_rfc3339(),
                "progress": {"step": spec["params"].get("steps", 20), "steps": spec["params"].get("steps", 20)},
                "timings": {"inferenceSeconds": round(time.time() - t0, 3)},
                "result": {"location": f"/results/{name}.png", "sha256": hashlib.sha256(png).hexdigest(),
                           "bytes": len(png), "contentType": "image/png"}},
                event=("Succeeded", f"image at /results/{name}.png ({len(png)} bytes)"))
            if done:
                with self.lock:
                    self.completed.append((name, attempt))
                    for a in artifacts:
                        m = self.models.setdefault(a, {"tier": "disk", "size": self.cfg.default_size_bytes,
                                                       "preloaded": False, "lastUsed": None})
                        m["lastUsed"] = now_rfc3339()
                        self.failures.pop(a, None)  # fetched after all
                    self.models[model]["tier"] = "vram"
        finally:
            with self.lock:
                self.running.pop(name, None)
                self.dirty.set()


def _parse_model(text: str) -> tuple[str, tuple[str, int]]:
    parts = text.split(":")
    name = parts[0]
    tier = parts[1] if len(parts) > 1 else "disk"
    size = int(parts[2]) if len(parts) > 2 else 1 << 30
    return name, (tier, size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake-agent", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--queue-slots", type=int, default=0)
    p.add_argument("--node", default="")
    p.add_argument("--zone", default="")
    p.add_argument("--model", action="append", default=[], help="NAME[:TIER[:SIZE_BYTES]] in the initial cache")
    p.add_argument("--preloaded", action="append", default=[], help="a --model that is baked in")
    p.add_argument("--job-seconds", type=float, default=0.2)
    p.add_argument("--hold-delay-s", type=float, default=0.3)
    p.add_argument("--lease-duration-s", type=int, default=3)
    p.add_argument("--renew-s", type=float, default=1.0)
    p.add_argument("--bad-source", action="append", default=[], help="MODEL:REASON, a source that never downloads")
    p.add_argument("--failing-model", action="append", default=[], help="MODEL:REASON, attempts using it fail here")
    p.add_argument("--flaky-source", action="append", default=[],
                   help="MODEL:REASON, a source whose fetches fail with a retryable reason")
    p.add_argument("--fleet", default=None, help="label the CacheAgent stoker.dev/fleet=FLEET")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = FakeAgentConfig(
        name=args.name, namespace=args.namespace, slots=args.slots, queue_slots=args.queue_slots, node=args.node,
        zone=args.zone,
        models=dict(_parse_model(m) for m in args.model), preloaded=frozenset(args.preloaded),
        job_seconds=args.job_seconds, hold_delay_s=args.hold_delay_s, lease_duration_s=args.lease_duration_s,
        renew_s=args.renew_s, bad_sources=dict(x.split(":", 1) for x in args.bad_source),
        failing_models=dict(x.split(":", 1) for x in args.failing_model),
        flaky_sources=dict(x.split(":", 1) for x in args.flaky_source), fleet=args.fleet)
    agent = FakeAgent(config.new_client_from_config(config_file=args.kubeconfig), cfg).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"fake agent {cfg.namespace}/{cfg.name} ready", flush=True)
    done.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
