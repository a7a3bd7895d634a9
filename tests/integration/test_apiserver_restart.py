"""kube-apiserver restarts under two operator processes: leadership fails over within the
leader Lease plus 5 s of the server coming back, and scheduling resumes.

Its own control plane (the session's is shared by every other test and must not go down).
"""

from __future__ import annotations

import datetime as dt
import pathlib
import time
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from stoker.kube import Objects
from stoker.testing import controlplane
from stoker.testing.fake_agent import FakeAgent, FakeAgentConfig
from stoker.testing.operator_harness import Process, operator_process, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
LEADER_LEASE_S = 6.0
OUTAGE_S = 10.0  # longer than the Lease: the leader cannot renew and must give way


@pytest.fixture
def own_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    with controlplane.run_control_plane(workdir=tmp_path_factory.mktemp("restartable-cp"), crd_dir=REPO / "crds") as cp:
        yield cp


def _jobs(objects: Objects, names: list[str]) -> None:
    for name in names:
        objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                         "metadata": {"name": name},
                                         "spec": {"model": "sd", "params": {"prompt": "a harbour", "steps": 2}}})


def _succeeded(objects: Objects) -> set[str]:
    return {j["metadata"]["name"] for j in objects.list("GenerationJob")["items"]
            if (j.get("status") or {}).get("phase") == "Succeeded"}


def _lease(coord: client.CoordinationV1Api, namespace: str) -> tuple[str | None, dt.datetime | None]:
    spec = coord.read_namespaced_lease("stoker-operator", namespace, _request_timeout=(2, 5)).spec
    return spec.holder_identity, spec.renew_time


def test_operators_fail_over_and_schedule_again_after_the_api_server_restarts(own_control_plane, tmp_path) -> None:
    cp = own_control_plane
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))
    ns = "restart"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    objects = Objects(api, ns)
    coord = client.CoordinationV1Api(api)
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "sd"},
                                  "spec": {"source": {"url": "https://models.example.com/sd.safetensors"}, "replicas": 0}})
    agents = [FakeAgent(api, FakeAgentConfig(name=f"agent-{i}", namespace=ns, slots=2, job_seconds=0.2,
                                             models={"sd": ("vram", 1 << 30)})).start() for i in range(3)]
    ops: dict[str, Process] = {
        ident: operator_process(cp.kubeconfig, ns, tmp_path / f"{ident}.log", identity=ident,
                                leader_lease_s=LEADER_LEASE_S).start()
        for ident in ("op-a", "op-b")}
    try:
        before = [f"before-{i:02d}" for i in range(10)]
        _jobs(objects, before)
        wait_for(lambda: _succeeded(objects) >= set(before), timeout_s=90, message="the first jobs to finish")

        cp.restart_apiserver(down_s=OUTAGE_S)
        back = time.monotonic()
        back_wall = dt.datetime.now(dt.timezone.utc)

        def live_leader() -> str | None:
            holder, renewed = _lease(coord, ns)
            if holder in ops and ops[holder].alive and renewed is not None and renewed > back_wall:
                return holder
            return None

        leader = wait_for(live_leader, timeout_s=LEADER_LEASE_S + 30, interval_s=0.2,
                          message="a live operator to hold and renew the leader Lease")
        failover_s = time.monotonic() - back
        print(f"leader {leader} renewing {failover_s:.1f}s after kube-apiserver came back")
        assert failover_s <= LEADER_LEASE_S + 5, (
            f"leadership took {failover_s:.1f}s to come back after the API server restarted "
            f"(Lease {LEADER_LEASE_S:.0f}s + 5s allowed)")

        after = [f"after-{i:02d}" for i in range(10)]
        _jobs(objects, after)
        wait_for(lambda: _succeeded(objects) >= set(before) | set(after), timeout_s=60,
                 message=lambda: f"scheduling to resume ({len(_succeeded(objects))} of {len(before) + len(after)} done)")

        for ident, op in ops.items():
            text = op.log_path.read_text()
            # Alive and working, or gone with an error so that its kubelet restarts it; never alive and idle.
            assert op.alive or op.proc.returncode != 0, f"{ident} exited cleanly after the outage:\n{op.tail()}"
            assert "thread leader died" not in text and "thread control died" not in text, f"{ident}:\n{op.tail()}"
            assert "Traceback" not in text, f"{ident} logged a traceback for an unreachable API server:\n{op.tail()}"
        survivor = ops[leader].log_path.read_text()
        assert "cannot read or write Lease" in survivor, "the outage was never seen by the leader election"
    finally:
        for op in ops.values():
            op.stop()
        for a in agents:
            a.stop()
