"""Two releases of the chart side by side in one namespace, on a real API server: they install
without colliding, each has its own names, RBAC and leader Lease, and each operator (run as a
local process under its release's service account, with the arguments its Deployment carries)
schedules only its own fleet's jobs onto its own fleet's agents."""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

import yaml
from kubernetes import client, config

from stoker import kube
from stoker.testing.fake_agent import FakeAgent, FakeAgentConfig
from stoker.testing.operator_harness import BIN, Process, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"
RELEASES = {"blue": [], "green": ["--set", "fleet=green"]}


def helm_install(helm: str, control_plane, namespace: str, release: str, *args: str) -> None:
    proc = subprocess.run([helm, "install", release, str(CHART), "--namespace", namespace,
                           "--kubeconfig", str(control_plane.kubeconfig), "--set", "crds.enabled=false",
                           "--set", "agent.replicas=1", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"helm install {release}: {proc.stderr}"


def manifest(helm: str, control_plane, namespace: str, release: str) -> list[dict[str, Any]]:
    out = subprocess.run([helm, "get", "manifest", release, "--namespace", namespace, "--kubeconfig",
                          str(control_plane.kubeconfig)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def token_kubeconfig(control_plane, namespace: str, service_account: str, path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig holding a token of `service_account` from the TokenRequest API, as a pod would get."""
    token = control_plane.kubectl("-n", namespace, "create", "token", service_account).stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": control_plane.server,
                                                    "certificate-authority": str(control_plane.ca_file)}}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account, "namespace": namespace}}]}))
    return path


def can_i(control_plane, namespace: str, service_account: str, verb: str, resource: str) -> bool:
    proc = control_plane.kubectl("-n", namespace, "auth", "can-i", verb, resource,
                                 f"--as=system:serviceaccount:{namespace}:{service_account}", check=False)
    return proc.stdout.strip() == "yes"


def test_two_releases_in_one_namespace_install_and_run_apart(helm, control_plane, namespace, api_client,
                                                             tmp_path: pathlib.Path) -> None:
    for release, args in RELEASES.items():
        helm_install(helm, control_plane, namespace, release, *args)
    objects = {r: {(d["kind"], d["metadata"]["name"]) for d in manifest(helm, control_plane, namespace, r)}
               for r in RELEASES}
    assert not objects["blue"] & objects["green"], "the releases share object names"
    for release, names in objects.items():
        assert all(name.startswith(f"{release}-stoker-") for _, name in names), names
        assert {("Deployment", f"{release}-stoker-operator"), ("Role", f"{release}-stoker-agent"),
                ("ServiceAccount", f"{release}-stoker-agent"), ("PodDisruptionBudget", f"{release}-stoker-operator"),
                ("Service", f"{release}-stoker-agent-metrics")} <= names

    # Each operator may renew its own leader Lease only.
    assert can_i(control_plane, namespace, "blue-stoker-operator", "update", "leases/blue-stoker-operator")
    assert not can_i(control_plane, namespace, "blue-stoker-operator", "update", "leases/green-stoker-operator")
    assert not can_i(control_plane, namespace, "green-stoker-operator", "update", "leases/blue-stoker-operator")
    assert not can_i(control_plane, namespace, "blue-stoker-agent", "update", "leases/blue-stoker-operator")

    admin = kube.Objects(api_client, namespace)
    processes: list[Process] = []
    agents: list[FakeAgent] = []
    try:
        for release in RELEASES:
            deployments = {d["metadata"]["name"]: d for d in manifest(helm, control_plane, namespace, release)
                           if d["kind"] == "Deployment"}
            container = deployments[f"{release}-stoker-operator"]["spec"]["template"]["spec"]["containers"][0]
            kubeconfig = token_kubeconfig(control_plane, namespace, f"{release}-stoker-operator",
                                          tmp_path / f"{release}-operator.kubeconfig")
            # The Deployment's own arguments; the ports go to 0 here, where both run on one host.
            processes.append(Process([str(BIN / "stoker-operator"), *container["args"], "--kubeconfig", str(kubeconfig),
                                      "--identity", f"{release}-operator-pod", "--metrics-port", "0",
                                      "--health-port", "0", "--lease-grace-s", "3"],
                                     tmp_path / f"{release}-operator.log").start())
            agent_api = config.new_client_from_config(config_file=str(token_kubeconfig(
                control_plane, namespace, f"{release}-stoker-agent", tmp_path / f"{release}-agent.kubeconfig")))
            fleet = "green" if release == "green" else None
            agents.append(FakeAgent(agent_api, FakeAgentConfig(name=f"{release}-agent-0", namespace=namespace,
                                                               job_seconds=0.05, fleet=fleet)).start())
            labels = {"stoker.dev/fleet": fleet} if fleet else {}
            admin.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                        "metadata": {"name": f"{release}-model", "labels": labels},
                                        "spec": {"source": {"url": f"https://models.invalid/{release}.safetensors"},
                                                 "replicas": 1}})
            for i in range(3):
                admin.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                               "metadata": {"name": f"{release}-job-{i}", "labels": labels},
                                               "spec": {"model": f"{release}-model", "params": {"prompt": "a fox"}}})

        def finished() -> list[dict[str, Any]] | None:
            jobs = admin.list("GenerationJob")["items"]
            return jobs if len(jobs) == 6 and all(j.get("status", {}).get("phase") == "Succeeded" for j in jobs) else None

        jobs = wait_for(finished, timeout_s=60,
                        message=lambda: "every job to succeed\n" + "\n".join(p.tail() for p in processes))
        for job in jobs:  # every job ran on its own release's agent
            release = job["metadata"]["name"].split("-")[0]
            assert job["status"]["agent"] == f"{release}-agent-0", json.dumps(job["status"])
        leases = {name: client.CoordinationV1Api(api_client).read_namespaced_lease(name, namespace).spec.holder_identity
                  for name in ("blue-stoker-operator", "green-stoker-operator")}
        assert leases == {"blue-stoker-operator": "blue-operator-pod", "green-stoker-operator": "green-operator-pod"}
        # Replica orders went to the model's own fleet only.
        for release in RELEASES:
            holds = wait_for(lambda r=release: admin.get("CacheAgent", f"{r}-agent-0")["spec"].get("holds"),
                             timeout_s=20, message=f"{release}'s hold order")
            assert [h["model"] for h in holds] == [f"{release}-model"]
        for proc in processes:
            log = proc.log_path.read_text()
            assert "Forbidden" not in log and " 403" not in log, proc.tail()
    finally:
        for agent in agents:
            agent.stop()
        for proc in processes:
            proc.stop()
