"""The operator against a real API server: placement, failure handling, TTL, replicas, events.

Each test runs the `stoker-operator` entry point as a process watching the test's
namespace, with fake agents that speak the agent protocol through the API server.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from stoker.kube import Objects
from stoker.testing.fake_agent import FakeAgent, FakeAgentConfig
from stoker.testing.operator_harness import Process, fake_agent_process, operator_process, wait_for

GIB = 1 << 30


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> Objects:
    return Objects(api_client, namespace)


@pytest.fixture
def operator(control_plane, namespace: str, tmp_path: pathlib.Path) -> Iterator[Process]:
    proc = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def agents(api_client: client.ApiClient, namespace: str) -> Iterator[Any]:
    started: list[FakeAgent] = []

    def start(name: str, **kwargs: Any) -> FakeAgent:
        agent = FakeAgent(api_client, FakeAgentConfig(name=name, namespace=namespace, **kwargs)).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()



def model(objects: Objects, name: str, *, size_bytes: int = GIB, replicas: int = 0, hot: int = 0) -> None:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": name},
                                  "spec": {"source": {"url": f"https://models.example.com/{name}.safetensors",
                                                      "sizeBytes": size_bytes},
                                           "replicas": replicas, "hotReplicas": hot}})


def job(objects: Objects, name: str, model_name: str, **spec: Any) -> None:
    objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                     "metadata": {"name": name},
                                     "spec": {"model": model_name, "params": {"prompt": "a red fox", "steps": 4}, **spec}})


def status(objects: Objects, name: str) -> dict[str, Any]:
    return objects.get("GenerationJob", name).get("status") or {}


def finished(objects: Objects, name: str) -> dict[str, Any] | None:
    """The status once the job is over and the operator has recorded how its last attempt ended."""
    st = status(objects, name)
    if st.get("phase") not in ("Succeeded", "Failed"):
        return None
    if st.get("agent") and not any(h["attempt"] == st.get("attempt") for h in st.get("history", [])):
        return None
    if st.get("phase") == "Succeeded" and not st.get("history"):
        return None
    return st


def events_for(objects: Objects, name: str) -> list[str]:
    evs = objects.core.list_namespaced_event(objects.namespace, field_selector=f"involvedObject.name={name}")
    return [e.reason for e in evs.items]


def test_jobs_go_to_the_agent_holding_their_model_in_the_fastest_tier(operator, agents, objects) -> None:
    for name in ("sd-hot", "sd-warm", "sd-cold"):
        model(objects, name, size_bytes=4 * GIB)
    agents("agent-a", models={"sd-hot": ("vram", 4 * GIB)}, job_seconds=0.1)
    agents("agent-b", models={"sd-warm": ("disk", 4 * GIB)}, job_seconds=0.1)
    agents("agent-c", job_seconds=0.1)
    job(objects, "hot-job", "sd-hot")
    job(objects, "warm-job", "sd-warm")
    results = {n: wait_for(lambda n=n: finished(objects, n), timeout_s=30, message=f"{n} to finish", interval_s=0.2)
               for n in ("hot-job", "warm-job")}
    assert results["hot-job"]["phase"] == "Succeeded"
    assert results["hot-job"]["agent"] == "agent-a"
    assert results["hot-job"]["cacheHit"] == "vram"
    assert results["warm-job"]["agent"] == "agent-b"
    assert results["warm-job"]["cacheHit"] == "disk"
    job(objects, "cold-job", "sd-cold")
    cold = wait_for(lambda: finished(objects, "cold-job"), timeout_s=30, message="cold-job to finish")
    assert cold["phase"] == "Succeeded"
    assert cold["cacheHit"] == "miss"
    assert cold["attempt"] == 1
    history = wait_for(lambda: status(objects, "cold-job").get("history"), timeout_s=10, message="history")
    assert [(h["attempt"], h["agent"], h["outcome"]) for h in history] == [(1, cold["agent"], "Succeeded")]
    # Finished jobs lose their binding label, so agents' watches let go of them.
    labels = wait_for(lambda: objects.get("GenerationJob", "cold-job")["metadata"].get("labels") is None
                      or "stoker.dev/agent" not in objects.get("GenerationJob", "cold-job")["metadata"]["labels"],
                      timeout_s=10, message="the binding label to go")
    assert labels
    assert wait_for(lambda: "Scheduled" in events_for(objects, "hot-job"), timeout_s=10, message="a Scheduled event")


def test_a_killed_agent_loses_its_job_to_another_after_the_lease_grace(
        operator, objects, control_plane, namespace, tmp_path, agents) -> None:
    model(objects, "sd-a")
    doomed = fake_agent_process(control_plane.kubeconfig, namespace, "doomed", tmp_path / "doomed.log",
                                "--model", f"sd-a:vram:{GIB}", "--job-seconds", "120").start()
    try:
        wait_for(lambda: objects.get("CacheAgent", "doomed").get("status", {}).get("slots"), timeout_s=30,
                 message="the doomed agent to register")
        job(objects, "survivor", "sd-a")
        running = wait_for(lambda: status(objects, "survivor").get("phase") == "Running"
                           and status(objects, "survivor").get("agent"), timeout_s=30,
                           message="the job to run on the doomed agent")
        assert running == "doomed"
        agents("rescuer", job_seconds=0.1)
        doomed.kill()
        done = wait_for(lambda: finished(objects, "survivor"), timeout_s=40, message="the job to finish elsewhere")
    finally:
        doomed.kill()
    assert done["phase"] == "Succeeded"
    assert done["agent"] == "rescuer"
    assert done["attempt"] == 2
    history = wait_for(lambda: len(status(objects, "survivor").get("history", [])) == 2
                       and status(objects, "survivor")["history"], timeout_s=10, message="history")
    assert [(h["agent"], h["outcome"], h["reason"]) for h in history] == [
        ("doomed", "Requeued", "AgentLost"), ("rescuer", "Succeeded", "")]
    ready = wait_for(lambda: next(c for c in objects.get("CacheAgent", "doomed")["status"]["conditions"]
                                  if c["type"] == "Ready" and c["status"] == "False"), timeout_s=10,
                     message="the doomed agent to be NotReady")
    assert ready["reason"] == "LeaseExpired"
    reasons = wait_for(lambda: (r := events_for(objects, "survivor")).count("Scheduled") == 2 and "Requeued" in r and r,
                       timeout_s=10, message="Scheduled, Requeued, Scheduled events")
    assert reasons.count("Scheduled") == 2


def test_a_job_failing_on_every_agent_ends_with_attempts_exhausted(operator, agents, objects) -> None:
    model(objects, "sd-flaky")
    for name in ("agent-a", "agent-b", "agent-c"):
        agents(name, failing_models={"sd-flaky": "GenerationFailed"}, job_seconds=0.05)
    job(objects, "unlucky", "sd-flaky", maxAttempts=2)
    done = wait_for(lambda: finished(objects, "unlucky"), timeout_s=30, message="the job to fail")
    assert done["phase"] == "Failed"
    assert done["reason"] == "AttemptsExhausted"
    history = done["history"]
    assert [h["outcome"] for h in history] == ["Failed", "Failed"]
    assert len({h["agent"] for h in history}) == 2, "a failed agent is never chosen again for the same job"
    assert wait_for(lambda: "Failed" in events_for(objects, "unlucky"), timeout_s=10, message="a Failed event")


def test_a_job_that_cannot_start_in_time_fails_with_deadline_exceeded(operator, objects) -> None:
    model(objects, "sd-a")
    job(objects, "too-late", "sd-a", timeoutSeconds=2)
    done = wait_for(lambda: finished(objects, "too-late"), timeout_s=20, message="the deadline to pass")
    assert done["phase"] == "Failed"
    assert done["reason"] == "DeadlineExceeded"


def test_a_finished_job_is_deleted_after_its_ttl(operator, agents, objects) -> None:
    model(objects, "sd-a")
    agents("agent-a", job_seconds=0.05)
    job(objects, "ephemeral", "sd-a", ttlSecondsAfterFinished=1)
    wait_for(lambda: finished(objects, "ephemeral"), timeout_s=30, message="the job to finish")

    def gone() -> bool:
        try:
            objects.get("GenerationJob", "ephemeral")
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    assert wait_for(gone, timeout_s=20, message="the TTL to delete the job")


def test_a_model_whose_source_keeps_failing_is_marked_failed_and_its_jobs_fail(operator, agents, objects) -> None:
    model(objects, "sd-broken", replicas=1)
    agents("agent-a", bad_sources={"sd-broken": "ChecksumMismatch"})

    def failed_condition() -> dict[str, Any] | None:
        conds = (objects.get("ModelCache", "sd-broken").get("status") or {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "Failed" and c["status"] == "True"), None)

    cond = wait_for(failed_condition, timeout_s=30, message="the ModelCache to be Failed")
    assert cond["reason"] == "ChecksumMismatch"
    job(objects, "doomed-job", "sd-broken")
    done = wait_for(lambda: finished(objects, "doomed-job"), timeout_s=20, message="the job to fail")
    assert done["phase"] == "Failed"
    assert done["reason"] == "ModelUnavailable"
    assert "ChecksumMismatch" in done["message"]


def model_condition(objects: Objects, name: str, type_: str) -> dict[str, Any] | None:
    conds = (objects.get("ModelCache", name).get("status") or {}).get("conditions", [])
    return next((c for c in conds if c["type"] == type_), None)


def test_a_failed_model_recovers_at_once_when_its_modelcache_is_created_again_with_a_good_source(
        operator, agents, objects) -> None:
    model(objects, "sd-wrong")
    agent = agents("agent-a", bad_sources={"sd-wrong": "ChecksumMismatch"}, job_seconds=0.05)
    job(objects, "first", "sd-wrong")
    first = wait_for(lambda: finished(objects, "first"), timeout_s=30, message="the first job to fail")
    assert (first["phase"], first["reason"]) == ("Failed", "ChecksumMismatch")
    wait_for(lambda: (c := model_condition(objects, "sd-wrong", "Failed")) and c["status"] == "True", timeout_s=30,
             message="the ModelCache to be Failed")
    old_uid = objects.get("ModelCache", "sd-wrong")["metadata"]["uid"]
    # url and sha256 cannot change in place: the ModelCache is deleted and created again, corrected.
    objects.delete("ModelCache", "sd-wrong")

    def gone() -> bool:
        try:
            objects.get("ModelCache", "sd-wrong")
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout_s=20, message="the ModelCache to be deleted")
    agent.cfg.bad_sources.pop("sd-wrong")
    model(objects, "sd-wrong")
    reported = objects.get("CacheAgent", "agent-a")["status"]["modelFailures"]
    assert [(f["name"], f["uid"]) for f in reported] == [("sd-wrong", old_uid)], "the agent still stands by it"
    job(objects, "second", "sd-wrong")
    second = wait_for(lambda: finished(objects, "second"), timeout_s=30, message="the second job to finish")
    assert (second["phase"], second.get("agent")) == ("Succeeded", "agent-a"), second
    cond = wait_for(lambda: (c := model_condition(objects, "sd-wrong", "Failed")) and c, timeout_s=20,
                    message="the new ModelCache's Failed condition")
    assert cond["status"] == "False", cond


def test_a_source_failing_with_retryable_errors_on_several_agents_is_failed_until_a_copy_appears(
        operator, agents, objects) -> None:
    model(objects, "sd-flaky", replicas=3)
    fleet = [agents(name, flaky_sources={"sd-flaky": "HTTPServerError"}, job_seconds=0.05)
             for name in ("agent-a", "agent-b", "agent-c")]
    cond = wait_for(lambda: (c := model_condition(objects, "sd-flaky", "Failed")) and c["status"] == "True" and c,
                    timeout_s=30, message="the ModelCache to be Failed after retryable failures on three agents")
    assert cond["reason"] == "HTTPServerError"
    assert "3 agent(s)" in cond["message"]
    job(objects, "hopeless", "sd-flaky")
    done = wait_for(lambda: finished(objects, "hopeless"), timeout_s=20, message="the job to fail")
    assert (done["phase"], done["reason"]) == ("Failed", "ModelUnavailable")
    assert done.get("history", []) == [], "no attempt was spent on a source that is down"
    # A copy appears (the source came back for one agent): the model recovers and jobs run again.
    fleet[1].add_model("sd-flaky")
    wait_for(lambda: model_condition(objects, "sd-flaky", "Failed")["status"] == "False", timeout_s=30,  # type: ignore[index]
             message="the Failed condition to clear once a copy exists")
    job(objects, "hopeful", "sd-flaky")
    ok = wait_for(lambda: finished(objects, "hopeful"), timeout_s=30, message="the job to run on the copy")
    assert (ok["phase"], ok["agent"]) == ("Succeeded", "agent-b")
    assert wait_for(lambda: {"SourceFailed", "SourceRecovered"} <= set(events_for(objects, "sd-flaky")), timeout_s=10,
                    message="SourceFailed and SourceRecovered events")


def test_a_job_whose_downloads_keep_failing_across_agents_ends_model_unavailable_not_attempts_exhausted(
        operator, agents, objects) -> None:
    model(objects, "sd-down")
    for name in ("agent-a", "agent-b", "agent-c"):
        agents(name, flaky_sources={"sd-down": "Timeout"}, job_seconds=0.05)
    job(objects, "retried", "sd-down", maxAttempts=10)
    done = wait_for(lambda: finished(objects, "retried"), timeout_s=40, message="the job to fail")
    assert (done["phase"], done["reason"]) == ("Failed", "ModelUnavailable"), done
    history = done["history"]
    assert len(history) == 3 and len({h["agent"] for h in history}) == 3, history
    assert [h["outcome"] for h in history] == ["Failed", "Failed", "Failed"]
    assert history[-1]["reason"] == "ModelUnavailable" and "Timeout" in history[-1]["message"]


def test_every_transition_of_a_job_is_an_event_written_once(operator, agents, objects) -> None:
    model(objects, "sd-a", replicas=1)
    agents("agent-a", models={"sd-a": ("vram", GIB)}, job_seconds=0.05)
    job(objects, "watched", "sd-a", ttlSecondsAfterFinished=1)
    want = ["Scheduled", "Running", "Succeeded", "Expired"]
    reasons = wait_for(lambda: all(r in (got := events_for(objects, "watched")) for r in want) and got, timeout_s=30,
                       message=lambda: f"{want} events (got {events_for(objects, 'watched')})")
    assert sorted(reasons) == sorted(want), "one Event per transition, from one writer each"
    evs = objects.core.list_namespaced_event(objects.namespace, field_selector="involvedObject.name=watched").items
    by_reason = {e.reason: e for e in evs}
    assert by_reason["Scheduled"].source.component == "stoker-operator"
    assert by_reason["Running"].source.component == "stoker-agent"
    assert by_reason["Scheduled"].count == 1 and by_reason["Scheduled"].first_timestamp is not None
    assert wait_for(lambda: {"ReplicaAdded", "CopiesExist"} <= set(events_for(objects, "sd-a")), timeout_s=10,
                    message="ModelCache events")


def test_raising_the_replica_target_adds_copies_and_lowering_it_releases_them(operator, agents, objects) -> None:
    model(objects, "sd-pop", replicas=2)
    for name, zone in (("agent-a", "z1"), ("agent-b", "z2"), ("agent-c", "z1")):
        agents(name, zone=zone, node=f"node-{name}")

    def holders() -> set[str]:
        return {a["metadata"]["name"] for a in objects.list("CacheAgent")["items"]
                if any(h["model"] == "sd-pop" for h in (a.get("spec") or {}).get("holds") or [])}

    def mc_status() -> dict[str, Any]:
        return objects.get("ModelCache", "sd-pop").get("status") or {}

    def ready(want_disk: int) -> bool:
        st = mc_status()
        cond = {c["type"]: c["status"] for c in st.get("conditions", [])}
        return st.get("copies", {}).get("disk") == want_disk and cond.get("Ready") == "True"

    wait_for(lambda: len(holders()) == 2 and ready(2), timeout_s=30, message=lambda: f"2 copies ({holders()}, {mc_status()})")
    zones = {"agent-a": "z1", "agent-b": "z2", "agent-c": "z1"}
    assert {zones[a] for a in holders()} == {"z1", "z2"}, "copies are spread across zones"
    assert mc_status()["desiredReplicas"] == 2

    objects.patch("ModelCache", "sd-pop", {"spec": {"replicas": 3}})
    wait_for(lambda: len(holders()) == 3 and ready(3), timeout_s=30, message=lambda: f"3 copies ({holders()})")

    objects.patch("ModelCache", "sd-pop", {"spec": {"replicas": 1}})
    wait_for(lambda: len(holders()) == 1, timeout_s=30, message=lambda: f"1 held copy ({holders()})")
    assert mc_status()["desiredReplicas"] == 1
    assert wait_for(lambda: {"ReplicaAdded", "ReplicaReleased", "TargetMet"} <= set(events_for(objects, "sd-pop")),
                    timeout_s=10, message="ReplicaAdded, ReplicaReleased and TargetMet events")


def test_metrics_count_bindings_by_tier_and_their_latency(control_plane, namespace, agents, objects, tmp_path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log",
                            extra=["--metrics-port", str(port)]).start()
    try:
        model(objects, "sd-a")
        agents("agent-a", models={"sd-a": ("vram", GIB)}, job_seconds=0.05)
        job(objects, "counted", "sd-a")
        wait_for(lambda: finished(objects, "counted"), timeout_s=30, message="the job to finish")

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line.startswith("stoker_")}

        metrics = wait_for(lambda: (m := scrape()).get('stoker_bindings_total{tier="vram"}') == 1.0 and m,
                           timeout_s=10, message="the binding to be counted")
        assert metrics["stoker_bind_latency_seconds_count"] == 1.0
        assert metrics["stoker_leader"] == 1.0
        assert "stoker_pending_jobs" in metrics and "stoker_replica_shortfall" in metrics
    finally:
        proc.stop()


def test_deleting_a_bound_job_cancels_it_and_frees_its_slot(operator, agents, objects) -> None:
    model(objects, "sd-a")
    agent = agents("agent-a", models={"sd-a": ("vram", GIB)}, job_seconds=300)
    job(objects, "unwanted", "sd-a")
    wait_for(lambda: status(objects, "unwanted").get("phase") == "Running", timeout_s=30, message="the job to run")
    job(objects, "next", "sd-a")
    objects.delete("GenerationJob", "unwanted")
    bound = wait_for(lambda: objects.get("GenerationJob", "next")["metadata"].get("labels", {}).get("stoker.dev/agent"),
                     timeout_s=30, message="the freed slot to take the next job")
    assert bound == "agent-a"
    assert ("unwanted", 1) in agent.started and ("unwanted", 1) not in agent.completed


def test_a_binding_is_one_write_and_a_job_its_agent_never_accepted_is_requeued_when_the_agent_is_lost(
        operator, agents, objects) -> None:
    model(objects, "sd-one")
    silent = agents("silent", models={"sd-one": ("vram", GIB)}, accept_jobs=False, lease_duration_s=2)
    created = objects.create("GenerationJob", {
        "apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": "lonely"},
        "spec": {"model": "sd-one", "params": {"prompt": "a red fox", "steps": 4}}})
    seen: list[tuple[str, dict[str, Any]]] = []
    stop = threading.Event()

    def watch_job() -> None:  # every change after the creation, in order
        rv = created["metadata"]["resourceVersion"]
        while not stop.is_set():
            for ev in watch.Watch().stream(objects.custom.list_namespaced_custom_object, "stoker.dev", "v1alpha1",
                                           objects.namespace, "generationjobs", field_selector="metadata.name=lonely",
                                           resource_version=rv, timeout_seconds=2):
                rv = ev["object"]["metadata"]["resourceVersion"]
                seen.append((ev["type"], ev["object"]))

    watcher = threading.Thread(target=watch_job, daemon=True)
    watcher.start()
    try:
        bound = wait_for(lambda: (o := objects.get("GenerationJob", "lonely"))["metadata"].get("labels", {}).get(
            "stoker.dev/agent") and o, timeout_s=20, message="the binding label")
        annotations = bound["metadata"]["annotations"]
        assert annotations["stoker.dev/attempt"] == "1" and "stoker.dev/scheduled-at" in annotations
        assert not (bound.get("status") or {}).get("agent"), "the operator writes no status for a binding"
        assert "Scheduled" in wait_for(lambda: events_for(objects, "lonely"), timeout_s=10, message="the Event")
        silent.crash()  # its Lease stops; it never accepted the job
        requeued = wait_for(lambda: (st := status(objects, "lonely")).get("history") and st, timeout_s=30,
                            message=lambda: f"the requeue ({status(objects, 'lonely')})")
        assert (requeued["phase"], requeued["attempt"]) == ("Pending", 2)
        assert [(h["attempt"], h["agent"], h["outcome"], h["reason"]) for h in requeued["history"]] == [
            (1, "silent", "Requeued", "AgentLost")]
        after = objects.get("GenerationJob", "lonely")["metadata"]
        assert "stoker.dev/agent" not in (after.get("labels") or {})
        assert after["annotations"].get("stoker.dev/unbound") == "silent/1"
        wait_for(lambda: len(seen) >= 3, timeout_s=10, message=lambda: f"3 watch events (got {len(seen)})")
    finally:
        stop.set()
    # Bound (one write, nothing in status); unbound; requeued (status). Nothing else.
    changes = [(t, (o["metadata"].get("labels") or {}).get("stoker.dev/agent"), (o.get("status") or {}).get("attempt"))
               for t, o in seen]
    # (status.attempt is 0 from creation, a CRD default, until the requeue writes attempt 2)
    assert changes[:3] == [("MODIFIED", "silent", 0), ("MODIFIED", None, 0), ("MODIFIED", None, 2)], changes
    # A new agent takes the second attempt.
    agents("rescuer", models={"sd-one": ("disk", GIB)}, job_seconds=0.05)
    done = wait_for(lambda: finished(objects, "lonely"), timeout_s=30, message="the job to finish on the rescuer")
    assert (done["phase"], done["agent"], done["attempt"]) == ("Succeeded", "rescuer", 2)
    assert done["scheduledAt"] <= done["startedAt"]
