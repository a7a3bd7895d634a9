"""The scale subresource of ModelCache with real kubectl: `kubectl scale mc/NAME --replicas=N`, what HPA reads."""

from __future__ import annotations

import json
import pathlib

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing.operator_harness import fake_agent_process, operator_process, wait_for


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


def test_kubectl_scale_sets_the_replica_target_and_the_scale_status_reports_held_copies(
        control_plane, kubectl, objects, namespace, tmp_path: pathlib.Path) -> None:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                  "metadata": {"name": "sd15"}, "spec": {"replicas": 1, "hotReplicas": 1, "source": {
                                      "url": "http://127.0.0.1:9/sd15.safetensors", "sizeBytes": 2 << 30}}})
    op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log").start()
    agents = [fake_agent_process(control_plane.kubeconfig, namespace, f"agent-{i}", tmp_path / f"agent-{i}.log",
                                 "--node", f"node-{i}").start() for i in range(3)]
    try:
        out = kubectl("scale", "mc/sd15", "--replicas=3").stdout
        assert "scaled" in out, out
        assert objects.get("ModelCache", "sd15")["spec"]["replicas"] == 3

        def scale() -> dict:
            return json.loads(kubectl("get", "--raw",
                                      f"/apis/stoker.dev/v1alpha1/namespaces/{namespace}/modelcaches/sd15/scale").stdout)

        done = wait_for(lambda: (lambda s: s if s["status"].get("replicas") == 3 else None)(scale()), timeout_s=60,
                        message=lambda: f"three held copies in the scale status: {scale()}\n{op.tail()}")
        assert done["spec"]["replicas"] == 3 and done["status"]["selector"] == "stoker.dev/model=sd15"
        wait_for(lambda: "3/3 hot 1/1" in kubectl("get", "mc", "sd15").stdout, timeout_s=30,
                 message=lambda: kubectl("get", "mc", "sd15").stdout)
        print(kubectl("get", "mc", "sd15", "-o", "wide").stdout)

        # Below hotReplicas the API server refuses, with the rule's message.
        refused = kubectl("scale", "mc/sd15", "--replicas=0", check=False)
        assert refused.returncode != 0 and "hotReplicas must not exceed replicas" in refused.stderr
        kubectl("scale", "mc/sd15", "--replicas=1")
        wait_for(lambda: scale()["status"].get("replicas") == 1, timeout_s=60,
                 message=lambda: f"the extra copies released: {scale()}")
    finally:
        for a in agents:
            a.stop()
        op.stop()
