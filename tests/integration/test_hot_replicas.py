"""Hot replicas with the real agent: raising hotReplicas loads copies on distinct agents, lowering it unloads them.

Everything is real: the API server, the operator process and three `stoker-agent`
processes that download the generated checkpoint from a local HTTP server and load it
into their device tier (host memory on these CPU agents). The test prints how long each
step took, from the spec change to what the CacheAgents and the ModelCache report.
"""

from __future__ import annotations

import hashlib
import pathlib
import time
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import operator_process, real_agent_process, wait_for

AGENTS = ("agent-a", "agent-b", "agent-c")


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


def reported(objects: kube.Objects, model: str) -> dict[str, dict[str, Any]]:
    """Agent -> its report of `model` (tier, hot, ...), for the agents that hold it."""
    out = {}
    for ca in objects.list("CacheAgent")["items"]:
        for m in (ca.get("status") or {}).get("models", []):
            if m["name"] == model:
                out[ca["metadata"]["name"]] = m
    return out


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


@pytest.mark.timeout(900)  # three agent processes start and stop on a loaded 2-core machine
def test_raising_hot_replicas_loads_copies_on_distinct_agents_and_lowering_it_unloads_them(
        control_plane, objects, namespace, tmp_path) -> None:
    checkpoint = tiny_models.write_tiny_sd15(tmp_path / "tiny-sd15.safetensors", seed=5)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    timings: dict[str, float] = {}
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as server:
        objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                      "metadata": {"name": "tiny"}, "spec": {"replicas": 2, "source": {
                                          "url": server.url("tiny-sd15.safetensors"), "sha256": digest}}})
        op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log").start()
        agents = [real_agent_process(control_plane.kubeconfig, objects, name, tmp_path).start() for name in AGENTS]
        try:
            def mc() -> dict[str, Any]:
                return objects.get("ModelCache", "tiny")

            def logs() -> str:
                return "\n".join(p.tail(30) for p in (*agents, op))

            wait_for(lambda: sum(1 for m in reported(objects, "tiny").values() if m["held"]) == 2
                     and condition(mc(), "Ready").get("status") == "True", timeout_s=300, interval_s=0.5,
                     message=lambda: f"two held disk copies: {mc().get('status')}\n{logs()}")
            assert not any(m.get("hot") for m in reported(objects, "tiny").values())

            t0 = time.monotonic()
            objects.patch("ModelCache", "tiny", {"spec": {"hotReplicas": 2}})
            hot = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(
                {a: m for a, m in reported(objects, "tiny").items() if m.get("hot") == "vram" and m["tier"] == "vram"}),
                timeout_s=120, interval_s=0.2, message=lambda: f"two loaded copies: {reported(objects, 'tiny')}\n{logs()}")
            timings["raise: copies loaded and reported"] = time.monotonic() - t0
            wait_for(lambda: condition(mc(), "Ready").get("status") == "True"
                     and mc()["status"]["copies"]["vram"] == 2 and mc()["status"]["desiredHotReplicas"] == 2,
                     timeout_s=60, interval_s=0.2, message=lambda: f"the ModelCache to count them: {mc().get('status')}")
            timings["raise: ModelCache Ready with 2 of 2 loaded"] = time.monotonic() - t0
            assert len(set(hot)) == 2  # distinct agents
            ready = condition(mc(), "Ready")
            assert "2 of 2 loaded" in ready["message"], ready
            # The two hot copies are on the two agents holding the disk copies: nothing was downloaded again.
            assert {a for a, m in reported(objects, "tiny").items() if m["held"]} == set(hot)

            t1 = time.monotonic()
            objects.patch("ModelCache", "tiny", {"spec": {"hotReplicas": 0}})
            wait_for(lambda: not any(m.get("hot") or m["tier"] == "vram" for m in reported(objects, "tiny").values()),
                     timeout_s=120, interval_s=0.2, message=lambda: f"the copies to unload: {reported(objects, 'tiny')}\n{logs()}")
            timings["lower: copies unloaded and reported"] = time.monotonic() - t1
            wait_for(lambda: mc()["status"]["copies"]["vram"] == 0 and mc()["status"]["desiredHotReplicas"] == 0
                     and condition(mc(), "Ready").get("status") == "True", timeout_s=60, interval_s=0.2,
                     message=lambda: f"the ModelCache to count none: {mc().get('status')}")
            timings["lower: ModelCache shows 0 loaded"] = time.monotonic() - t1
            # The disk copies stay held: only the loaded copies went.
            assert sum(1 for m in reported(objects, "tiny").values() if m["held"]) == 2

            def events(reason: str) -> list[str]:
                return [e.message for e in objects.core.list_namespaced_event(
                    namespace, field_selector="involvedObject.name=tiny").items if e.reason == reason]

            wait_for(lambda: len(events("HotReplicaAdded")) == 2 and len(events("HotReplicaReleased")) == 2,
                     timeout_s=30, message=lambda: f"the Events: {events('HotReplicaAdded')} {events('HotReplicaReleased')}")
            assert all("ordered to keep it loaded" in m for m in events("HotReplicaAdded"))
            for what, seconds in timings.items():
                print(f"hot replicas: {what}: {seconds:.2f} s")
        finally:
            for p in agents:
                p.stop()
            op.stop()
