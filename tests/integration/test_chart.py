"""The Helm chart installs on a real API server and carries the generated CRDs."""

from __future__ import annotations

import base64
import json
import re
import pathlib
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"


def test_chart_lints_cleanly(helm: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_chart_renders_the_generated_crds_behind_crds_enabled(helm: str) -> None:
    def crds(*args: str) -> dict[str, dict]:
        out = subprocess.run([helm, "template", "stoker", str(CHART), *args], check=True, capture_output=True,
                             text=True).stdout
        return {d["metadata"]["name"]: d for d in yaml.safe_load_all(out)
                if d and d["kind"] == "CustomResourceDefinition"}

    rendered = crds()
    for path in sorted((REPO / "crds").glob("*.yaml")):
        plain = yaml.safe_load(path.read_text())
        crd = rendered[plain["metadata"]["name"]]
        assert crd["spec"] == plain["spec"], path.name
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not crds("--set", "crds.enabled=false")
    assert all("annotations" not in c["metadata"] for c in crds("--set", "crds.keep=false").values())


CREDENTIALS = "agent.credentialSecrets=" + json.dumps([
    {"name": "hub-token", "hosts": ["models.example.com"]},
    {"name": "late-token", "hosts": [".hub.example"], "via": "api"},
    {"name": "env-token", "hosts": ["models.example.com"], "via": "env", "env": {"token": "ENV_TOKEN"}}])


@pytest.mark.parametrize(("credentials", "says"), [
    (["hub-token"], "agent.credentialSecrets[0] (hub-token) has no hosts"),
    ([{"name": "hub-token"}], "agent.credentialSecrets hub-token has no hosts"),
    ([{"name": "hub-token", "hosts": []}], "agent.credentialSecrets hub-token has no hosts"),
    ([{"name": "hub-token", "hosts": ["h.example"], "via": "smoke"}], "value must be one of 'mount', 'api', 'env'"),
    ([{"name": "hub-token", "hosts": ["h.example"], "via": "env"}], "via env needs env"),
])
def test_the_chart_refuses_a_credential_secret_without_the_hosts_it_may_be_sent_to(
        helm: str, credentials: list[object], says: str) -> None:
    proc = subprocess.run([helm, "template", "stoker", str(CHART), "--set-json",
                           "agent.credentialSecrets=" + json.dumps(credentials)], capture_output=True, text=True)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr


def test_the_old_api_readable_secrets_value_says_how_to_move_on(helm: str) -> None:
    proc = subprocess.run([helm, "template", "stoker", str(CHART), "--set", "agent.apiReadableSecrets={late}"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "via: api" in proc.stderr, proc.stderr


def test_helm_install_creates_the_operator_agents_and_least_privilege_rbac(helm, control_plane, namespace, kubectl) -> None:
    proc = subprocess.run(
        [helm, "install", "stoker", str(CHART), "--namespace", namespace, "--kubeconfig", str(control_plane.kubeconfig),
         # The session's control plane has the CRDs already (applied from crds/, owned by no release).
         "--set", "crds.enabled=false",
         "--set", "agent.replicas=3", "--set-json", CREDENTIALS],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    deployments = json.loads(kubectl("get", "deploy", "-o", "json").stdout)["items"]
    by_name = {d["metadata"]["name"]: d for d in deployments}
    assert by_name["stoker-agent"]["spec"]["replicas"] == 3
    assert by_name["stoker-operator"]["spec"]["template"]["spec"]["serviceAccountName"] == "stoker-operator"
    # The agents' isolation policy is installed and bound to this namespace.
    policies = json.loads(kubectl("get", "validatingadmissionpolicybindings", "-o", "json").stdout)["items"]
    assert any(b["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
               for b in policies)
    # Mounted credentials need no RBAC; only the API-readable Secret is granted, by name.
    pod = by_name["stoker-agent"]["spec"]["template"]["spec"]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"].startswith("/var/run/stoker/secrets/")]
    assert mount["mountPath"] == "/var/run/stoker/secrets/hub-token" and mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "hub-token"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["STOKER_API_SECRETS"] == "late-token"
    # Each credential travels with the hosts it may be sent to, and nothing else.
    assert json.loads(env["STOKER_CREDENTIALS"]) == [
        {"secret": "hub-token", "hosts": ["models.example.com"]},
        {"secret": "late-token", "hosts": [".hub.example"]},
        {"secret": "env-token", "hosts": ["models.example.com"], "env": {"token": "ENV_TOKEN"}}]
    agent_role = json.loads(kubectl("get", "role", "stoker-agent", "-o", "json").stdout)
    secret_rules = [r for r in agent_role["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["late-token"], "verbs": ["get"]}]
    # The agent creates its CacheAgent and writes its status, but may not change any spec.
    [ca_rule] = [r for r in agent_role["rules"] if r["resources"] == ["cacheagents"]]
    assert "patch" not in ca_rule["verbs"] and "update" not in ca_rule["verbs"]
    # No wildcard anywhere in either role.
    for role in ("stoker-agent", "stoker-operator"):
        rules = json.loads(kubectl("get", "role", role, "-o", "json").stdout)["rules"]
        assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules), role


def test_the_peer_credential_is_generated_once_and_mounted_into_agents_only(helm, control_plane, namespace, kubectl) -> None:
    args = [str(CHART), "--namespace", namespace, "--kubeconfig", str(control_plane.kubeconfig), "--set", "crds.enabled=false"]
    proc = subprocess.run([helm, "install", "stoker", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    secret = json.loads(kubectl("get", "secret", "stoker-agent-peer", "-o", "json").stdout)
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    deployments = {d["metadata"]["name"]: d for d in json.loads(kubectl("get", "deploy", "-o", "json").stdout)["items"]}
    agent = deployments["stoker-agent"]["spec"]["template"]["spec"]
    [mount] = [m for m in agent["containers"][0]["volumeMounts"] if m["mountPath"] == "/var/run/stoker/peer"]
    assert mount["readOnly"] is True
    [volume] = [v for v in agent["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "stoker-agent-peer"
    env = {e["name"]: e for e in agent["containers"][0]["env"]}
    assert env["STOKER_PEER_TOKEN_FILE"]["value"] == "/var/run/stoker/peer/token"
    assert env["STOKER_PEER_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {"name": "peer", "containerPort": 8471} in [
        {k: p[k] for k in ("name", "containerPort")} for p in agent["containers"][0]["ports"]]
    # The operator neither mounts it nor may read Secrets at all.
    operator = deployments["stoker-operator"]["spec"]["template"]["spec"]
    assert not any("secret" in v for v in operator.get("volumes", []))
    rules = json.loads(kubectl("get", "role", "stoker-operator", "-o", "json").stdout)["rules"]
    assert not any("secrets" in r["resources"] for r in rules)
    # An upgrade keeps the credential: agents running with the old one still reach each other.
    proc = subprocess.run([helm, "upgrade", "stoker", *args, "--set", "agent.peer.maxUploads=3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(kubectl("get", "secret", "stoker-agent-peer", "-o", "json").stdout)
    assert again["data"]["token"] == secret["data"]["token"]


def test_the_peer_credential_is_named_after_the_release_or_brought_by_the_user(helm: str) -> None:
    def render(*options: str) -> list[dict]:
        out = subprocess.run([helm, "template", "ab", str(CHART), "--namespace", "ns", *options],
                             check=True, capture_output=True, text=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    docs = render()
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert "ab-stoker-agent-peer" in secrets
    agent = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ab-stoker-agent")
    volume = next(v for v in agent["spec"]["template"]["spec"]["volumes"] if v["name"] == "peer-credential")
    assert volume["secret"]["secretName"] == "ab-stoker-agent-peer"
    docs = render("--set", "agent.peer.existingSecret=our-peer-token")
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-peer")]
    agent = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ab-stoker-agent")
    volume = next(v for v in agent["spec"]["template"]["spec"]["volumes"] if v["name"] == "peer-credential")
    assert volume["secret"]["secretName"] == "our-peer-token"
    bad = subprocess.run([helm, "template", "ab", str(CHART), "--set", "agent.peer.maxUploads=0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "maxUploads" in bad.stderr


def test_the_peer_tier_can_be_turned_off(helm, control_plane, namespace, kubectl) -> None:
    proc = subprocess.run(
        [helm, "install", "stoker", str(CHART), "--namespace", namespace, "--kubeconfig", str(control_plane.kubeconfig),
         "--set", "crds.enabled=false", "--set", "agent.peer.enabled=false"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert kubectl("get", "secret", "stoker-agent-peer", check=False).returncode != 0
    agent = json.loads(kubectl("get", "deploy", "stoker-agent", "-o", "json").stdout)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in agent["containers"][0]["env"]}
    assert "STOKER_PEER_TOKEN_FILE" in env and not env["STOKER_PEER_TOKEN_FILE"]  # set, empty: no peer credential
    assert not any(v["name"] == "peer-credential" for v in agent["volumes"])
def notes_manifests(notes: str) -> list[str]:
    """The manifests in NOTES.txt's `kubectl apply -f - <<'EOF'` blocks, unindented."""
    blocks, current = [], None
    for line in notes.splitlines():
        if line.strip().startswith("kubectl") and line.rstrip().endswith("<<'EOF'"):
            current = []
        elif current is not None and line.strip() == "EOF":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line.removeprefix("  "))
    return blocks


def test_the_notes_next_steps_work_as_written(helm, control_plane, namespace, kubectl) -> None:
    proc = subprocess.run(
        [helm, "install", "notes", str(CHART), "--namespace", namespace, "--kubeconfig", str(control_plane.kubeconfig),
         "--set", "crds.enabled=false"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    notes = subprocess.run([helm, "get", "notes", "notes", "--namespace", namespace, "--kubeconfig",
                            str(control_plane.kubeconfig)], check=True, capture_output=True, text=True).stdout
    assert "example.com" not in notes and "<" not in notes.replace("<<'EOF'", ""), notes
    manifests = notes_manifests(notes)
    assert [yaml.safe_load(m)["kind"] for m in manifests] == ["ModelCache", "GenerationJob"]
    for manifest in manifests:  # the API server's CRD schema accepts them as they stand
        kubectl("apply", "-f", "-", input_text=manifest)
    assert kubectl("get", "generationjob", "first-image", "-o", "jsonpath={.spec.model}").stdout == "sd15"
    # Every deployment and service the notes name exists under that name.
    for kind, name in re.findall(r"(deployment|svc)/([a-z0-9-]+)", notes):
        kubectl("get", kind, name)


def test_the_pass_interval_reaches_the_operator_within_its_bounds(helm: str) -> None:
    def operator_args(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([helm, "template", "stoker", str(CHART), *options], capture_output=True, text=True)

    rendered = operator_args("--set", "operator.passIntervalSeconds=0.2")
    assert rendered.returncode == 0, rendered.stderr
    operator = next(d for d in yaml.safe_load_all(rendered.stdout)
                    if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "stoker-operator")
    assert "--pass-interval-s=0.2" in operator["spec"]["template"]["spec"]["containers"][0]["args"]
    refused = operator_args("--set", "operator.passIntervalSeconds=9")
    assert refused.returncode != 0 and "passIntervalSeconds" in refused.stderr, refused.stderr
