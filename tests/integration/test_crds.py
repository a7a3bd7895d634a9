"""The generated CRDs on a real API server: validation, defaults, columns, docs, status."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from stoker.testing import controlplane

REPO = pathlib.Path(__file__).resolve().parents[2]
VALID = sorted((REPO / "examples").glob("*.yaml"))
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))


def expected_field(path: pathlib.Path) -> str:
    match = re.search(r"^# expect: (\S+)$", path.read_text(), re.M)
    assert match, f"{path.name} lacks an '# expect: <field>' line"
    return match.group(1)


def test_all_three_crds_are_established(control_plane) -> None:
    out = control_plane.kubectl("get", "crd", "-o", "name").stdout
    for plural in ("modelcaches", "generationjobs", "cacheagents"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{plural}.stoker.dev" in out


@pytest.mark.parametrize("example", VALID, ids=lambda p: p.name)
def test_every_valid_example_applies(kubectl, example: pathlib.Path) -> None:
    out = kubectl("apply", "-f", str(example)).stdout
    assert "created" in out


@pytest.mark.parametrize("example", INVALID, ids=lambda p: p.name)
def test_every_invalid_example_is_rejected_naming_the_bad_field(kubectl, example: pathlib.Path) -> None:
    proc = kubectl("apply", "-f", str(example), check=False)
    assert proc.returncode != 0, f"{example.name} was accepted"
    assert expected_field(example) in proc.stderr, proc.stderr


def test_defaults_appear_on_read_back(kubectl, repo) -> None:
    kubectl("apply", "-f", str(repo / "examples" / "modelcache.yaml"))
    kubectl("apply", "-f", "-", input_text="""
apiVersion: stoker.dev/v1alpha1
kind: GenerationJob
metadata: {name: minimal}
spec: {model: sd15-base, params: {prompt: a red fox}}
""")
    job = json.loads(kubectl("get", "gj", "minimal", "-o", "json").stdout)
    assert job["spec"]["maxAttempts"] == 3
    assert job["spec"]["priority"] == 0
    assert job["spec"]["params"]["steps"] == 20
    assert job["spec"]["params"]["sampler"] == "euler_a"
    assert job["spec"]["params"]["width"] == 512
    mc = json.loads(kubectl("get", "mc", "sd15-base", "-o", "json").stdout)
    assert mc["spec"]["format"] == "safetensors"
    assert mc["spec"]["allowPickle"] is False
    assert mc["spec"]["kind"] == "checkpoint"


def test_get_shows_printer_columns_and_the_stoker_category(kubectl, repo) -> None:
    kubectl("apply", "-f", str(repo / "examples"))
    kubectl("apply", "-f", "-", input_text="""
