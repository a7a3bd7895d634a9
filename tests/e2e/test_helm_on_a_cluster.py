"""Stoker installed with helm on a real one-node cluster, with the locally built images.

The steps run in order and share one release: install → first job's PNG → upgrade that
rolls the agents → an agent pod deleted mid-job → uninstall. Every step is timed (see the
"end-to-end step times" section of pytest's summary). The model file and the PNG
receiver are served on the cluster's bridge address, which the pods reach.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import pathlib
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stoker.testing import tiny_models
from stoker.testing.cluster import Cluster
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"
NAMESPACE = "stoker"
RELEASE = "stoker"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Receiver:
    """Takes the PNGs that agents PUT to their jobs' output URLs."""

    def __init__(self, host: str) -> None:
        self.received: dict[str, bytes] = {}
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_models.write_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15.safetensors", seed=5)


@pytest.fixture(scope="module")
def model_server(cluster: Cluster, checkpoint: pathlib.Path) -> Iterator[ModelServer]:
    with ModelServer({"tiny-sd15.safetensors": checkpoint}, host=cluster.gateway_ip) as server:
        yield server


@pytest.fixture(scope="module")
def receiver(cluster: Cluster) -> Iterator[Receiver]:
    r = Receiver(cluster.gateway_ip)
    yield r
    r.close()


def helm_cmd(helm: str, cluster: Cluster, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, "--kubeconfig", str(cluster.kubeconfig), "--namespace", NAMESPACE, *args],
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed: {proc.stderr}\n{cluster.log_tails(30)}"
    return proc


def chart_values(images: dict[str, str], cluster: Cluster, *, budget: str) -> list[str]:
    """helm flags: the local images (never pulled), small CPU agents, short Lease times."""
    operator_repo, operator_tag = images["operator"].rsplit(":", 1)
    agent_repo, agent_tag = images["agent"].rsplit(":", 1)
    values = {
        "image.pullPolicy": "Never",
        "operator.image.repository": operator_repo, "agent.image.repository": agent_repo,
        "operator.replicas": 1, "operator.leaseGraceSeconds": 8,
        "operator.resources.requests.cpu": "50m", "operator.resources.requests.memory": "64Mi",
        "agent.replicas": 2, "agent.gpusPerPod": 0, "agent.allowHttp": True,
        "agent.allowedHosts[0]": cluster.gateway_ip,
        "agent.cache.budget": budget, "agent.cache.sizeLimit": "1Gi", "agent.ramBudget": "256Mi",
        "agent.resources.requests.cpu": "100m", "agent.resources.requests.memory": "256Mi",
        "agent.resources.limits.memory": "3Gi",
    }
    strings = {"operator.image.tag": operator_tag, "agent.image.tag": agent_tag}
    env = {"STOKER_DEVICE": "cpu", "STOKER_TORCH_THREADS": "1", "STOKER_VRAM_BUDGET_BYTES": "1GiB",
           "STOKER_LEASE_DURATION_S": "6", "STOKER_LEASE_RENEW_INTERVAL_S": "1"}
    for i, (name, value) in enumerate(env.items()):
        strings[f"agent.extraEnv[{i}].name"] = name
        strings[f"agent.extraEnv[{i}].value"] = value
    flags = [arg for key, value in values.items()
             for arg in ("--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}")]
    return flags + [arg for key, value in strings.items() for arg in ("--set-string", f"{key}={value}")]


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("-n", NAMESPACE, *args, "-o", "json").stdout)


def pods(cluster: Cluster, component: str) -> list[dict[str, Any]]:
    return kubectl_json(cluster, "get", "pods", "-l", f"app.kubernetes.io/component={component}")["items"]


def ready(pod: dict[str, Any]) -> bool:
    return pod["metadata"].get("deletionTimestamp") is None and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def registered_agents(cluster: Cluster) -> set[str]:
    """Agents that created their CacheAgent and reported slots (they run and reach the API)."""
    items = kubectl_json(cluster, "get", "cacheagents")["items"]
    return {ca["metadata"]["name"] for ca in items if (ca.get("status") or {}).get("slots")}


