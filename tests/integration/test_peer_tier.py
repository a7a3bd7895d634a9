"""The peer tier with real processes: three `stoker-agent` processes on distinct loopback ports,
the operator, the real API server, and a model server on 127.0.0.1 that counts requests.

Placement is steered with `spec.cordon` (a person's field) so that each job lands on the agent
the test means; everything else (who holds what, which digest, where each peer endpoint is) the
agents and the operator find out through the API server as in a cluster.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, operator_process, real_agent_process, wait_for
from stoker.testing.raw_http import raw_get

FILE = "tiny-sd15.safetensors"
AGENTS = ("agent-a", "agent-b", "agent-c")


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


@pytest.fixture
def checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    return tiny_models.write_tiny_sd15(tmp_path / FILE, seed=19)


class Fleet:
    """The operator and three agents sharing one peer credential."""

    def __init__(self, control_plane: Any, objects: kube.Objects, namespace: str, work: pathlib.Path,
                 *, upload_bytes_per_s: str = "400Mi") -> None:
        self.objects, self.work = objects, work
        self.token = secrets.token_urlsafe(32)
        token_file = work / "peer-token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o400)
        self.operator = operator_process(control_plane.kubeconfig, namespace, work / "operator.log",
                                         lease_grace_s=3.0)
        self.agents: dict[str, Process] = {
            name: real_agent_process(
                control_plane.kubeconfig, objects, name, work, "--peer-token-file", str(token_file),
                "--peer-addr", "127.0.0.1", "--peer-port", "0", "--peer-upload-bytes-per-s", upload_bytes_per_s)
            for name in AGENTS}

    def start(self) -> Fleet:
        self.operator.start()
        for proc in self.agents.values():
            proc.start()
        for name, proc in self.agents.items():
            wait_for(lambda name=name: self.status(name).get("peer", {}).get("url"), timeout_s=240,
                     message=lambda proc=proc: f"the agent to register with its peer endpoint\n{proc.tail()}")
        return self

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.kill()
        self.operator.stop()

    def status(self, name: str) -> dict[str, Any]:
        try:
            return self.objects.get("CacheAgent", name).get("status") or {}
        except client.exceptions.ApiException:
            return {}

    def only(self, name: str) -> None:
        """Let only `name` take new jobs."""
        for other in AGENTS:
            self.objects.patch("CacheAgent", other, {"spec": {"cordon": other != name}})

    def job(self, name: str, *, steps: int = 2) -> None:
        self.objects.create("GenerationJob", {
            "apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
            "spec": {"model": "tiny-sd15", "params": {"prompt": "a lighthouse", "steps": steps, "width": 64,
                                                      "height": 64, "seed": 1, "sampler": "euler"}}})

    def job_status(self, name: str) -> dict[str, Any]:
        return self.objects.get("GenerationJob", name).get("status") or {}

    def bound_to(self, job: str) -> str | None:
        return (self.objects.get("GenerationJob", job)["metadata"].get("labels") or {}).get("stoker.dev/agent")

    def finished(self, job: str, timeout_s: float = 300) -> dict[str, Any]:
        return wait_for(lambda: self.job_status(job).get("phase") in ("Succeeded", "Failed") and self.job_status(job),
                        timeout_s=timeout_s, interval_s=0.5,
                        message=lambda: f"job {job} to finish: {self.job_status(job)}\n{self.tails()}")

    def holders(self) -> dict[str, str]:
        status = self.objects.get("ModelCache", "tiny-sd15").get("status") or {}
        return {c["agent"]: c["tier"] for c in status.get("agents") or []}

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(p.tail(40) for p in [*self.agents.values(), self.operator])


@pytest.fixture
def model(objects: kube.Objects, checkpoint: pathlib.Path) -> Iterator[tuple[ModelServer, str]]:
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with ModelServer({FILE: checkpoint}) as server:
        objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                      "metadata": {"name": "tiny-sd15"}, "spec": {"replicas": 0, "source": {
                                          "url": server.url(FILE), "sha256": digest,
                                          "sizeBytes": checkpoint.stat().st_size}}})
        yield server, digest


def test_a_model_comes_from_its_source_once_then_from_peers_and_concurrent_misses_fan_out(
        control_plane, objects, namespace, tmp_path, checkpoint, model) -> None:
    server, digest = model
    data = checkpoint.read_bytes()
    fleet = Fleet(control_plane, objects, namespace, tmp_path).start()
    try:
        # agent-a fetches it from the (slow) source; while it does, agent-b and agent-c get jobs too
        server.faults.rate_bytes_per_s = max(256 * 1024, len(data) / 12)
        fleet.only("agent-a")
        fleet.job("first")
        wait_for(lambda: fleet.holders().get("agent-a") == "downloading", timeout_s=120,
                 message=lambda: f"agent-a's download to show in the ModelCache status: {fleet.holders()}\n{fleet.tails()}")
        fleet.only("agent-b")
        fleet.job("second")
        wait_for(lambda: fleet.bound_to("second") == "agent-b", timeout_s=60, message="second bound to agent-b")
        fleet.only("agent-c")
        fleet.job("third")
        wait_for(lambda: fleet.bound_to("third") == "agent-c", timeout_s=60, message="third bound to agent-c")
        for job in ("first", "second", "third"):
            assert fleet.finished(job)["phase"] == "Succeeded", fleet.tails()
        # the source saw the file once; the others waited for agent-a's copy and took it from a peer
        assert server.request_count(FILE, method="GET") == 1, server.requests
        for name in ("agent-b", "agent-c"):
            assert re.search(r"fetched tiny-sd15 from peer agent-[a-c]", fleet.log(name)), fleet.log(name)[-3000:]
        assert "rather than fetching it from the source too" in fleet.log("agent-b") + fleet.log("agent-c")
        status = objects.get("ModelCache", "tiny-sd15")["status"]
        assert status["sha256"] == digest
        assert sorted(fleet.holders()) == list(AGENTS)

        # The endpoint itself: content by digest, for the fleet's credential only, nothing else.
        url = fleet.status("agent-b")["peer"]["url"]
        assert url.startswith("http://127.0.0.1:")
        path = f"/v1/blobs/sha256/{digest}"
        assert raw_get(url, path, fleet.token) == (200, data)
        for token in (None, "not-the-fleet-credential", fleet.token[:-1]):
            status_code, body = raw_get(url, path, token)
            assert status_code == 401 and data[:256] not in body
        cache_file = next((tmp_path / "agent-b" / "cache" / "models").glob("*.safetensors"))
        for attempt in ("/v1/blobs/sha256/../../../../etc/passwd", "/../../etc/passwd",
                        f"/v1/blobs/sha256/{digest}/../../index.json", f"/{cache_file.name}",
                        f"/v1/blobs/sha256/..%2f..%2f{cache_file.name}", "/", "/v1/blobs/sha256/"):
            status_code, body = raw_get(url, attempt, fleet.token)
            assert status_code == 404, attempt
            assert b"root:" not in body and data[:256] not in body and b"last_used" not in body
    finally:
        fleet.stop()


def test_a_peer_with_wrong_bytes_is_reported_and_bypassed_and_one_killed_mid_transfer_is_resumed_elsewhere(
        control_plane, objects, namespace, tmp_path, checkpoint, model) -> None:
    server, digest = model
    data = checkpoint.read_bytes()
    # Peers serve slowly, so that a transfer is still under way when its holder is killed.
    fleet = Fleet(control_plane, objects, namespace, tmp_path,
                  upload_bytes_per_s=str(max(64 * 1024, len(data) // 8))).start()
    try:
        fleet.only("agent-a")
        fleet.job("first")
        assert fleet.finished("first")["phase"] == "Succeeded"
        wait_for(lambda: fleet.holders().get("agent-a") in ("disk", "ram", "vram"), timeout_s=60,
                 message=lambda: f"agent-a's copy in the ModelCache status: {fleet.holders()}")
        # agent-a's file goes bad on its disk (same size, other bytes): it still offers it under the digest
        cache_file = next((tmp_path / "agent-a" / "cache" / "models").glob("*.safetensors"))
        damaged = bytearray(cache_file.read_bytes())
        damaged[-64:] = bytes(64)
        cache_file.write_bytes(bytes(damaged))
        fleet.only("agent-b")
        fleet.job("second")
        done = fleet.finished("second")
        assert done["phase"] == "Succeeded", fleet.tails()
        # detected (the digest), reported (an Event on agent-a), bypassed (agent-b went to the source)
        events = objects.core.list_namespaced_event(namespace).items
        bad = [e for e in events if e.reason == "PeerChecksumMismatch" and e.involved_object.name == "agent-a"]
        assert bad and bad[0].type == "Warning" and "agent-b" in bad[0].message, [(e.reason, e.message) for e in events]
        assert server.request_count(FILE, method="GET") == 2
        # a peer's failure is not the source's: nothing reported against the model
        assert not fleet.status("agent-b").get("modelFailures")
        mc = objects.get("ModelCache", "tiny-sd15")["status"]
        failed = next((c for c in mc.get("conditions", []) if c["type"] == "Failed"), {"status": "False"})
        assert failed["status"] == "False"

        # agent-b and, once it fetched from agent-b, agent-c hold good copies; agent-a is stopped for good
        fleet.agents["agent-a"].kill()
        fleet.only("agent-c")
        fleet.job("third")
        assert fleet.finished("third")["phase"] == "Succeeded", fleet.tails()
        wait_for(lambda: {"agent-b", "agent-c"} <= set(fleet.holders()), timeout_s=60, message="two good holders")
        # a new agent fetches it and the holder it is fetching from is killed mid-transfer
        extra = real_agent_process(control_plane.kubeconfig, objects, "agent-d", tmp_path,
                                   "--peer-token-file", str(tmp_path / "peer-token"), "--peer-addr", "127.0.0.1",
                                   "--peer-port", "0")
        fleet.agents["agent-d"] = extra.start()
        wait_for(lambda: fleet.status("agent-d").get("peer"), timeout_s=240, message=lambda: extra.tail())
        for name in ("agent-b", "agent-c"):
            objects.patch("CacheAgent", name, {"spec": {"cordon": True}})
        objects.patch("CacheAgent", "agent-d", {"spec": {"cordon": False}})
        fleet.job("fourth")

        def serving_holder() -> str | None:
            found = re.findall(r"fetching tiny-sd15 from peer (agent-[bc])", fleet.log("agent-d"))
            return found[0] if found else None

        holder = wait_for(serving_holder, timeout_s=120, interval_s=0.05, message=lambda: extra.tail())

        def receiving() -> bool:
            return any(p.stat().st_size > 0 for p in (tmp_path / "agent-d" / "cache" / "models").glob("*.part"))

        wait_for(receiving, timeout_s=60, interval_s=0.02, message=lambda: f"bytes from {holder}\n{extra.tail()}")
        fleet.agents[holder].kill()  # mid-transfer: agent-d has some of the bytes
        done = fleet.finished("fourth")
        assert done["phase"] == "Succeeded", fleet.tails()
        other = "agent-c" if holder == "agent-b" else "agent-b"
        log = fleet.log("agent-d")
        assert re.search(rf"fetching tiny-sd15 from peer {holder} failed .*resuming elsewhere", log), log[-3000:]
        assert re.search(rf"fetched tiny-sd15 from peer {other}", log), log[-3000:]
        # only the rest came from the other holder (a Range request); the source saw no new request
        served = [int(m) for m in re.findall(r"served \d+ of (\d+) bytes", fleet.log(other))]
        assert served and min(served) < len(data), served
        assert server.request_count(FILE, method="GET") == 2
    finally:
        fleet.stop()
