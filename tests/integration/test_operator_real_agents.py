"""The operator with real `stoker-agent` processes and the tiny model: kill -9 of an agent mid-job.

Everything is real: the API server, the operator process, two agent processes that
download the generated SD 1.5-architecture checkpoint from a local HTTP server and
run it on the CPU. The job runs on agent A (B is cordoned until then) with enough
steps to still be running when A is killed without a goodbye; after the Lease grace
the operator requeues it and B finishes it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import (agent_registered, checkpoint_model_cache,
                                            operator_process, real_agent_process, wait_for)



@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


@pytest.fixture
def checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    return tiny_models.write_tiny_sd15(tmp_path / "tiny-sd15.safetensors", seed=11)




def test_a_real_agent_killed_mid_job_loses_the_job_to_the_other_after_the_lease_grace(
        control_plane, objects, namespace, tmp_path, checkpoint) -> None:
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as server:
        objects.create("ModelCache", checkpoint_model_cache(server, checkpoint))
        op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log", lease_grace_s=3.0).start()
        a = real_agent_process(control_plane.kubeconfig, objects, "agent-a", tmp_path).start()
        b = real_agent_process(control_plane.kubeconfig, objects, "agent-b", tmp_path).start()
        try:
            for name, proc in (("agent-a", a), ("agent-b", b)):
                wait_for(lambda name=name: agent_registered(objects, name), timeout_s=180,
                         message=lambda proc=proc: f"the agent to register\n{proc.tail()}")
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": True}})  # the job must start on A
            objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                             "metadata": {"name": "long"}, "spec": {"model": "tiny-sd15", "params": {
                                                 "prompt": "a lighthouse", "steps": 150, "width": 128, "height": 128,
                                                 "seed": 3, "sampler": "euler"}}})

            def status() -> dict[str, Any]:
                return objects.get("GenerationJob", "long").get("status") or {}

            wait_for(lambda: status().get("phase") == "Running" and (status().get("progress") or {}).get("step", 0) >= 1,
                     timeout_s=180, message=lambda: f"the job to be generating on agent-a: {status()}\n{a.tail()}")
            assert status()["agent"] == "agent-a"
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": False}})
            a.kill()
            done = wait_for(lambda: status().get("phase") in ("Succeeded", "Failed") and len(status().get("history", [])) == 2
                            and status(), timeout_s=420, interval_s=0.5,
                            message=lambda: f"the job to finish on agent-b: {status()}\n{b.tail()}\n{op.tail()}")
        finally:
            a.kill()
            b.stop()
            op.stop()
    assert done["phase"] == "Succeeded", done
    assert done["agent"] == "agent-b"
    assert done["attempt"] == 2
    assert [(h["attempt"], h["agent"], h["outcome"], h["reason"]) for h in done["history"]] == [
        (1, "agent-a", "Requeued", "AgentLost"), (2, "agent-b", "Succeeded", "")]
    image = pathlib.Path(done["result"]["location"])
    assert image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ca = objects.get("CacheAgent", "agent-a")
    ready = next(c for c in ca["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "LeaseExpired")
