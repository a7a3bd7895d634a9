"""A real agent starting and stopping: what it reports, when it may take jobs, what SIGTERM does.

- After kill -9 and a wiped cache, a restarted agent clears its old report before anything
  slow, and never renews its Lease (Ready) before it reported its real cache.
- SIGTERM on an idle agent: it exits within 5 s and releases its Lease.
- SIGTERM with a job generating and another queued: the queued one is handed back at once
  (AgentStopping, which uses none of the job's attempts) and runs on another agent; the
  generating one finishes where it is, within the grace period.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import shutil
import signal
import threading
import time
from typing import Any

import pytest
from kubernetes import client, watch

from stoker import kube
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import (Process, agent_registered, checkpoint_model_cache,
                                            operator_process, real_agent_process, wait_for)


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


@pytest.fixture
def checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    return tiny_models.write_tiny_sd15(tmp_path / "tiny-sd15.safetensors", seed=11)


class Timeline:
    """Every CacheAgent status and Lease change of one agent, in the order the API server stored them
    (each watch starts from a listing's resourceVersion, so no change is missed)."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str) -> None:
        self.custom, self.coord = client.CustomObjectsApi(api), client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.gaps = 0
        self._stop = threading.Event()
        self._ready = {kind: threading.Event() for kind in ("status", "lease")}
        self._threads = [threading.Thread(target=self._watch, args=(kind,), daemon=True) for kind in self._ready]

    def _watch(self, kind: str) -> None:
        selector = f"metadata.name={self.name}"
        if kind == "status":
            fn, args = self.custom.list_namespaced_custom_object, ("stoker.dev", "v1alpha1", self.namespace, "cacheagents")
        else:
            fn, args = self.coord.list_namespaced_lease, (self.namespace,)
        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = fn(*args, field_selector=selector)
                    version = listing["metadata"]["resourceVersion"] if isinstance(listing, dict) else \
                        listing.metadata.resource_version
                    self._ready[kind].set()
                for ev in watch.Watch().stream(fn, *args, field_selector=selector, resource_version=version,
                                               timeout_seconds=2):
                    obj = ev["object"]
                    if isinstance(obj, dict):  # a CacheAgent
                        version, data = obj["metadata"]["resourceVersion"], (obj.get("status") or {})
                    else:  # a V1Lease
                        version, data = obj.metadata.resource_version, obj.spec.to_dict()
                    self.events.append((int(version), kind, data))
            except Exception as exc:  # noqa: BLE001 - a dropped watch: start again, and say there may be a gap
                print(f"timeline watch of {kind}: {exc!r}")
                self.gaps += 1
                version = None

    def __enter__(self) -> Timeline:
        for t in self._threads:
            t.start()
        for ready in self._ready.values():
            assert ready.wait(30), "the timeline's watches did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def ordered(self) -> list[tuple[int, str, dict[str, Any]]]:
        return sorted(self.events, key=lambda e: e[0])


def test_a_restarted_agent_clears_its_old_report_before_it_says_it_is_ready(
        control_plane, api_client, objects, namespace, tmp_path, checkpoint) -> None:
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as server:
        objects.create("ModelCache", checkpoint_model_cache(server, checkpoint))
        first = real_agent_process(control_plane.kubeconfig, objects, "agent-r", tmp_path).start()
        try:
            wait_for(lambda: agent_registered(objects, "agent-r"), timeout_s=180, message=lambda: f"registration\n{first.tail()}")
            objects.patch("CacheAgent", "agent-r", {"spec": {"holds": [{"model": "tiny-sd15"}]}})
            wait_for(lambda: any(m["name"] == "tiny-sd15" for m in (objects.get("CacheAgent", "agent-r").get("status")
                                                                     or {}).get("models", [])),
                     timeout_s=180, message=lambda: f"the model on disk\n{first.tail()}")
            # Not held any more: the restarted agent has no reason to fetch it again.
            objects.patch("CacheAgent", "agent-r", {"spec": {"holds": []}})
        finally:
            first.kill()
        shutil.rmtree(tmp_path / "agent-r" / "cache")  # a new node, or an emptyDir lost with the pod
        with Timeline(api_client, namespace, "agent-r") as timeline:
            cut = 0  # the watches started from listings taken after the kill: every event is the new process's
            second = Process(first.cmd, tmp_path / "agent-r-2.log").start()
            try:
                # (The old report says ready too: wait for the new process's own first renewal.)
                wait_for(lambda: any(k == "lease" and d.get("holder_identity") for _, k, d in timeline.events),
                         timeout_s=240, message=lambda: f"the restarted agent to renew its Lease\n{second.tail()}")
                time.sleep(3)
            finally:
                second.stop()
        after = [e for e in timeline.ordered() if e[0] > cut]
    assert timeline.gaps == 0, "a watch dropped: the timeline may have missed a change"
    statuses = [(v, d) for v, k, d in after if k == "status"]
    renewals = [(v, d) for v, k, d in after if k == "lease" and d.get("holder_identity")]
    assert statuses and renewals, after
    first_status = statuses[0][1]
    assert first_status.get("models") == [] and first_status.get("accepting") is False, \
        "the restarted agent's first write must clear the old report"
    listed = [d for _, d in statuses if any(m["name"] == "tiny-sd15" for m in d.get("models", []))]
    assert not listed, "a model from the wiped cache was reported again"
    real_report = next(v for v, d in statuses if d.get("accepting") is not False)
    assert real_report < renewals[0][0], "the agent renewed its Lease (Ready) before it reported its real status"


def test_sigterm_on_an_idle_agent_exits_within_5s_and_releases_its_lease(
        control_plane, api_client, objects, namespace, tmp_path) -> None:
    agent = real_agent_process(control_plane.kubeconfig, objects, "agent-i", tmp_path).start()
    try:
        wait_for(lambda: agent_registered(objects, "agent-i"), timeout_s=180,
                 message=lambda: f"the agent to be ready\n{agent.tail()}")
        time.sleep(2)  # its watches are open and idle
        assert agent.proc is not None
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        agent.kill()
    print(f"idle agent exited {took:.1f}s after SIGTERM")
    assert took <= 5.0, f"an idle agent took {took:.1f}s to exit after SIGTERM\n{agent.tail()}"
    assert agent.proc.returncode == 0, agent.tail()
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease("agent-i", namespace)
    assert not lease.spec.holder_identity, "the Lease was not released"
    assert (objects.get("CacheAgent", "agent-i").get("status") or {}).get("accepting") is False


def job(name: str, *, steps: int, size: int = 64) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
            "spec": {"model": "tiny-sd15", "maxAttempts": 1, "params": {
                "prompt": "a lighthouse", "steps": steps, "width": size, "height": size, "seed": 3, "sampler": "euler"}}}


