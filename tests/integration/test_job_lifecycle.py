"""A job's life as a user sees it, on the real API server with real kubectl.

- phase Pending from the moment a job is created (a CRD default), before any controller;
- a job that cannot be placed says why (status.reason, condition Scheduled=False, a
  Warning Event FailedScheduling), as Pods do: NoReadyAgent, TooLargeForAnyAgent,
  InsufficientVRAM, ModelCacheNotFound; a missing ModelCache fails the job after its grace,
  and `kubectl wait --for=condition=Failed` sees it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing.operator_harness import fake_agent_process, operator_process, wait_for

GiB = 1 << 30


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


def model(name: str, *, size_bytes: int | None = None, kind: str = "checkpoint") -> dict[str, Any]:
    source: dict[str, Any] = {"url": f"http://127.0.0.1:9/{name}.safetensors"}
    if size_bytes:
        source["sizeBytes"] = size_bytes
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": name},
            "spec": {"replicas": 0, "kind": kind, "source": source}}


def job(name: str, model_name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
            "spec": {"model": model_name, "params": {"prompt": "a lighthouse"}, **spec}}


def test_a_new_job_reads_pending_from_its_creation_on(kubectl, objects) -> None:
    created = objects.create("GenerationJob", job("fresh", "nowhere"))
    assert created["status"]["phase"] == "Pending"  # in the create response already
    assert kubectl("get", "gj", "fresh", "-o", "jsonpath={.status.phase}").stdout == "Pending"
    table = kubectl("get", "gj", "fresh").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "MODEL", "PHASE", "PROGRESS"] and table[1].split()[:3] == [
        "fresh", "nowhere", "Pending"]


def reason_of(objects: kube.Objects, name: str) -> str | None:
    return (objects.get("GenerationJob", name).get("status") or {}).get("reason")


def scheduled_condition(objects: kube.Objects, name: str) -> dict[str, Any]:
    conds = (objects.get("GenerationJob", name).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Scheduled"), {})


def test_jobs_that_cannot_be_placed_say_why_and_a_missing_model_fails_after_its_grace(
        control_plane, kubectl, objects, namespace, tmp_path: pathlib.Path) -> None:
    objects.create("ModelCache", model("small", size_bytes=2 * GiB))
    objects.create("ModelCache", model("huge", size_bytes=100 * GiB))
    objects.create("ModelCache", model("wide", size_bytes=30 * GiB))
    objects.create("ModelCache", model("style", kind="lora"))  # no size: unknown until downloaded
    op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log").start()
    agent = None
    try:
        objects.create("GenerationJob", job("no-agent", "small"))
        wait_for(lambda: reason_of(objects, "no-agent") == "NoReadyAgent", timeout_s=60,
                 message=lambda: f"NoReadyAgent: {objects.get('GenerationJob', 'no-agent').get('status')}\n{op.tail()}")
        cond = scheduled_condition(objects, "no-agent")
        assert cond["status"] == "False" and cond["reason"] == "NoReadyAgent" and cond["observedGeneration"] == 1
        assert cond["lastTransitionTime"]
        objects.create("GenerationJob", job("no-lora", "small", loras=[{"name": "missing-style"}],
                                            missingModelGraceSeconds=8))
        wait_for(lambda: reason_of(objects, "no-lora") == "ModelCacheNotFound", timeout_s=30,
                 message=lambda: f"ModelCacheNotFound: {objects.get('GenerationJob', 'no-lora').get('status')}")
        assert "lora missing-style" in objects.get("GenerationJob", "no-lora")["status"]["message"]
        # What waiting cannot fix fails after the job's grace; kubectl wait sees the condition.
        kubectl("wait", "--for=condition=Failed", "gj/no-lora", "--timeout=60s")
        failed = objects.get("GenerationJob", "no-lora")["status"]
        assert failed["phase"] == "Failed" and failed["reason"] == "ModelCacheNotFound"
        assert {c["type"]: c["status"] for c in failed["conditions"]} == {
            "Scheduled": "False", "Succeeded": "False", "Failed": "True"}

        agent = fake_agent_process(control_plane.kubeconfig, namespace, "agent-a", tmp_path / "agent-a.log",
                                   "--slots", "2").start()  # 50 GiB of disk, 24 GiB of VRAM
        objects.create("GenerationJob", job("too-big", "huge"))
        objects.create("GenerationJob", job("too-wide", "wide"))
        objects.create("GenerationJob", job("unknown-lora", "small", loras=[{"name": "style"}]))
        wait_for(lambda: reason_of(objects, "too-big") == "TooLargeForAnyAgent"
                 and reason_of(objects, "too-wide") == "InsufficientVRAM", timeout_s=60,
                 message=lambda: f"the size reasons: {reason_of(objects, 'too-big')}, {reason_of(objects, 'too-wide')}"
                                 f"\n{op.tail()}\n{agent.tail()}")
        # The job waiting for no agent before is placed now; the one whose LoRA has no size is not held back by a guess.
        wait_for(lambda: objects.get("GenerationJob", "no-agent")["status"]["phase"] == "Succeeded"
                 and objects.get("GenerationJob", "unknown-lora")["status"]["phase"] == "Succeeded", timeout_s=60,
                 message=lambda: f"the placeable jobs to finish\n{op.tail()}\n{agent.tail()}")
        events = kubectl("get", "events", "-o", "json").stdout
        failed_scheduling = [(e["involvedObject"]["name"], e["type"], e["message"].split(":")[0])
                             for e in json.loads(events)["items"] if e["reason"] == "FailedScheduling"]
        assert {("no-agent", "Warning", "NoReadyAgent"), ("no-lora", "Warning", "ModelCacheNotFound"),
                ("too-big", "Warning", "TooLargeForAnyAgent"), ("too-wide", "Warning", "InsufficientVRAM")} <= set(
                    failed_scheduling), failed_scheduling
        table = kubectl("get", "gj", "too-big", "too-wide").stdout
        assert "TooLargeForAnyAgent" in table and "InsufficientVRAM" in table, table
    finally:
        if agent is not None:
            agent.stop()
        op.stop()
