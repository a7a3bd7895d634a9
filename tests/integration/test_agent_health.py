"""A real `stoker-agent`'s probes follow its Lease renewals: ready while they succeed, unready at
once when they stop, dead (so the kubelet restarts it) when they keep failing, and back when they
succeed again. The renewals are stopped the way a broken identity stops them: the API server
refuses them once the agent's RoleBinding is gone."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import yaml
from kubernetes import client

from stoker import kube
from stoker.testing.operator_harness import BIN, Process, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"
HEALTH = re.compile(r"serving /healthz and /readyz on 127\.0\.0\.1:(\d+)")
BINDING = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": "agent-user"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "stoker-agent"},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "stoker-agent"}]}


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())["detail"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["detail"]


def test_the_agent_probes_follow_its_lease_renewals(helm: str, control_plane, namespace: str, api_client,
                                                    kubectl, tmp_path: pathlib.Path) -> None:
    rbac = subprocess.run([helm, "template", "stoker", str(CHART), "--namespace", namespace,
                           "--show-only", "templates/rbac.yaml"], check=True, capture_output=True, text=True).stdout
    kubectl("apply", "-f", "-", input_text=rbac)
    kubectl("apply", "-f", "-", input_text=json.dumps(BINDING))
    objects = kube.Objects(api_client, namespace)
    objects.core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="agent-h"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="stoker")])))
    agent = Process([
        str(BIN / "stoker-agent"), "--kubeconfig", str(control_plane.kubeconfig_for("stoker-agent")),
        "--namespace", namespace, "--pod-name", "agent-h", "--cache-dir", str(tmp_path / "cache"),
        "--results-dir", str(tmp_path / "results"), "--device", "cpu", "--vram-budget-bytes", "1GiB",
        "--torch-threads", "1", "--no-metrics-enabled", "--health-port", "0", "--lease-duration-s", "6",
        "--lease-renew-interval-s", "1", "--liveness-failing-renewals-s", "12"], tmp_path / "agent-h.log").start()
    try:
        port = int(wait_for(lambda: HEALTH.search(agent.log_path.read_text()), timeout_s=120,
                            message=lambda: "the health endpoint\n" + agent.tail()).group(1))
        wait_for(lambda: probe(port, "/readyz")[0] == 200, timeout_s=120,
                 message=lambda: f"the agent to be ready: {probe(port, '/readyz')}\n" + agent.tail())
        assert probe(port, "/healthz")[0] == 200

        kubectl("delete", "rolebinding", "agent-user")
        # Unready once no renewal succeeded for the Lease's duration, while still alive ...
        wait_for(lambda: probe(port, "/readyz")[0] == 503, timeout_s=30, message="the agent to turn unready")
        status, detail = probe(port, "/healthz")
        assert status == 200, detail
        # ... and dead once every renewal has failed for the liveness limit: the kubelet would restart it.
        wait_for(lambda: probe(port, "/healthz")[0] == 503, timeout_s=40, message="the liveness probe to fail")
        assert "every Lease renewal failed" in probe(port, "/healthz")[1]
        assert "lease renewal failed" in agent.log_path.read_text()

        kubectl("apply", "-f", "-", input_text=json.dumps(BINDING))
        wait_for(lambda: probe(port, "/healthz")[0] == 200 and probe(port, "/readyz")[0] == 200, timeout_s=40,
                 message="the probes to recover with the renewals")
        assert agent.alive

        # SIGTERM: the drain ends well within the grace period the chart gives the agent pod.
        grace_s = yaml.safe_load((CHART / "values.yaml").read_text())["agent"]["terminationGracePeriodSeconds"]
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(timeout=grace_s)
        drain_s = time.monotonic() - started
        print(f"agent drained in {drain_s:.1f}s after SIGTERM (chart grace period {grace_s}s)")
        assert drain_s < grace_s
    finally:
        agent.stop()