def job_status(cluster: Cluster, name: str) -> dict[str, Any]:
    return kubectl_json(cluster, "get", "generationjob", name).get("status") or {}


def submit(cluster: Cluster, receiver: Receiver, name: str, *, steps: int = 4, size: int = 64) -> None:
    job = {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
           "spec": {"model": "tiny-sd15", "output": {"url": f"{receiver.url}/out/{name}.png"},
                    "params": {"prompt": "a lighthouse", "steps": steps, "width": size, "height": size,
                               "seed": 7, "sampler": "euler"}}}
    cluster.kubectl("-n", NAMESPACE, "apply", "-f", "-", input_text=json.dumps(job))


def diagnostics(cluster: Cluster) -> str:
    out = cluster.kubectl("-n", NAMESPACE, "get", "pods,cacheagents,generationjobs", "-o", "wide", check=False)
    logs = []
    for component in ("operator", "agent"):
        proc = cluster.kubectl("-n", NAMESPACE, "logs", "-l", f"app.kubernetes.io/component={component}",
                               "--tail", "40", "--all-containers", "--prefix", check=False)
        logs.append(proc.stdout + proc.stderr)
    events = cluster.kubectl("-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout
    return "\n".join([out.stdout, out.stderr, *logs, events[-4000:], cluster.log_tails(20)])


def test_helm_install_brings_the_operator_and_agents_to_ready(cluster, helm, images, steps) -> None:
    with steps("helm install → operator and 2 agents Ready and registered"):
        helm_cmd(helm, cluster, "install", RELEASE, str(CHART), "--create-namespace",
                 *chart_values(images, cluster, budget="512Mi"))
        wait_for(lambda: [p for p in pods(cluster, "operator") if ready(p)], timeout_s=300, interval_s=1,
                 message=lambda: f"the operator pod to be Ready\n{diagnostics(cluster)}")
        wait_for(lambda: len([p for p in pods(cluster, "agent") if ready(p)]) == 2, timeout_s=600, interval_s=1,
                 message=lambda: f"2 agent pods to be Ready\n{diagnostics(cluster)}")
        # The agents reached the API server through the `kubernetes` Service with their
        # service-account tokens: their CacheAgents are named after their pods.
        agent_pods = {p["metadata"]["name"] for p in pods(cluster, "agent")}
        wait_for(lambda: registered_agents(cluster) >= agent_pods, timeout_s=300, interval_s=1,
                 message=lambda: f"both agents to register their CacheAgents\n{diagnostics(cluster)}")
    for pod in pods(cluster, "agent") + pods(cluster, "operator"):
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert {c["image"] for p in pods(cluster, "agent") for c in p["spec"]["containers"]} == {images["agent"]}


def test_a_generation_job_runs_in_an_agent_pod_and_its_png_is_delivered(
        cluster, model_server, receiver, checkpoint, steps) -> None:
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    model = {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "tiny-sd15"},
             "spec": {"replicas": 1, "source": {"url": model_server.url("tiny-sd15.safetensors"), "sha256": digest,
                                                "sizeBytes": checkpoint.stat().st_size}}}
    with steps("first job: ModelCache + GenerationJob → PNG delivered"):
        cluster.kubectl("-n", NAMESPACE, "apply", "-f", "-", input_text=json.dumps(model))
        submit(cluster, receiver, "first")
        status = wait_for(lambda: job_status(cluster, "first").get("phase") in ("Succeeded", "Failed")
                          and job_status(cluster, "first"), timeout_s=900, interval_s=1,
                          message=lambda: f"the first job to finish\n{diagnostics(cluster)}")
    assert status["phase"] == "Succeeded", f"{status}\n{diagnostics(cluster)}"
    png = receiver.received["/out/first.png"]
    assert png.startswith(PNG_MAGIC)
    assert hashlib.sha256(png).hexdigest() == status["result"]["sha256"]
    assert status["agent"] in {p["metadata"]["name"] for p in pods(cluster, "agent")}
    assert model_server.request_count("tiny-sd15.safetensors", method="GET") >= 1


