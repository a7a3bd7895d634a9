"""Agents are isolated from each other by the API server: the chart's RBAC and admission policy,
with service-account tokens that the TokenRequest API bound to Pod objects (as a kubelet's are)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker import kube
from stoker.testing import identities
from stoker.testing.operator_harness import wait_for

from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION

API = "stoker.dev/v1alpha1"
CHART = pathlib.Path(__file__).resolve().parents[3] / "charts" / "stoker"


def job_body(name: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "GenerationJob", "metadata": {"name": name},
            "spec": {"model": "sd", "params": {"prompt": "a fox", "steps": 2}}}


def bind(admin: kube.Objects, name: str, *, agent: str) -> None:
    """Bind as the operator does: the label and attempt annotation in one patch."""
    admin.patch("GenerationJob", name, {"metadata": {"labels": {AGENT_LABEL: agent},
                                                     "annotations": {ATTEMPT_ANNOTATION: "1"}}})


@pytest.fixture(scope="module")
def iso_ns(control_plane, api_client, helm) -> str:  # type: ignore[no-untyped-def]
    """A namespace with the chart's RBAC and agent isolation policy, as `helm install` leaves them."""
    name = f"iso-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    rendered = subprocess.run(
        [helm, "template", "stoker", str(CHART), "--namespace", name, "--show-only", "templates/rbac.yaml",
         "--show-only", "templates/agent-admission-policy.yaml"], check=True, capture_output=True, text=True).stdout
    control_plane.kubectl("apply", "-f", "-", input_text=rendered)
    admin = kube.Objects(api_client, name)
    admin.create("ModelCache", {"apiVersion": API, "kind": "ModelCache", "metadata": {"name": "sd"},
                                "spec": {"source": {"url": "https://models.example.com/sd.safetensors"}}})
    # The policy takes effect once the API server has loaded it: wait until an unbound token is refused.
    probe = identities.unbound_token(control_plane, api_client, name)
    lease_api = client.CoordinationV1Api(kube.api_client(str(probe)))

    def refused() -> bool:
        try:
            lease_api.create_namespaced_lease(name, client.V1Lease(metadata=client.V1ObjectMeta(name=f"p{uuid.uuid4().hex[:6]}"),
                                                                   spec=client.V1LeaseSpec(holder_identity="x")))
        except ApiException as exc:
            return exc.status == 403 and "bound to their pod" in str(exc.body)
        return False

    wait_for(refused, timeout_s=30, message="the admission policy to take effect")
    return name


@pytest.fixture(scope="module")
def agents(control_plane, api_client, iso_ns) -> dict[str, identities.PodIdentity]:  # type: ignore[no-untyped-def]
    return {pod: identities.pod_identity(control_plane, api_client, iso_ns, pod) for pod in ("agent-a", "agent-b")}


def objects_of(identity: identities.PodIdentity) -> kube.Objects:
    return kube.Objects(identity.api_client(), identity.namespace)


def cache_agent(name: str, owner: identities.PodIdentity | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner.pod, "uid": owner.pod_uid,
                                    "controller": True, "blockOwnerDeletion": False}]
    return {"apiVersion": API, "kind": "CacheAgent", "metadata": meta, "spec": {}}


def lease(name: str, *, duration_s: int = 15) -> client.V1Lease:
    return client.V1Lease(metadata=client.V1ObjectMeta(name=name),
                          spec=client.V1LeaseSpec(holder_identity=name, lease_duration_seconds=duration_s))


def refused(attempt: Callable[[], object], *, says: str = "") -> str:
    with pytest.raises(ApiException) as info:
        attempt()
    assert info.value.status == 403, info.value.body
    body = json.loads(info.value.body)["message"]
    assert says in body, body
    return str(body)


