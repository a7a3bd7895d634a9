"""What the chart renders for the operator and agent pods: names, probes, credentials,
scheduling fields, the GPU resource and the metrics endpoints."""

from __future__ import annotations

import pathlib
import subprocess
from typing import Any

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"
COMFYUI = REPO / "examples" / "comfyui" / "values.yaml"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def render(helm: str, *args: str, release: str = "stoker") -> list[dict[str, Any]]:
    proc = subprocess.run([helm, "template", release, str(CHART), "--namespace", "ml", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    [deployment] = [d for d in docs if d["kind"] == "Deployment"
                    and d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return deployment["spec"]["template"]["spec"]


def test_names_carry_the_release_and_fit_in_a_dns_label(helm: str) -> None:
    default = render(helm)
    assert set(by_kind(default, "Deployment")) == {"stoker-operator", "stoker-agent"}
    other = render(helm, release="blue")
    assert set(by_kind(other, "Deployment")) == {"blue-stoker-operator", "blue-stoker-agent"}
    assert set(by_kind(other, "Role")) == {"blue-stoker-operator", "blue-stoker-agent"}
    assert set(by_kind(other, "ServiceAccount")) == {"blue-stoker-operator", "blue-stoker-agent"}
    assert "--leader-lease-name=blue-stoker-operator" in pod(other, "operator")["containers"][0]["args"]
    assert set(by_kind(render(helm, release="stoker-canary"), "Deployment")) == {
        "stoker-canary-operator", "stoker-canary-agent"}
    long = render(helm, release="r" * 53)
    for doc in long:
        if doc["kind"] != "CustomResourceDefinition":
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    assert set(by_kind(render(helm, "--set", "fullnameOverride=gpu"), "Deployment")) == {"gpu-operator", "gpu-agent"}


def test_the_api_token_is_mounted_into_the_agent_container_only(helm: str) -> None:
    spec = pod(render(helm, "-f", str(COMFYUI)), "agent")
    assert spec["automountServiceAccountToken"] is False
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"agent", "comfyui"}
    [mount] = [m for m in containers["agent"]["volumeMounts"] if m["mountPath"] == TOKEN_DIR]
    assert mount["readOnly"] is True
    assert all(m["name"] != mount["name"] and not m["mountPath"].startswith("/var/run/secrets")
               for m in containers["comfyui"]["volumeMounts"]), "the ComfyUI sidecar can read the agent's token"
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    # A projected service-account token is bound to the pod: its claims name the pod, which the
    # admission policy on agents' writes relies on. The CA and namespace complete the in-cluster config.
    assert sources[0]["serviceAccountToken"] == {"path": "token", "expirationSeconds": 3607}
    assert {"key": "ca.crt", "path": "ca.crt"} in sources[1]["configMap"]["items"]
    assert sources[2]["downwardAPI"]["items"][0]["path"] == "namespace"
    agent_sa = by_kind(render(helm), "ServiceAccount")["stoker-agent"]
    assert agent_sa["automountServiceAccountToken"] is False


def test_the_comfyui_sidecar_is_probed_at_the_address_it_listens_on(helm: str) -> None:
    spec = pod(render(helm, "-f", str(COMFYUI)), "agent")
    comfy = next(c for c in spec["containers"] if c["name"] == "comfyui")
    assert comfy["args"][:2] == ["--listen", "127.0.0.1"]
    command = comfy["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"] and "http://127.0.0.1:8188/system_stats" in command[2]
    # An httpGet probe would go to the pod IP, where a server on 127.0.0.1 never answers.
    assert "httpGet" not in comfy["readinessProbe"]
    custom = pod(render(helm, "-f", str(COMFYUI), "--set", "agent.runner.comfyui.sidecar.readinessProbe.tcpSocket.port=8188"),
                 "agent")
    assert next(c for c in custom["containers"] if c["name"] == "comfyui")["readinessProbe"] == {"tcpSocket": {"port": 8188}}


def test_both_components_have_probes_on_their_health_ports(helm: str) -> None:
    docs = render(helm)
    operator, agent = pod(docs, "operator")["containers"][0], pod(docs, "agent")["containers"][0]
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["readinessProbe"]["httpGet"]["port"] == "health"
    assert {"name": "health", "containerPort": 8081} in operator["ports"]
    assert "--health-port=8081" in operator["args"] and "--health-addr=0.0.0.0" in operator["args"]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert agent["startupProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert (env["STOKER_HEALTH_PORT"], env["STOKER_HEALTH_ADDR"]) == ("8082", "0.0.0.0")


def test_scheduling_and_pod_fields_reach_both_pods(helm: str) -> None:
    sets = ["imagePullSecrets[0].name=regcred"]
    for c in ("operator", "agent"):
        sets += [f"{c}.nodeSelector.pool=gpu", f"{c}.tolerations[0].key=gpu", f"{c}.tolerations[0].operator=Exists",
                 f"{c}.tolerations[0].effect=NoSchedule", f"{c}.priorityClassName={c}-critical",
                 f"{c}.podAnnotations.team=ml", f"{c}.podLabels.tier={c}",
                 f"{c}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
                 f".matchExpressions[0].key=zone",
                 f"{c}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
                 f".matchExpressions[0].operator=Exists",
                 f"{c}.topologySpreadConstraints[0].maxSkew=1",
                 f"{c}.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
                 f"{c}.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
                 f"{c}.terminationGracePeriodSeconds=90", f"{c}.resources.requests.cpu=3"]
    sets += ["agent.runtimeClassName=nvidia"]
    docs = render(helm, *[arg for s in sets for arg in ("--set", s)])
    for component in ("operator", "agent"):
        spec = pod(docs, component)
        deployment = next(d for d in docs if d["kind"] == "Deployment" and d["spec"]["template"]["spec"] is spec)
        template_meta = deployment["spec"]["template"]["metadata"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["nodeSelector"] == {"pool": "gpu"}
        assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["priorityClassName"] == f"{component}-critical"
        assert spec["affinity"]["nodeAffinity"]
        assert spec["terminationGracePeriodSeconds"] == 90
        assert spec["containers"][0]["resources"]["requests"]["cpu"] == 3
        assert template_meta["annotations"] == {"team": "ml"}
        assert template_meta["labels"]["tier"] == component
        # A spread constraint without a labelSelector spreads this component's own pods.
        [spread] = spec["topologySpreadConstraints"]
        assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod(docs, "agent")["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pod(render(helm), "agent")


def test_the_gpu_resource_name_is_configurable(helm: str) -> None:
    agent = pod(render(helm, "--set", "agent.gpuResourceName=amd.com/gpu", "--set", "agent.gpusPerPod=2"),
                "agent")["containers"][0]
    assert agent["resources"]["limits"]["amd.com/gpu"] == 2 and "nvidia.com/gpu" not in agent["resources"]["limits"]
    cpu_only = pod(render(helm, "--set", "agent.gpusPerPod=0"), "agent")["containers"][0]
    assert not any("gpu" in key for key in cpu_only["resources"]["limits"])
    sidecar = pod(render(helm, "-f", str(COMFYUI), "--set", "agent.gpuResourceName=nvidia.com/mig-3g.40gb"), "agent")
    comfy = next(c for c in sidecar["containers"] if c["name"] == "comfyui")
    assert comfy["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 1


def test_the_agent_grace_period_covers_its_drain(helm: str) -> None:
    spec = pod(render(helm), "agent")
    # The drain: attempts handed back within 10 s (the job loop's shutdown grace), then the job
    # watch's read timeout (30 s + margin) at worst; test_agent_health measures a real one.
    assert spec["terminationGracePeriodSeconds"] >= 60


def test_the_operator_has_a_disruption_budget(helm: str) -> None:
    pdbs = by_kind(render(helm), "PodDisruptionBudget")
    assert pdbs["stoker-operator"]["spec"]["maxUnavailable"] == 1
    assert pdbs["stoker-operator"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert not by_kind(render(helm, "--set", "operator.podDisruptionBudget.enabled=false"), "PodDisruptionBudget")


@pytest.mark.parametrize(("enabled", "addr"), [(True, "0.0.0.0"), (False, "127.0.0.1")])
def test_metrics_listen_on_all_interfaces_only_behind_their_service(helm: str, enabled: bool, addr: str) -> None:
    docs = render(helm, "--set", f"metrics.enabled={str(enabled).lower()}")
    operator, agent = pod(docs, "operator")["containers"][0], pod(docs, "agent")["containers"][0]
    assert f"--metrics-addr={addr}" in operator["args"]
    assert {e["name"]: e.get("value") for e in agent["env"]}["STOKER_METRICS_ADDR"] == addr
    services = by_kind(docs, "Service")
    if enabled:
        assert set(services) == {"stoker-operator-metrics", "stoker-agent-metrics"}
        agent_service = services["stoker-agent-metrics"]
        assert agent_service["spec"]["selector"]["app.kubernetes.io/component"] == "agent"
        assert agent_service["spec"]["ports"] == [{"name": "metrics", "port": 9091, "targetPort": "metrics",
                                                   "protocol": "TCP"}]
    else:
        assert not services


def test_monitors_select_this_releases_metrics_services(helm: str) -> None:
    docs = render(helm, "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
                  "--set", "metrics.serviceMonitor.labels.release=kube-prometheus", release="blue")
    [sm] = by_kind(docs, "ServiceMonitor").values()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    selector = sm["spec"]["selector"]["matchLabels"]
    for service in by_kind(docs, "Service").values():
        assert selector.items() <= service["metadata"]["labels"].items()
    [pm] = by_kind(docs, "PodMonitor").values()
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "blue"
    proc = subprocess.run([helm, "template", "x", str(CHART), "--set", "metrics.enabled=false",
                           "--set", "metrics.serviceMonitor.enabled=true"], capture_output=True, text=True)
    assert proc.returncode != 0 and "need metrics.enabled=true" in proc.stderr