apiVersion: stoker.dev/v1alpha1
kind: CacheAgent
metadata: {name: agent-a}
spec: {}
""")
    table = kubectl("get", "mc,gj,ca").stdout
    for header in ("KIND", "READY", "COPIES", "SIZE", "WARM", "HOT", "DEMAND", "MODEL", "PHASE", "PROGRESS",
                   "AGENT", "ATTEMPT", "HIT", "REASON", "CORDONED", "NODE", "GPU", "DISK", "VRAM", "MODELS",
                   "FREE SLOTS"):
        assert header in table, f"column {header} missing from:\n{table}"
    wide = kubectl("get", "mc,gj,ca", "-o", "wide").stdout
    for header in ("REPLICAS", "HOT REPLICAS", "SIZE SOURCE", "PRIORITY", "MAX ATTEMPTS", "QUEUED", "TOTAL", "ZONE",
                   "QUEUE SLOTS"):
        assert header in wide, f"-o wide column {header} missing from:\n{wide}"
    everything = kubectl("get", "stoker", "-o", "name").stdout.split()
    assert "modelcache.stoker.dev/sd15-base" in everything
    assert "generationjob.stoker.dev/lighthouse-watercolor" in everything
    assert "cacheagent.stoker.dev/agent-a" in everything
    # The category lists each kind with its own printer columns.
    tables = kubectl("get", "stoker").stdout.split("\n\n")
    by_kind: dict[str, str] = {}  # kind -> header line of its table
    for table in tables:
        lines = table.strip().splitlines()
        if len(lines) >= 2:
            by_kind[lines[1].split()[0].split("/")[0]] = lines[0]
    assert {"modelcache.stoker.dev", "generationjob.stoker.dev", "cacheagent.stoker.dev"} <= set(by_kind), by_kind
    for kind, columns in {"modelcache.stoker.dev": ("KIND", "READY", "COPIES", "WARM", "DEMAND"),
                          "generationjob.stoker.dev": ("MODEL", "PHASE", "PROGRESS", "AGENT", "HIT", "REASON"),
                          "cacheagent.stoker.dev": ("READY", "NODE", "GPU", "DISK", "FREE SLOTS")}.items():
        assert all(c in by_kind[kind] for c in columns), f"{kind}: {by_kind[kind]}"


def test_explain_shows_the_field_docs(control_plane) -> None:
    out = control_plane.kubectl("explain", "generationjob.spec.params").stdout
    assert "Denoising steps" in out
    assert "Classifier-free guidance scale" in out
    out = control_plane.kubectl("explain", "modelcache.spec.hotReplicas").stdout
    assert "loaded in GPU memory" in out


def test_status_changes_only_through_the_status_subresource(kubectl, repo) -> None:
    kubectl("apply", "-f", str(repo / "examples" / "generationjob.yaml"))
    kubectl("patch", "gj", "lighthouse-watercolor", "--type=merge", "-p", '{"status": {"phase": "Running"}}')
    job = json.loads(kubectl("get", "gj", "lighthouse-watercolor", "-o", "json").stdout)
    assert job.get("status", {}).get("phase") != "Running"
    kubectl("patch", "gj", "lighthouse-watercolor", "--subresource=status", "--type=merge",
            "-p", '{"status": {"phase": "Running", "attempt": 1}}')
    job = json.loads(kubectl("get", "gj", "lighthouse-watercolor", "-o", "json").stdout)
    assert job["status"]["phase"] == "Running"


def test_status_values_are_validated_too(kubectl, repo) -> None:
    kubectl("apply", "-f", str(repo / "examples" / "generationjob.yaml"))
    proc = kubectl("patch", "gj", "lighthouse-watercolor", "--subresource=status", "--type=merge",
                   "-p", '{"status": {"phase": "Exploded"}}', check=False)
    assert proc.returncode != 0
    assert "status.phase" in proc.stderr


def test_a_job_spec_is_immutable(kubectl, repo) -> None:
    kubectl("apply", "-f", str(repo / "examples" / "generationjob.yaml"))
    proc = kubectl("patch", "gj", "lighthouse-watercolor", "--type=merge",
                   "-p", '{"spec": {"priority": 99}}', check=False)
    assert proc.returncode != 0
    assert "immutable" in proc.stderr


@pytest.mark.parametrize(("patch", "field"), [
    ({"source": {"url": "https://elsewhere.example.com/x.safetensors"}}, "spec.source.url"),
    ({"source": {"sha256": "0" * 64}}, "spec.source.sha256"),
    ({"source": {"sha256": None}}, "spec.source.sha256"),
    ({"kind": "lora"}, "spec.kind"),
    ({"format": "ckpt", "allowPickle": True}, "spec.format"),
    ({"allowPickle": True}, "spec.allowPickle"),
], ids=["url", "sha256", "sha256-removed", "kind", "format", "allowPickle"])
def test_what_a_model_is_cannot_change_and_the_error_names_the_field(kubectl, repo, patch, field) -> None:
    kubectl("apply", "-f", str(repo / "examples" / "modelcache.yaml"))
    proc = kubectl("patch", "mc", "sd15-base", "--type=merge", "-p", json.dumps({"spec": patch}), check=False)
    assert proc.returncode != 0, f"{patch} was accepted"
    assert f"{field}: Forbidden" in proc.stderr and "immutable" in proc.stderr, proc.stderr


def test_credentials_size_hints_and_replicas_stay_changeable(kubectl, repo) -> None:
    kubectl("apply", "-f", str(repo / "examples" / "modelcache.yaml"))
    kubectl("patch", "mc", "sd15-base", "--type=merge", "-p", json.dumps({"spec": {
        "replicas": 5, "source": {"sizeBytes": 4265146305, "secretRef": {"name": "hub-token-2"}}}}))
    spec = json.loads(kubectl("get", "mc", "sd15-base", "-o", "json").stdout)["spec"]
    assert spec["replicas"] == 5
    assert spec["source"]["sizeBytes"] == 4265146305 and spec["source"]["secretRef"]["name"] == "hub-token-2"


def test_a_control_plane_that_cannot_start_reports_the_server_log_tail(tmp_path) -> None:
    with pytest.raises(controlplane.ControlPlaneError) as info:
        with controlplane.run_control_plane(workdir=tmp_path, extra_apiserver_args=["--no-such-flag"],
                                            startup_timeout_s=60):
            pass
    assert "kube-apiserver exited" in str(info.value)
    assert "unknown flag: --no-such-flag" in str(info.value)


def test_a_user_without_permissions_is_refused(control_plane, namespace) -> None:
    proc = control_plane.kubectl("-n", namespace, "get", "gj", user="nobody", check=False)
    assert proc.returncode != 0
    assert "forbidden" in proc.stderr.lower()