@pytest.fixture(scope="module")
def registered(iso_ns, api_client, agents) -> dict[str, identities.PodIdentity]:  # type: ignore[no-untyped-def]
    """Each agent created its own CacheAgent (owned by its pod) and Lease, as the agent does at start."""
    for identity in agents.values():
        mine = objects_of(identity)
        mine.create("CacheAgent", cache_agent(identity.pod, identity))
        mine.patch_status("CacheAgent", identity.pod, {"slots": 1})
        client.CoordinationV1Api(identity.api_client()).create_namespaced_lease(iso_ns, lease(identity.pod))
    return agents


class TestOwnObjects:
    def test_an_agent_writes_its_own_cache_agent_lease_and_the_status_of_its_own_jobs(
            self, iso_ns, api_client, registered) -> None:  # type: ignore[no-untyped-def]
        a = registered["agent-a"]
        mine = objects_of(a)
        mine.patch_status("CacheAgent", "agent-a", {"slots": 2})
        client.CoordinationV1Api(a.api_client()).patch_namespaced_lease(
            "agent-a", iso_ns, {"spec": {"renewTime": kube.now_rfc3339()}})
        admin = kube.Objects(api_client, iso_ns)
        admin.create("GenerationJob", job_body("own-job"))
        bind(admin, "own-job", agent="agent-a")
        mine.patch_status("GenerationJob", "own-job", {"phase": "Running", "agent": "agent-a", "attempt": 1})
        assert admin.get("GenerationJob", "own-job")["status"]["phase"] == "Running"
        assert admin.get("CacheAgent", "agent-a")["status"]["slots"] == 2


class TestOtherAgents:
    def test_an_agent_cannot_patch_another_agents_cache_agent_status(self, registered) -> None:  # type: ignore[no-untyped-def]
        refused(lambda: objects_of(registered["agent-a"]).patch_status("CacheAgent", "agent-b", {"slots": 64}),
                says="may write only its own CacheAgent (agent-a), not agent-b")

    def test_an_agent_cannot_renew_or_shorten_another_agents_lease(self, iso_ns, registered) -> None:  # type: ignore[no-untyped-def]
        leases = client.CoordinationV1Api(registered["agent-a"].api_client())
        refused(lambda: leases.patch_namespaced_lease("agent-b", iso_ns, {"spec": {"leaseDurationSeconds": 1}}),
                says="may write only its own Lease (agent-a), not agent-b")

    def test_an_agent_cannot_create_a_fake_cache_agent_to_capture_jobs(self, registered) -> None:  # type: ignore[no-untyped-def]
        refused(lambda: objects_of(registered["agent-a"]).create("CacheAgent", cache_agent("agent-z")),
                says="may write only its own CacheAgent (agent-a), not agent-z")

    def test_an_agent_cannot_create_a_lease_for_a_fake_agent(self, iso_ns, registered) -> None:  # type: ignore[no-untyped-def]
        leases = client.CoordinationV1Api(registered["agent-a"].api_client())
        refused(lambda: leases.create_namespaced_lease(iso_ns, lease("agent-z")), says="not agent-z")

    def test_an_agent_cannot_claim_another_pod_as_its_cache_agents_owner(
            self, control_plane, api_client, iso_ns, registered) -> None:  # type: ignore[no-untyped-def]
        c = identities.pod_identity(control_plane, api_client, iso_ns, "agent-c")
        refused(lambda: objects_of(c).create("CacheAgent", cache_agent("agent-c", registered["agent-b"])),
                says="owned only by the agent's own pod")

    def test_an_agent_cannot_mark_a_job_bound_elsewhere_succeeded(self, iso_ns, api_client, registered) -> None:  # type: ignore[no-untyped-def]
        admin = kube.Objects(api_client, iso_ns)
        admin.create("GenerationJob", job_body("b-job"))
        bind(admin, "b-job", agent="agent-b")
        forged = {"phase": "Succeeded", "result": {"location": "https://evil.example/x.png", "sha256": "0" * 64,
                                                   "bytes": 1}}
        refused(lambda: objects_of(registered["agent-a"]).patch_status("GenerationJob", "b-job", forged),
                says="may write only the status of jobs bound to it")
        assert admin.get("GenerationJob", "b-job").get("status", {}).get("phase") != "Succeeded"

    def test_an_agent_cannot_write_the_status_of_an_unbound_job(self, iso_ns, api_client, registered) -> None:  # type: ignore[no-untyped-def]
        kube.Objects(api_client, iso_ns).create("GenerationJob", job_body("free-job"))
        refused(lambda: objects_of(registered["agent-a"]).patch_status("GenerationJob", "free-job", {"phase": "Failed"}),
                says="bound to it")