def test_sigterm_drains_the_running_job_and_hands_the_queued_one_back_at_once(
        control_plane, objects, namespace, tmp_path, checkpoint) -> None:
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as server:
        objects.create("ModelCache", checkpoint_model_cache(server, checkpoint))
        op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log", lease_grace_s=3.0).start()
        a = real_agent_process(control_plane.kubeconfig, objects, "agent-a", tmp_path,
                               "--shutdown-grace-s", "120").start()
        b = real_agent_process(control_plane.kubeconfig, objects, "agent-b", tmp_path).start()

        def status(name: str) -> dict[str, Any]:
            return objects.get("GenerationJob", name).get("status") or {}

        try:
            for name, proc in (("agent-a", a), ("agent-b", b)):
                wait_for(lambda name=name: agent_registered(objects, name), timeout_s=180,
                         message=lambda proc=proc: f"the agent to register\n{proc.tail()}")
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": True}})  # both jobs go to A
            # Seconds of generation (a tiny model at 64x64 would be done in a fraction of one), so that the
            # second job is still queued behind it when the agent is told to stop.
            objects.create("GenerationJob", job("running", steps=60, size=256))
            wait_for(lambda: (status("running").get("progress") or {}).get("step", 0) >= 1, timeout_s=180,
                     message=lambda: f"the first job to be generating on agent-a: {status('running')}\n{a.tail()}")
            objects.create("GenerationJob", job("queued", steps=2))
            wait_for(lambda: objects.get("GenerationJob", "queued")["metadata"].get("labels", {}).get(
                "stoker.dev/agent") == "agent-a", timeout_s=60, message="the second job to be bound to agent-a")
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            handed_back = wait_for(
                lambda: any(h.get("reason") == "AgentStopping" for h in status("queued").get("history", [])),
                timeout_s=30, message=lambda: f"the queued job to be handed back: {status('queued')}\n{a.tail()}")
            back_s = time.monotonic() - signalled
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": False}})
            a.proc.wait(timeout=120)
            running = status("running")
            queued = wait_for(lambda: status("queued").get("phase") in ("Succeeded", "Failed") and status("queued"),
                              timeout_s=240, message=lambda: f"the queued job to finish on agent-b: {status('queued')}")
        finally:
            a.kill()
            b.stop()
            op.stop()
    print(f"queued job handed back {back_s:.1f}s after SIGTERM")
    assert handed_back
    assert (running["phase"], running["agent"], running["attempt"]) == ("Succeeded", "agent-a", 1), running
    assert a.proc.returncode == 0
    assert queued["phase"] == "Succeeded" and queued["agent"] == "agent-b", queued
    assert [(h["attempt"], h["agent"], h["outcome"], h["reason"]) for h in queued["history"]] == [
        (1, "agent-a", "Failed", "AgentStopping"), (2, "agent-b", "Succeeded", "")]
