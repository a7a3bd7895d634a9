"""One active operator: restarts and a second operator never lose a job or bind one twice."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from stoker.kube import Objects
from stoker.testing.fake_agent import FakeAgent, FakeAgentConfig
from stoker.testing.operator_harness import operator_process, wait_for


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> Objects:
    return Objects(api_client, namespace)



@pytest.fixture
def fleet(api_client: client.ApiClient, namespace: str, objects: Objects) -> Iterator[list[FakeAgent]]:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "sd"},
                                  "spec": {"source": {"url": "https://models.example.com/sd.safetensors"}, "replicas": 0}})
    agents = [FakeAgent(api_client, FakeAgentConfig(name=f"agent-{i}", namespace=namespace, slots=2, job_seconds=0.2,
                                                    models={"sd": ("vram", 1 << 30)})).start() for i in range(5)]
    yield agents
    for a in agents:
        a.stop()


def create_jobs(objects: Objects, names: list[str]) -> None:
    for name in names:
        objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                         "metadata": {"name": name},
                                         "spec": {"model": "sd", "params": {"prompt": "a lighthouse", "steps": 2}}})


def succeeded(objects: Objects) -> set[str]:
    return {j["metadata"]["name"] for j in objects.list("GenerationJob")["items"]
            if (j.get("status") or {}).get("phase") == "Succeeded"}


def assert_each_ran_once(objects: Objects, agents: list[FakeAgent], names: list[str]) -> None:
    runs = collections.Counter(name for a in agents for name, _ in a.started)
    assert {n: c for n, c in runs.items() if c != 1} == {}, "a job was started more than once"
    assert set(runs) == set(names)
    for j in objects.list("GenerationJob")["items"]:
        st = j["status"]
        assert st["attempt"] == 1, f"{j['metadata']['name']} was bound again: {st}"
        assert all(h["outcome"] == "Succeeded" for h in st.get("history", [])), st


def test_restarting_the_operator_under_load_loses_no_job_and_binds_none_twice(
        control_plane, namespace, objects, fleet, tmp_path) -> None:
    names = [f"job-{i:03d}" for i in range(60)]
    first = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator-1.log", identity="op-1").start()
    second = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator-2.log", identity="op-2")
    try:
        feeder = threading.Thread(target=create_jobs, args=(objects, names))
        feeder.start()
        wait_for(lambda: len(succeeded(objects)) >= 10, timeout_s=60, message="the first jobs to finish")
        first.kill()
        feeder.join()
        second.start()
        wait_for(lambda: len(succeeded(objects)) == len(names), timeout_s=90,
                 message=lambda: f"all jobs to finish after the restart ({len(succeeded(objects))}/{len(names)})")
    finally:
        first.kill()
        second.stop()
    assert_each_ran_once(objects, fleet, names)


def test_two_operators_at_once_never_bind_a_job_twice(control_plane, namespace, objects, fleet, tmp_path) -> None:
    ops = [operator_process(control_plane.kubeconfig, namespace, tmp_path / f"operator-{i}.log", identity=f"op-{i}").start()
           for i in (1, 2)]
    try:
        names = [f"job-{i:03d}" for i in range(40)]
        create_jobs(objects, names)
        wait_for(lambda: len(succeeded(objects)) == len(names), timeout_s=60, message="the jobs to finish")
        leaders = [op for op in ops if "is now the leader" in op.log_path.read_text()]
        assert len(leaders) == 1, "exactly one operator leads"
        leader = leaders[0]
        standby = next(op for op in ops if op is not leader)
        # The standby takes over when the leader dies without releasing its Lease.
        leader.kill()
        more = [f"late-{i:03d}" for i in range(20)]
        create_jobs(objects, more)
        wait_for(lambda: len(succeeded(objects)) == len(names) + len(more), timeout_s=60,
                 message="the standby to take over and finish the late jobs")
        assert "is now the leader" in standby.log_path.read_text()
    finally:
        for op in ops:
            op.stop()
    assert_each_ran_once(objects, fleet, names + more)


def test_a_lease_written_with_an_hour_long_duration_does_not_lock_the_operators_out(
        control_plane, api_client, namespace, objects, fleet, tmp_path) -> None:
    import datetime as dt

    coord = client.CoordinationV1Api(api_client)
    now = dt.datetime.now(dt.timezone.utc)
    coord.create_namespaced_lease(namespace, client.V1Lease(
        metadata=client.V1ObjectMeta(name="stoker-operator"),
        spec=client.V1LeaseSpec(holder_identity="intruder", lease_duration_seconds=3600, acquire_time=now,
                                renew_time=now)))
    op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log", identity="op-1",
                          leader_lease_s=4.0).start()
    try:
        started = time.monotonic()
        wait_for(lambda: coord.read_namespaced_lease("stoker-operator", namespace).spec.holder_identity == "op-1",
                 timeout_s=30, message="the operator to take the Lease over")
        waited = time.monotonic() - started
        names = [f"job-{i}" for i in range(5)]
        create_jobs(objects, names)
        wait_for(lambda: len(succeeded(objects)) == len(names), timeout_s=60, message="the jobs to finish")
    finally:
        op.stop()
    # Its own 4 s Lease, not the intruder's hour; the rest is process start-up and one retry period.
    assert waited < 4.0 + 15, f"took {waited:.1f}s to take the Lease over"
    assert coord.read_namespaced_lease("stoker-operator", namespace).spec.lease_duration_seconds <= 4
