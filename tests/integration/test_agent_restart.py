"""kill -9 of the agent mid-download, then a restart: the download resumes with a Range
request and a partial file is never reported as held."""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import threading

from kubernetes import client, watch

from stoker import kube
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, wait_for
from stoker.testing import tiny_models

BIN = pathlib.Path(sys.executable).parent


def agent_process(cp, ns: str, work: pathlib.Path, log_name: str) -> Process:
    return Process([str(BIN / "stoker-agent"), "--kubeconfig", str(cp.kubeconfig), "--namespace", ns,
                    "--pod-name", "agent-r", "--cache-dir", str(work / "cache"), "--results-dir", str(work / "results"),
                    "--allow-http", "--metrics-port", "0", "--lease-duration-s", "6", "--lease-renew-interval-s", "1",
                    "--status-min-interval-s", "0.2", "--device", "cpu"], work / log_name).start()


class ReportWatch:
    """Sees every CacheAgent status the API server stores, and notes whether, when each
    arrived, the agent's cache held a complete (renamed, verified) model file."""

    def __init__(self, objects: kube.Objects, cache_dir: pathlib.Path) -> None:
        self.objects, self.cache_dir = objects, cache_dir
        self.reports: list[tuple[list[str], bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _complete_file_on_disk(self) -> bool:
        return any(self.cache_dir.glob("models/*.safetensors"))  # partial files end in .part

    def _run(self) -> None:
        custom = self.objects.custom
        args = ("stoker.dev", "v1alpha1", self.objects.namespace, "cacheagents")
        version = custom.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"]
        while not self._stop.is_set():
            for event in watch.Watch().stream(custom.list_namespaced_custom_object, *args, resource_version=version,
                                              timeout_seconds=2):
                version = event["object"]["metadata"]["resourceVersion"]
                models = [m["name"] for m in (event["object"].get("status") or {}).get("models", [])]
                self.reports.append((models, self._complete_file_on_disk()))

    def __enter__(self) -> ReportWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_a_killed_download_resumes_after_restart_and_is_never_reported_half_done(control_plane, api_client, namespace, tmp_path) -> None:
    objects = kube.Objects(api_client, namespace)
    with ReportWatch(objects, tmp_path / "cache") as reports:
        run_kill_and_restart(control_plane, objects, namespace, tmp_path)
    listing = [complete for models, complete in reports.reports if "slow" in models]
    assert listing, "no report ever listed the model"
    assert all(listing), "a report listed the model while only a partial file was on disk"
    assert len(reports.reports) > len(listing), "no report was seen during the download"


def run_kill_and_restart(control_plane, objects: kube.Objects, namespace: str, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_models.write_tiny_sd15(tmp_path / "m.safetensors", seed=5)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    size = model.stat().st_size
    objects.core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="agent-r"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="a", image="stoker")])))
    with ModelServer({"m.safetensors": model}) as server:
        server.faults.rate_bytes_per_s = size / 20  # about 20 s for the whole file
        objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "slow"},
                                      "spec": {"replicas": 1, "source": {"url": server.url("m.safetensors"), "sha256": digest}}})
        first = agent_process(control_plane, namespace, tmp_path, "agent-1.log")
        try:
            wait_for(lambda: objects.get("CacheAgent", "agent-r").get("status", {}).get("slots"), timeout_s=90,
                     message=lambda: "registration\n" + first.tail())
            objects.patch("CacheAgent", "agent-r", {"spec": {"holds": [{"model": "slow"}]}})
            progress = wait_for(lambda: [d for d in objects.get("CacheAgent", "agent-r")["status"].get("downloads", [])
                                         if d["bytesDone"] > size // 10], timeout_s=60, message="download progress")
            assert progress[0]["name"] == "slow"
            assert not any(m["name"] == "slow" for m in objects.get("CacheAgent", "agent-r")["status"]["models"])
        finally:
            first.kill()
        server.faults.rate_bytes_per_s = None
        second = agent_process(control_plane, namespace, tmp_path, "agent-2.log")
        try:
            # Until the restarted agent has the verified file, no report may claim it.
            def held() -> dict | None:
                status = objects.get("CacheAgent", "agent-r").get("status", {})
                found = next((m for m in status.get("models", []) if m["name"] == "slow"), None)
                return found

            model_entry = wait_for(held, timeout_s=90, message=lambda: "the model on disk\n" + second.tail())
            assert model_entry["sizeBytes"] == size and model_entry["held"] is True
            ranges = [r.range for r in server.requests if r.path.endswith("m.safetensors") and r.range]
            assert ranges and ranges[-1].startswith("bytes=") and not ranges[-1].startswith("bytes=0-"), server.requests
            cached = [p for p in (tmp_path / "cache").rglob("*.safetensors")]
            assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in cached] == [digest]
        finally:
            second.stop()
            print(second.tail())
