"""The chart's RBAC is enough for the operator and the agent, and no more than each needs."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from stoker.agent import credentials
from stoker.api.modelcache import SecretRef
from stoker.kube import Objects
from stoker.testing.fake_agent import FakeAgent, FakeAgentConfig
from stoker.testing.operator_harness import operator_process, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"


def apply_chart_rbac(helm: str, namespace: str, kubectl, *values: str) -> None:  # type: ignore[no-untyped-def]
    """Apply the chart's Roles (rendered with `--set` `values`) and bind them to the test users of the same names."""
    sets = [arg for value in values for arg in ("--set-json" if value.lstrip().endswith("]") else "--set", value)]
    rendered = subprocess.run([helm, "template", "stoker", str(CHART), "--namespace", namespace, *sets,
                               "--show-only", "templates/rbac.yaml"], check=True, capture_output=True, text=True).stdout
    kubectl("apply", "-f", "-", input_text=rendered)
    for role in ("stoker-operator", "stoker-agent"):
        kubectl("apply", "-f", "-", input_text=json.dumps({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"{role}-user", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": role}]}))


@pytest.fixture
def chart_rbac(helm: str, control_plane, namespace: str, kubectl) -> None:
    apply_chart_rbac(helm, namespace, kubectl)


@pytest.fixture
def agent_api(control_plane, chart_rbac) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(control_plane.kubeconfig_for("stoker-agent")))



def test_operator_and_agent_work_with_only_the_chart_roles(
        control_plane, namespace, api_client, agent_api, tmp_path) -> None:
    admin = Objects(api_client, namespace)
    admin.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "sd"},
                                "spec": {"source": {"url": "https://models.example.com/sd.safetensors"}, "replicas": 1}})
    op = operator_process(control_plane.kubeconfig_for("stoker-operator"), namespace, tmp_path / "operator.log").start()
    agent = FakeAgent(agent_api, FakeAgentConfig(name="agent-a", namespace=namespace, job_seconds=0.05)).start()
    try:
        admin.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                       "metadata": {"name": "job"},
                                       "spec": {"model": "sd", "params": {"prompt": "a fox"}}})
        done = wait_for(lambda: (admin.get("GenerationJob", "job").get("status") or {}).get("history"), timeout_s=40,
                        message="the job to finish under least-privilege identities")
        assert done[-1]["outcome"] == "Succeeded"
        # Replica orders and ModelCache status need the operator's spec and status rights.
        wait_for(lambda: any(h["model"] == "sd" for h in admin.get("CacheAgent", "agent-a")["spec"].get("holds", [])),
                 timeout_s=20, message="a hold order")
        wait_for(lambda: (admin.get("ModelCache", "sd").get("status") or {}).get("copies", {}).get("disk") == 1,
                 timeout_s=20, message="ModelCache status")
        assert "Forbidden" not in op.log_path.read_text() and "403" not in op.log_path.read_text()
        operator_api = Objects(config.new_client_from_config(
            config_file=str(control_plane.kubeconfig_for("stoker-operator"))), namespace)
        with pytest.raises(ApiException) as info:
            operator_api.patch("ModelCache", "sd", {"spec": {"replicas": 5}})
        assert info.value.status == 403, "the operator identity could change a ModelCache's spec"
    finally:
        agent.stop()
        op.stop()


def test_the_agent_identity_cannot_do_the_operators_writes(namespace, api_client, agent_api) -> None:
    admin = Objects(api_client, namespace)
    admin.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "sd"},
                                "spec": {"source": {"url": "https://models.example.com/sd.safetensors"}}})
    admin.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                   "metadata": {"name": "job"}, "spec": {"model": "sd", "params": {"prompt": "a fox"}}})
    agent = Objects(agent_api, namespace)
    # The agent registers its own CacheAgent and reports through the status subresource.
    agent.create("CacheAgent", {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
                                "metadata": {"name": "agent-a"}, "spec": {}})
    agent.patch_status("CacheAgent", "agent-a", {"slots": 1})
    forbidden = [
        ("bind a job", lambda: agent.patch("GenerationJob", "job", {"metadata": {"labels": {"stoker.dev/agent": "x"}}})),
        ("write ModelCache status", lambda: agent.patch_status("ModelCache", "sd", {"desiredReplicas": 9})),
        ("change a ModelCache", lambda: agent.patch("ModelCache", "sd", {"spec": {"replicas": 9}})),
        ("delete a job", lambda: agent.delete("GenerationJob", "job")),
        ("create a job", lambda: agent.create("GenerationJob", {
            "apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": "sneaky"},
            "spec": {"model": "sd", "params": {"prompt": "x"}}})),
        ("read Secrets", lambda: agent.core.list_namespaced_secret(namespace)),
        ("give itself orders", lambda: agent.patch("CacheAgent", "agent-a", {"spec": {"cordon": True}})),
        ("relabel its CacheAgent", lambda: agent.patch("CacheAgent", "agent-a", {"metadata": {"labels": {"x": "y"}}})),
    ]
    for what, attempt in forbidden:
        with pytest.raises(ApiException) as info:
            attempt()
        assert info.value.status == 403, f"the agent identity could {what}"
    # What it does need is allowed: reading jobs and writing their status.
    assert agent.get("GenerationJob", "job")["metadata"]["name"] == "job"
    agent.patch_status("GenerationJob", "job", {"progress": {"step": 1, "steps": 20}})


def test_the_agent_reads_through_the_api_only_the_secrets_the_chart_lists(helm, namespace, kubectl, control_plane) -> None:
    apply_chart_rbac(helm, namespace, kubectl, 'agent.credentialSecrets=[{"name": "late-token", "hosts": '
                     '["models.example.com"], "via": "api"}]')
    for name in ("late-token", "other-token"):
        kubectl("create", "secret", "generic", name, f"--from-literal=token={name}-value")
    agent = Objects(config.new_client_from_config(config_file=str(control_plane.kubeconfig_for("stoker-agent"))),
                    namespace)
    ref = SecretRef(name="late-token")
    url = "https://models.example.com/sd.safetensors"
    grants = [credentials.CredentialGrant(secret=name, hosts=("models.example.com",))
              for name in ("late-token", "other-token")]
    allowed = credentials.CredentialResolver.from_grants(grants, secrets_dir=None, api_secrets=frozenset({"late-token"}))
    assert allowed.lookup(agent, "sd", ref, url).header_value == "Bearer late-token-value"
    # Listed in the agent's settings but not granted by the chart: the API server refuses.
    too_wide = credentials.CredentialResolver.from_grants(grants, secrets_dir=None,
                                                          api_secrets=frozenset({"other-token"}))
    with pytest.raises(credentials.CredentialLookupError) as info:
        too_wide.lookup(agent, "sd", SecretRef(name="other-token"), url)
    assert info.value.reason == "SecretForbidden" and "via: api" in info.value.message
    # Not readable through the API: the agent does not even ask, and says how to provide it.
    with pytest.raises(credentials.CredentialLookupError) as info:
        credentials.CredentialResolver.from_grants(grants, secrets_dir=None).lookup(agent, "sd", ref, url)
    assert info.value.reason == "SecretNotFound" and "agent.credentialSecrets" in info.value.message
    assert "late-token-value" not in info.value.message