class TestEvents:
    def test_an_agent_records_events_only_under_its_own_name(self, iso_ns, api_client, registered) -> None:  # type: ignore[no-untyped-def]
        admin = kube.Objects(api_client, iso_ns)
        admin.create("GenerationJob", job_body("event-job"))
        job = admin.get("GenerationJob", "event-job")
        core = client.CoreV1Api(registered["agent-a"].api_client())

        def event(component: str) -> object:
            return core.create_namespaced_event(iso_ns, client.CoreV1Event(
                metadata=client.V1ObjectMeta(name=f"event-job.{uuid.uuid4().hex[:8]}"),
                involved_object=client.V1ObjectReference(api_version=API, kind="GenerationJob", name="event-job",
                                                         namespace=iso_ns, uid=job["metadata"]["uid"]),
                reason="Succeeded", message="forged", type="Normal", source=client.V1EventSource(component=component)))

        event("stoker-agent/agent-a")  # its own
        refused(lambda: event("stoker-operator"), says="may record Events only as stoker-agent/agent-a")
        refused(lambda: event("stoker-agent/agent-b"), says="only as stoker-agent/agent-a")


class TestOperatorLease:
    def test_an_agent_cannot_take_the_operators_leader_lease(self, iso_ns, api_client, registered) -> None:  # type: ignore[no-untyped-def]
        leases = client.CoordinationV1Api(registered["agent-a"].api_client())
        refused(lambda: leases.create_namespaced_lease(iso_ns, lease("stoker-operator", duration_s=3600)),
                says="leader Lease is not the agents'")
        client.CoordinationV1Api(api_client).create_namespaced_lease(iso_ns, client.V1Lease(
            metadata=client.V1ObjectMeta(name="stoker-operator"),
            spec=client.V1LeaseSpec(holder_identity="operator-0", lease_duration_seconds=15)))
        refused(lambda: leases.patch_namespaced_lease("stoker-operator", iso_ns, {
            "spec": {"holderIdentity": "agent-a", "leaseDurationSeconds": 3600}}), says="leader Lease")
        held = client.CoordinationV1Api(api_client).read_namespaced_lease("stoker-operator", iso_ns)
        assert (held.spec.holder_identity, held.spec.lease_duration_seconds) == ("operator-0", 15)


class TestTokens:
    def test_a_token_bound_to_no_pod_writes_nothing(self, control_plane, api_client, iso_ns, registered) -> None:  # type: ignore[no-untyped-def]
        unbound = kube.Objects(kube.api_client(str(identities.unbound_token(control_plane, api_client, iso_ns))), iso_ns)
        refused(lambda: unbound.patch_status("CacheAgent", "agent-a", {"slots": 9}), says="bound to their pod")

    def test_a_token_outlives_its_pod_by_nothing(self, control_plane, api_client, iso_ns) -> None:  # type: ignore[no-untyped-def]
        gone = identities.pod_identity(control_plane, api_client, iso_ns, "agent-gone")
        client.CoreV1Api(api_client).delete_namespaced_pod("agent-gone", iso_ns, grace_period_seconds=0)
        with pytest.raises(ApiException) as info:
            objects_of(gone).create("CacheAgent", cache_agent("agent-gone"))
        assert info.value.status == 401  # the token was bound to the pod, which is gone

    def test_the_agent_identity_reads_no_secrets(self, iso_ns, registered) -> None:  # type: ignore[no-untyped-def]
        refused(lambda: objects_of(registered["agent-a"]).core.list_namespaced_secret(iso_ns))
