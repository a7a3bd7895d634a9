"""The real agent process against the real API server: jobs become PNGs, failures get reasons.

The test plays the operator's part of the protocol (binding by label + attempt
annotation) so the agent is checked on its own.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pathlib
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from PIL import Image

from stoker import kube
from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, wait_for

BIN = pathlib.Path(sys.executable).parent
AGENT = "agent-0"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "tiny-sd15": tiny_models.write_tiny_sd15(d / "tiny-sd15.safetensors", seed=1),
        "tiny-lora": tiny_models.write_tiny_lora(d / "tiny-lora.safetensors", seed=2),
        "tiny-vae": tiny_models.write_tiny_vae(d / "tiny-vae.safetensors", seed=3),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, pathlib.Path]) -> Iterator[ModelServer]:
    with ModelServer({f"{k}.safetensors": v for k, v in models.items()} | {"corrupt.safetensors": b"not the file"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def ns(control_plane, api_client) -> str:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


@pytest.fixture(scope="module")
def objects(api_client, ns) -> kube.Objects:
    return kube.Objects(api_client, ns)


@pytest.fixture(scope="module")
def agent(control_plane, objects, ns, server, models, tmp_path_factory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("agent")
    objects.core.create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name=AGENT),
        spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="stoker:dev")])))
    for name in models:
        kind = {"tiny-sd15": "checkpoint", "tiny-lora": "lora", "tiny-vae": "vae"}[name]
        objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                      "metadata": {"name": name}, "spec": {"kind": kind, "replicas": 0, "source": {
                                          "url": server.url(f"{name}.safetensors"),
                                          "sha256": hashlib.sha256(models[name].read_bytes()).hexdigest()}}})
    proc = Process([str(BIN / "stoker-agent"), "--kubeconfig", str(control_plane.kubeconfig), "--namespace", ns,
                    "--pod-name", AGENT, "--node-name", "node-a", "--cache-dir", str(work / "cache"),
                    "--results-dir", str(work / "results"), "--allow-http", "--metrics-port", "0",
                    "--lease-duration-s", "6", "--lease-renew-interval-s", "1", "--status-min-interval-s", "0.2",
                    "--model-not-found-grace-s", "1", "--device", "cpu", "--vram-budget-bytes", "1GiB"],
                   work / "agent.log").start()
    try:
        wait_for(lambda: objects.get("CacheAgent", AGENT).get("status", {}).get("slots"), timeout_s=120,
                 message=lambda: "the agent to register\n" + proc.tail())
        yield {"proc": proc, "results": work / "results"}
    finally:
        proc.stop()
        print(proc.tail(80))


def submit(objects: kube.Objects, name: str, *, model: str = "tiny-sd15", bind: bool = True, **spec: Any) -> None:
    params = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 7, "sampler": "euler"}
    params.update(spec.pop("params", {}))
    objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                     "metadata": {"name": name}, "spec": {"model": model, "params": params, **spec}})
    if bind:
        bind_job(objects, name, attempt=1)


def bind_job(objects: kube.Objects, name: str, *, attempt: int, agent: str = AGENT) -> None:
    obj = objects.get("GenerationJob", name)
    objects.patch("GenerationJob", name, {"metadata": {"labels": {AGENT_LABEL: agent},
                                                       "annotations": {ATTEMPT_ANNOTATION: str(attempt)}}},
                  resource_version=obj["metadata"]["resourceVersion"])
    objects.patch_status("GenerationJob", name, {"phase": "Scheduled", "agent": agent, "attempt": attempt})


def finished(objects: kube.Objects, name: str, timeout_s: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (s := objects.get("GenerationJob", name).get("status", {})).get("phase") in ("Succeeded", "Failed") and s,
                    timeout_s=timeout_s, message=f"job {name} to finish")


def test_the_agent_registers_its_cache_agent_owned_by_its_pod_and_renews_its_lease(agent, objects, ns) -> None:
    ca = objects.get("CacheAgent", AGENT)
    assert ca["metadata"]["ownerReferences"][0]["kind"] == "Pod"
    assert ca["metadata"]["ownerReferences"][0]["name"] == AGENT
    assert ca["status"]["node"] == "node-a"
    assert ca["status"]["gpu"]["model"] == "cpu"
    assert ca["status"]["freeSlots"] == 1
    leases = client.CoordinationV1Api(objects.custom.api_client)
    first = leases.read_namespaced_lease(AGENT, ns).spec.renew_time
    wait_for(lambda: leases.read_namespaced_lease(AGENT, ns).spec.renew_time > first, timeout_s=10,
             message="the lease to be renewed")


def test_a_bound_job_becomes_a_png_of_the_requested_size_with_timings(agent, objects) -> None:
    submit(objects, "first", params={"width": 64, "height": 96})
    status = finished(objects, "first")
    assert status["phase"] == "Succeeded", status
    assert status["cacheHit"] == "miss"
    result = status["result"]
    png = pathlib.Path(result["location"]).read_bytes()
    assert hashlib.sha256(png).hexdigest() == result["sha256"] and len(png) == result["bytes"]
    image = Image.open(io.BytesIO(png))
    assert image.size == (64, 96)
    assert "a lighthouse" in image.text["parameters"]
    for key in ("queuedSeconds", "downloadSeconds", "loadSeconds", "inferenceSeconds", "totalSeconds"):
        assert status["timings"][key] >= 0
    assert status["progress"] == {"step": 3, "steps": 3}
    ca = objects.get("CacheAgent", AGENT)["status"]
    names = {m["name"]: m for m in ca["models"]}
    assert names["tiny-sd15"]["tier"] == "vram"


def test_the_same_seed_gives_the_same_bytes_and_the_second_job_hits_vram(agent, objects) -> None:
    submit(objects, "again-a")
    submit(objects, "again-b")
    a, b = finished(objects, "again-a"), finished(objects, "again-b")
    assert a["result"]["sha256"] == b["result"]["sha256"]
    assert b["cacheHit"] == "vram"
    submit(objects, "other-seed", params={"seed": 8})
    assert finished(objects, "other-seed")["result"]["sha256"] != a["result"]["sha256"]


def test_lora_and_vae_change_the_image(agent, objects) -> None:
    submit(objects, "plain")
    submit(objects, "styled", loras=[{"name": "tiny-lora", "weight": 1.0}], vae="tiny-vae")
    plain, styled = finished(objects, "plain"), finished(objects, "styled")
    assert styled["phase"] == "Succeeded", styled
    assert styled["result"]["sha256"] != plain["result"]["sha256"]


def test_the_image_is_put_to_the_output_url(agent, objects) -> None:
    received: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802
            received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/bucket/out.png?X-Signature=secret123"
        submit(objects, "put-out", output={"url": url})
        status = finished(objects, "put-out")
        assert status["phase"] == "Succeeded", status
        assert hashlib.sha256(received["/bucket/out.png?X-Signature=secret123"]).hexdigest() == status["result"]["sha256"]
        assert "secret123" not in json.dumps(status)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_missing_model_fails_the_job_with_model_not_found(agent, objects) -> None:
    submit(objects, "no-model", model="does-not-exist")
    status = finished(objects, "no-model")
    assert status["phase"] == "Failed"
    assert status["reason"] == "ModelNotFound"
    assert "does-not-exist" in status["message"]


def test_a_checksum_mismatch_is_reported_on_the_job_and_the_cache_agent(agent, objects, server) -> None:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "corrupt"},
                                  "spec": {"replicas": 0, "source": {"url": server.url("corrupt.safetensors"), "sha256": "0" * 64}}})
    submit(objects, "bad-bytes", model="corrupt")
    failure = wait_for(lambda: objects.get("GenerationJob", "bad-bytes").get("status", {}).get("attemptFailure"),
                       timeout_s=60, message="the attempt failure")
    assert failure["reason"] == "ChecksumMismatch"
    assert failure["retryable"] is False
    failures = wait_for(lambda: objects.get("CacheAgent", AGENT)["status"].get("modelFailures"), timeout_s=10,
                        message="modelFailures in the CacheAgent status")
    assert failures[0]["name"] == "corrupt" and failures[0]["reason"] == "ChecksumMismatch"


def test_jobs_not_bound_to_this_agent_are_left_alone(agent, objects) -> None:
    submit(objects, "unbound", bind=False)
    submit(objects, "elsewhere", bind=False)
    bind_job(objects, "elsewhere", attempt=1, agent="someone-else")
    submit(objects, "ours-after")
    assert finished(objects, "ours-after")["phase"] == "Succeeded"
    # The agent ran a later job of its own, so it has seen the earlier two and skipped them.
    assert objects.get("GenerationJob", "unbound").get("status", {}).get("phase", "Pending") == "Pending"
    assert objects.get("GenerationJob", "elsewhere")["status"]["phase"] == "Scheduled"
    assert "unbound" not in agent["proc"].log_path.read_text()


def test_holds_in_the_spec_are_downloaded_and_reported_as_held(agent, objects) -> None:
    objects.patch("CacheAgent", AGENT, {"spec": {"holds": [{"model": "tiny-vae"}]}})
    model = wait_for(lambda: next((m for m in objects.get("CacheAgent", AGENT)["status"]["models"]
                                   if m["name"] == "tiny-vae" and m["held"]), None), timeout_s=60,
                     message="tiny-vae held")
    assert model["sizeBytes"] > 0
    objects.patch("CacheAgent", AGENT, {"spec": {"holds": []}})
    wait_for(lambda: not any(m["held"] for m in objects.get("CacheAgent", AGENT)["status"]["models"]), timeout_s=10,
             message="the hold released")


def test_deleting_a_running_job_cancels_it(agent, objects) -> None:
    submit(objects, "long", params={"steps": 150, "width": 128, "height": 128})
    wait_for(lambda: objects.get("GenerationJob", "long").get("status", {}).get("progress", {}).get("step", 0) > 0,
             timeout_s=60, message="the long job to make progress")
    objects.delete("GenerationJob", "long")
    wait_for(lambda: "job long attempt 1 cancelled" in agent["proc"].log_path.read_text(), timeout_s=30,
             message="the agent to cancel the job")
    assert not list(agent["results"].glob("*long*"))
