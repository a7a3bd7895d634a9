"""The agent process with the ComfyUI runner, against the real API server and a ComfyUI stand-in.

The stand-in (stoker.testing.comfyui_stub) speaks only ComfyUI's documented HTTP API and
reads the model folder the agent manages, as ComfyUI does.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from PIL import Image

from stoker import kube
from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION
from stoker.testing import tiny_models
from stoker.testing.comfyui_stub import ComfyUIStub
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, wait_for

BIN = pathlib.Path(sys.executable).parent
AGENT = "comfy-agent"
KINDS = {"ckpt": "checkpoint", "lora": "lora", "vae": "vae"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("models")
    return {"ckpt": tiny_models.write_tiny_sd15(d / "ckpt.safetensors", seed=1),
            "lora": tiny_models.write_tiny_lora(d / "lora.safetensors", seed=2),
            "vae": tiny_models.write_tiny_vae(d / "vae.safetensors", seed=3)}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyUIStub]:
    with ComfyUIStub(tmp_path_factory.mktemp("comfyui")) as stub:
        yield stub


@pytest.fixture(scope="module")
def objects(control_plane, api_client) -> kube.Objects:
    ns = f"comfy-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    return kube.Objects(api_client, ns)


@pytest.fixture(scope="module")
def agent(control_plane, objects, models, comfy, tmp_path_factory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("agent")
    with ModelServer({f"{k}.safetensors": v for k, v in models.items()}) as server:
        for name, path in models.items():
            objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                          "metadata": {"name": name}, "spec": {"kind": KINDS[name], "replicas": 0,
                                                                               "source": {"url": server.url(f"{name}.safetensors"),
                                                                                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}})
        objects.core.create_namespaced_pod(objects.namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name=AGENT),
            spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="stoker:dev")])))
        proc = Process([str(BIN / "stoker-agent"), "--kubeconfig", str(control_plane.kubeconfig),
                        "--namespace", objects.namespace, "--pod-name", AGENT, "--cache-dir", str(work / "cache"),
                        "--results-dir", str(work / "results"), "--allow-http", "--metrics-port", "0",
                        "--lease-duration-s", "6", "--lease-renew-interval-s", "1", "--status-min-interval-s", "0.2",
                        "--device", "cpu", "--runner", "comfyui", "--comfyui-url", comfy.url,
                        "--comfyui-models-dir", str(comfy.models_dir), "--comfyui-poll-interval-s", "0.05",
                        "--gpu-model", "NVIDIA L40S", "--gpu-vram-bytes", "48GiB"],
                       work / "agent.log").start()
        try:
            wait_for(lambda: objects.get("CacheAgent", AGENT).get("status", {}).get("slots"), timeout_s=120,
                     message=lambda: "the agent to register\n" + proc.tail())
            yield {"proc": proc, "cache": work / "cache"}
        finally:
            proc.stop()
            print(proc.tail(60))


def submit(objects: kube.Objects, name: str, **spec: Any) -> None:
    params = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 72, "seed": 7, "sampler": "euler_a"}
    params.update(spec.pop("params", {}))
    objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                     "metadata": {"name": name}, "spec": {"model": "ckpt", "params": params, **spec}})
    obj = objects.get("GenerationJob", name)
    body = objects.patch("GenerationJob", name, {"metadata": {"labels": {AGENT_LABEL: AGENT},
                                                              "annotations": {ATTEMPT_ANNOTATION: "1"}}},
                         resource_version=obj["metadata"]["resourceVersion"])
    try:  # as the operator binds: never set the phase back once the agent has moved the job on
        objects.patch_status("GenerationJob", name, {"phase": "Scheduled", "agent": AGENT, "attempt": 1},
                             resource_version=body["metadata"]["resourceVersion"])
    except ApiException as exc:
        if exc.status != 409:
            raise


def status_of(objects: kube.Objects, name: str) -> dict[str, Any]:
    return objects.get("GenerationJob", name).get("status", {})


def finished(objects: kube.Objects, name: str) -> dict[str, Any]:
    return wait_for(lambda: (s := status_of(objects, name)).get("phase") in ("Succeeded", "Failed") and s,
                    timeout_s=120, message=f"job {name} to finish")


def test_a_job_runs_on_comfyui_with_files_from_the_agents_cache_and_nothing_in_the_agents_vram(
        agent, objects, comfy) -> None:
    submit(objects, "comfy-first")
    status = finished(objects, "comfy-first")
    assert status["phase"] == "Succeeded", status
    assert status["cacheHit"] == "miss"
    image = Image.open(io.BytesIO(pathlib.Path(status["result"]["location"]).read_bytes()))
    assert image.size == (64, 72)
    assert "Sampler: euler_a" in image.text["parameters"]
    (link,) = (comfy.models_dir / "checkpoints" / "stoker").iterdir()
    assert link.is_symlink()
    assert agent["cache"].resolve() in pathlib.Path(os.readlink(link)).parents
    # The CacheAgent report is debounced: wait for the one that lists the checkpoint.
    ca = wait_for(lambda: (st := objects.get("CacheAgent", AGENT)["status"])
                  and any(m["name"] == "ckpt" for m in st["models"]) and st,
                  timeout_s=30, message="the CacheAgent to list the checkpoint")
    assert ca["vram"]["usedBytes"] == 0 and ca["hotModels"] == 0  # ComfyUI holds the only loaded copy
    # The agent runs on CPU, but placement sees ComfyUI's GPU, not the CPU agent's host-memory budget.
    assert (ca["gpu"]["model"], ca["gpu"]["vramBytes"], ca["vram"]["budgetBytes"]) == ("NVIDIA L40S", 48 * 2**30,
                                                                                       48 * 2**30)
    assert {m["name"]: m["tier"] for m in ca["models"]}["ckpt"] == "disk"


def test_loras_vae_and_a_batch_reach_comfyui_and_come_back_as_one_strip(agent, objects, comfy) -> None:
    submit(objects, "comfy-styled", loras=[{"name": "lora", "weight": 0.7}], vae="vae", params={"batchSize": 2})
    status = finished(objects, "comfy-styled")
    assert status["phase"] == "Succeeded", status
    graph = list(comfy.prompts.values())[-1]
    types = {node["class_type"]: node["inputs"] for node in graph.values()}
    # The agent's files sit in its own subfolder of each model folder; workflows name them stoker/<file>.
    assert types["LoraLoader"]["strength_model"] == 0.7
    assert types["LoraLoader"]["lora_name"].startswith("stoker/lora-")
    assert types["VAELoader"]["vae_name"].startswith("stoker/vae-")
    assert types["EmptyLatentImage"]["batch_size"] == 2
    assert Image.open(io.BytesIO(pathlib.Path(status["result"]["location"]).read_bytes())).size == (128, 72)


def test_comfyui_running_out_of_memory_is_a_retryable_insufficient_vram_failure(agent, objects, comfy) -> None:
    comfy.fail_next = "CUDA out of memory. Tried to allocate 2.00 GiB"
    submit(objects, "comfy-oom")
    failure = wait_for(lambda: status_of(objects, "comfy-oom").get("attemptFailure"), timeout_s=60,
                       message="the attempt failure")
    assert failure["reason"] == "InsufficientVRAM" and failure["retryable"] is True
    assert "out of memory" in failure["message"]


def test_deleting_a_job_interrupts_its_comfyui_prompt(agent, objects, comfy) -> None:
    comfy.hold()
    try:
        submit(objects, "comfy-cancelled")
        assert comfy.running.wait(timeout=60)
        interrupts = len(comfy.interrupts)
        objects.delete("GenerationJob", "comfy-cancelled")
        wait_for(lambda: len(comfy.interrupts) > interrupts, timeout_s=30, message="ComfyUI to be interrupted")
        wait_for(lambda: "job comfy-cancelled attempt 1 cancelled" in agent["proc"].log_path.read_text(),
                 timeout_s=30, message="the agent to cancel the job")
    finally:
        comfy.release()
