"""Fleet-wide use ranks end to end: the operator counts GenerationJobs into ModelCache status.useRank
(each job once, also across a restart), and a real `stoker-agent` that downloads the model, for a
job or for a replica order, starts its copy from that rank and reports it in CacheAgent status.

Everything is real: the API server, the operator process, an agent process fetching the tiny
SD 1.5-architecture checkpoint from a local HTTP server and running a job on the CPU.
"""

from __future__ import annotations

import hashlib
import pathlib
import time

import pytest
from kubernetes import client

from stoker import kube, userank
from stoker.operator.state import parse_time
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import operator_process, real_agent_process, wait_for

JOBS_PER_MODEL = 6


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


@pytest.fixture
def checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    return tiny_models.write_tiny_sd15(tmp_path / "tiny-sd15.safetensors", seed=13)




def model_cache(objects: kube.Objects, name: str, server: ModelServer, checkpoint: pathlib.Path) -> None:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                  "metadata": {"name": name}, "spec": {"replicas": 0, "source": {
                                      "url": server.url("tiny-sd15.safetensors"),
                                      "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
                                      "sizeBytes": checkpoint.stat().st_size}}})


def job(objects: kube.Objects, name: str, model: str) -> float:
    """Create a small job; returns its creation time as the API server stamped it."""
    body = objects.create("GenerationJob", {
        "apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
        "spec": {"model": model, "params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64,
                                            "seed": 3, "sampler": "euler"}}})
    created = parse_time(body["metadata"]["creationTimestamp"])
    assert created is not None
    return created


def expected_rank(created: list[float]) -> float:
    return userank.FleetRank().count_all(created).rank_s  # type: ignore[return-value]


def published(objects: kube.Objects, model: str) -> float | None:
    return (objects.get("ModelCache", model).get("status") or {}).get("useRank")


def wait_published(objects: kube.Objects, model: str, created: list[float], op: Process) -> float:
    want = expected_rank(created)
    return wait_for(lambda: (rank := published(objects, model)) is not None and abs(rank - want) < 0.05 and rank,
                    timeout_s=60, message=lambda: f"useRank of {model} to be {want} (is {published(objects, model)})\n"
                                                  f"{op.tail()}")


def agent_rank(objects: kube.Objects, agent: str, model: str) -> float | None:
    try:
        models = objects.get("CacheAgent", agent).get("status", {}).get("models", [])
    except client.exceptions.ApiException:
        return None
    return next((m.get("rank") for m in models if m["name"] == model), None)


def test_jobs_raise_a_models_use_rank_once_each_and_an_agent_that_downloads_it_starts_from_it(
        control_plane, objects, namespace, tmp_path, checkpoint) -> None:
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as server:
        model_cache(objects, "busy", server, checkpoint)  # fetched by the agent for a job
        model_cache(objects, "held", server, checkpoint)  # fetched by the agent for a replica order
        op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator-1.log").start()
        agent: Process | None = None
        try:
            # No agent yet: the jobs stay pending, and the operator counts them as they are created.
            created = {m: [job(objects, f"{m}-{i}", m) for i in range(JOBS_PER_MODEL)] for m in ("busy", "held")}
            first = {m: wait_published(objects, m, created[m], op) for m in created}
            through = parse_time(objects.get("ModelCache", "busy")["status"]["useRankCountedThrough"])
            assert through == max(created["busy"])
            assert first["busy"] == pytest.approx(max(created["busy"]) + userank.DEFAULT_HALF_LIFE_S * 2.585, abs=60)

            # A restarted operator sees the same jobs again and counts only the one created since.
            op.stop()
            wait_for(lambda: time.time() > through + 1.05, timeout_s=5, message="the next second")
            created["busy"].append(job(objects, "busy-late", "busy"))
            op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator-2.log").start()
            rank_busy = wait_published(objects, "busy", created["busy"], op)
            assert published(objects, "held") == first["held"], "nothing new for held: its rank stays"

            # The agent will run one job of busy (one use of its own) and hold a copy of held (no use).
            for name in [f"busy-{i}" for i in range(JOBS_PER_MODEL)] + [f"held-{i}" for i in range(JOBS_PER_MODEL)]:
                objects.delete("GenerationJob", name)
            objects.patch("ModelCache", "held", {"spec": {"replicas": 1}})
            agent = real_agent_process(control_plane.kubeconfig, objects, "agent-a", tmp_path).start()
            done = wait_for(lambda: (objects.get("GenerationJob", "busy-late").get("status") or {}).get("phase")
                            in ("Succeeded", "Failed") and objects.get("GenerationJob", "busy-late")["status"],
                            timeout_s=240, interval_s=0.5, message=lambda: f"busy-late to finish\n{agent.tail()}")
            assert done["phase"] == "Succeeded", done
            ranks = wait_for(lambda: (b := agent_rank(objects, "agent-a", "busy")) is not None
                             and (h := agent_rank(objects, "agent-a", "held")) is not None and (b, h),
                             timeout_s=120, message=lambda: f"agent-a to report both models\n{agent.tail()}")
        finally:
            if agent is not None:
                agent.stop()
            op.stop()
    assert published(objects, "busy") == rank_busy and published(objects, "held") == first["held"]
    # Its own single use would rank busy at about now, and held (never used there) at its download:
    # both copies rank by the jobs counted across the fleet instead.
    assert ranks[0] >= rank_busy > time.time() + userank.DEFAULT_HALF_LIFE_S
    assert ranks[1] >= first["held"] > time.time() + userank.DEFAULT_HALF_LIFE_S