def test_helm_upgrade_of_the_cache_budget_rolls_the_agents(cluster, helm, images, steps) -> None:
    before = {p["metadata"]["name"] for p in pods(cluster, "agent")}
    with steps("helm upgrade (agent.cache.budget 512Mi → 768Mi) → agents rolled and registered"):
        helm_cmd(helm, cluster, "upgrade", RELEASE, str(CHART), *chart_values(images, cluster, budget="768Mi"))

        def rolled() -> set[str]:
            current = [p for p in pods(cluster, "agent") if ready(p)]
            names = {p["metadata"]["name"] for p in current}
            if len(current) != 2 or names & before or len(pods(cluster, "agent")) != 2:
                return set()
            return names if registered_agents(cluster) >= names else set()

        after = wait_for(rolled, timeout_s=600, interval_s=1,
                         message=lambda: f"the agents to roll to the new budget\n{diagnostics(cluster)}")
    for pod in pods(cluster, "agent"):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["STOKER_DISK_BUDGET_BYTES"] == "768Mi"
    budgets = {ca["metadata"]["name"]: ca["status"]["disk"]["budgetBytes"]
               for ca in kubectl_json(cluster, "get", "cacheagents")["items"] if ca["metadata"]["name"] in after}
    assert budgets == dict.fromkeys(after, 768 * 2**20)


def test_deleting_an_agent_pod_mid_job_requeues_the_job_and_it_finishes(cluster, receiver, steps) -> None:
    with steps("agent pod deleted mid-job → job requeued and finished"):
        submit(cluster, receiver, "interrupted", steps=150, size=256)
        running = wait_for(lambda: (s := job_status(cluster, "interrupted")).get("phase") == "Running"
                           and (s.get("progress") or {}).get("step", 0) >= 1 and s,
                           timeout_s=600, interval_s=0.5,
                           message=lambda: f"the job to be generating\n{diagnostics(cluster)}")
        first_agent = running["agent"]
        # A node reclaimed at short notice: SIGTERM, one second, SIGKILL.
        cluster.kubectl("-n", NAMESPACE, "delete", "pod", first_agent, "--grace-period=1", "--wait=false")
        status = wait_for(lambda: (s := job_status(cluster, "interrupted")).get("phase") in ("Succeeded", "Failed")
                          and s, timeout_s=1200, interval_s=1,
                          message=lambda: f"the requeued job to finish\n{diagnostics(cluster)}")
    assert status["phase"] == "Succeeded", f"{status}\n{diagnostics(cluster)}"
    assert status["agent"] != first_agent
    assert first_agent in [h.get("agent") for h in status["history"]], status["history"]
    assert receiver.received["/out/interrupted.png"].startswith(PNG_MAGIC)


def test_helm_uninstall_keeps_the_crds_and_the_users_resources(cluster, helm, steps) -> None:
    with steps("helm uninstall → workloads gone, CRDs and user resources kept"):
        helm_cmd(helm, cluster, "uninstall", RELEASE, "--wait", "--timeout", "5m")
        wait_for(lambda: not pods(cluster, "operator") and not pods(cluster, "agent"), timeout_s=300, interval_s=1,
                 message=lambda: f"the Stoker pods to go\n{diagnostics(cluster)}")
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {"customresourcedefinition.apiextensions.k8s.io/modelcaches.stoker.dev",
            "customresourcedefinition.apiextensions.k8s.io/generationjobs.stoker.dev"} <= set(crds)
    assert kubectl_json(cluster, "get", "modelcache", "tiny-sd15")["metadata"]["name"] == "tiny-sd15"
    assert {j["metadata"]["name"] for j in kubectl_json(cluster, "get", "generationjobs")["items"]} >= {
        "first", "interrupted"}
