"""values.schema.json: unknown keys, wrong types and malformed quantities are refused by helm
with a message that names the key, before anything reaches the cluster."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"

# (--set argument, the key path helm's message must name, what else it must say)
BAD_VALUES = [
    ("agent.replica=8", "at '/agent'", "additional properties 'replica' not allowed"),
    ("agnet.replicas=8", "at ''", "additional properties 'agnet' not allowed"),
    ("agent.cache.extra=1", "at '/agent/cache'", "additional properties 'extra' not allowed"),
    ("metrics.serviceMonitor.enable=true", "at '/metrics/serviceMonitor'", "additional properties 'enable' not allowed"),
    ("agent.cache.budget=lots", "at '/agent/cache/budget'", "'lots' does not match pattern"),
    ("agent.ramBudget=32GB-ish", "at '/agent/ramBudget'", "does not match pattern"),
    ("agent.cache.sizeLimit=55 gigs", "at '/agent/cache/sizeLimit'", "does not match pattern"),
    ("agent.resources.requests.cpu=lots", "at '/agent/resources/requests/cpu'", "does not match pattern"),
    ("operator.resources.limits.memory=1GB", "at '/operator/resources/limits/memory'", "does not match pattern"),
    ("agent.replicas=many", "at '/agent/replicas'", "got string, want integer"),
    ("agent.allowHttp=maybe", "at '/agent/allowHttp'", "got string, want boolean"),
    ("agent.allowedHosts=hub.example", "at '/agent/allowedHosts'", "got string, want array"),
    ("agent.slots=0", "at '/agent/slots'", "minimum"),
    ("operator.leaseGraceSeconds=soon", "at '/operator/leaseGraceSeconds'", "does not match pattern"),
    ("agent.runner.kind=vllm", "at '/agent/runner/kind'", "value must be one of 'diffusers', 'comfyui'"),
    ("agent.gpuResourceName=nvidia gpu", "at '/agent/gpuResourceName'", "does not match pattern"),
    ("metrics.serviceMonitor.interval=soon", "at '/metrics/serviceMonitor/interval'", "does not match pattern"),
    ("metrics.prometheusRule.maxJobFailureRatio=2", "at '/metrics/prometheusRule/maxJobFailureRatio'", "maximum"),
    ("agent.tolerations[0].effect=Never", "at '/agent/tolerations/0/effect'", "value must be one of"),
    ("operator.topologySpreadConstraints[0].maxSkew=1", "at '/operator/topologySpreadConstraints/0'",
     "missing properties 'topologyKey', 'whenUnsatisfiable'"),
]


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", "stoker", str(CHART), *args], capture_output=True, text=True)


@pytest.mark.parametrize(("setting", "where", "what"), BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_helm_template_refuses_bad_values_naming_the_key(helm: str, setting: str, where: str, what: str) -> None:
    proc = helm_template(helm, "--set", setting)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert where in proc.stderr and what in proc.stderr, proc.stderr
    print(f"--set {setting}\n{proc.stderr.strip()}")  # the messages, as the report quotes them


def test_helm_install_dry_run_refuses_a_bad_quantity_before_the_api_server_sees_it(helm: str, control_plane,
                                                                                     namespace: str) -> None:
    proc = subprocess.run([helm, "install", "stoker", str(CHART), "--namespace", namespace, "--dry-run=server",
                           "--kubeconfig", str(control_plane.kubeconfig), "--set", "agent.cache.budget=lots"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "at '/agent/cache/budget': 'lots' does not match pattern" in proc.stderr, proc.stderr


def test_helm_install_dry_run_accepts_the_defaults_on_the_api_server(helm: str, control_plane, namespace: str) -> None:
    # The shared control plane already has the CRDs (not owned by a release): leave them out.
    proc = subprocess.run([helm, "install", "stoker", str(CHART), "--namespace", namespace, "--dry-run=server",
                           "--kubeconfig", str(control_plane.kubeconfig), "--set", "crds.enabled=false"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("setting", [
    "agent.cache.budget=50Gi", "agent.cache.budget=53687091200", "agent.cache.budget=1.5Ti", "agent.ramBudget=500M",
    "agent.resources.requests.cpu=500m", "agent.resources.requests.cpu=2", "agent.resources.limits.memory=1.5Gi",
    "agent.resources.limits.memory=1e9", "operator.podDisruptionBudget.maxUnavailable=50%",
    "agent.gpuResourceName=amd.com/gpu", "agent.gpuResourceName=nvidia.com/mig-1g.10gb",
    "metrics.serviceMonitor.interval=1m30s", "agent.runner.comfyui.vramBytes=48Gi", "operator.downloadWeight=2.5",
])
def test_well_formed_values_pass_the_schema(helm: str, setting: str) -> None:
    proc = helm_template(helm, "--set", setting)
    assert proc.returncode == 0, proc.stderr


def test_a_number_below_its_minimum_is_refused(helm: str) -> None:
    proc = helm_template(helm, "--set-json", "operator.downloadWeight=0.5")
    assert proc.returncode != 0
    assert "at '/operator/downloadWeight'" in proc.stderr and "minimum: got 0.5, want 1" in proc.stderr, proc.stderr


def test_every_default_value_is_described_in_the_schema() -> None:
    """The schema covers values.yaml (helm lint checks the defaults against it) and says what each key is for."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: object, node: dict, path: str) -> None:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node
        props = node.get("properties")
        if props is None or not isinstance(value, dict):
            return
        assert node.get("additionalProperties") is False, f"{path or 'the top level'} accepts unknown keys"
        for key, sub in value.items():
            assert key in props, f"{path}.{key} is not in values.schema.json"
            child = props[key]
            assert "description" in child or "$ref" in child, \
                f"{path}.{key} has no description in values.schema.json"
            walk(sub, child, f"{path}.{key}".lstrip("."))

    walk(values, schema, "")
