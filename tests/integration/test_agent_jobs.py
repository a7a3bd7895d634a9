"""The real agent process against the real API server: jobs become PNGs, failures get reasons.

The test plays the operator's part of the protocol (binding by label + attempt
annotation) so the agent is checked on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import pathlib
import socket
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from PIL import Image
from safetensors.torch import save_file

from stoker import kube
from stoker.agent.jobs import seed_for
from stoker.api.protocol import AGENT_LABEL, ATTEMPT_ANNOTATION
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, wait_for

BIN = pathlib.Path(sys.executable).parent
AGENT = "agent-0"
KINDS = {"tiny-sd15": "checkpoint", "tiny-sd15-b": "checkpoint", "tiny-lora": "lora", "tiny-vae": "vae",
         "big-checkpoint": "checkpoint", "lora-as-checkpoint": "checkpoint", "late-model": "checkpoint",
         "metrics-model": "checkpoint"}
VRAM_BUDGET_MIB = 64
GRACE_S = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("models")
    big = d / "big-checkpoint.safetensors"  # more bytes than the agent's VRAM budget
    save_file({"padding": torch.zeros((VRAM_BUDGET_MIB + 8) * 2**18)}, str(big))
    return {
        "tiny-sd15": tiny_models.write_tiny_sd15(d / "tiny-sd15.safetensors", seed=1),
        "tiny-sd15-b": tiny_models.write_tiny_sd15(d / "tiny-sd15-b.safetensors", seed=4),
        "tiny-lora": tiny_models.write_tiny_lora(d / "tiny-lora.safetensors", seed=2),
        "tiny-vae": tiny_models.write_tiny_vae(d / "tiny-vae.safetensors", seed=3),
        "big-checkpoint": big,
        "lora-as-checkpoint": d / "tiny-lora.safetensors",
        "late-model": d / "tiny-sd15.safetensors",
        "metrics-model": d / "tiny-sd15.safetensors",  # downloaded first by the metrics test: a miss there
    }


@pytest.fixture(scope="module")
def server(models: dict[str, pathlib.Path]) -> Iterator[ModelServer]:
    with ModelServer({f"{k}.safetensors": v for k, v in models.items()} | {"corrupt.safetensors": b"not the file"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def ns(control_plane, api_client) -> str:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


@pytest.fixture(scope="module")
def objects(api_client, ns) -> kube.Objects:
    return kube.Objects(api_client, ns)


def create_model_cache(objects: kube.Objects, server: ModelServer, models: dict[str, pathlib.Path], name: str) -> None:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                  "metadata": {"name": name}, "spec": {"kind": KINDS[name], "replicas": 0, "source": {
                                      "url": server.url(f"{name}.safetensors"),
                                      "sha256": hashlib.sha256(models[name].read_bytes()).hexdigest()}}})


def start_agent(control_plane, objects: kube.Objects, ns: str, name: str, work: pathlib.Path, *extra: str,
                kubeconfig: pathlib.Path | None = None) -> Process:
    objects.core.create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="stoker:dev")])))
    proc = Process([str(BIN / "stoker-agent"), "--kubeconfig", str(kubeconfig or control_plane.kubeconfig),
                    "--namespace", ns, "--pod-name", name, "--node-name", "node-a", "--cache-dir", str(work / "cache"),
                    "--results-dir", str(work / "results"), "--allow-http", "--lease-duration-s", "6",
                    "--lease-renew-interval-s", "1", "--status-min-interval-s", "0.2", "--model-not-found-grace-s",
                    str(GRACE_S), "--device", "cpu", "--vram-budget-bytes", f"{VRAM_BUDGET_MIB}MiB", "--torch-threads",
                    "1", *extra], work / f"{name}.log").start()
    wait_for(lambda: objects.get("CacheAgent", name).get("status", {}).get("slots"), timeout_s=120,
             message=lambda: f"{name} to register\n" + proc.tail())
    return proc


@pytest.fixture(scope="module")
def agent(control_plane, objects, ns, server, models, tmp_path_factory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("agent")
    for name in models:
        if name != "late-model":
            create_model_cache(objects, server, models, name)
    metrics_port = free_port()
    proc = start_agent(control_plane, objects, ns, AGENT, work, "--metrics-port", str(metrics_port))
    try:
        yield {"proc": proc, "results": work / "results", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        proc.stop()
        print(proc.tail(80))


def submit(objects: kube.Objects, name: str, *, model: str = "tiny-sd15", bind: bool = True, agent: str = AGENT,
           **spec: Any) -> None:
    params = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 7, "sampler": "euler"}
    params.update(spec.pop("params", {}))
    params = {k: v for k, v in params.items() if v is not None}
    objects.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                     "metadata": {"name": name}, "spec": {"model": model, "params": params, **spec}})
    if bind:
        bind_job(objects, name, attempt=1, agent=agent)


def bind_job(objects: kube.Objects, name: str, *, attempt: int, agent: str = AGENT) -> None:
    """Bind as the operator does (stoker.operator.scheduler): the label and annotation first,
    then the status, both with resourceVersion preconditions; when the agent has already moved
    the job on (Running), only agent and attempt are filled in, never the phase set back."""
    obj = objects.get("GenerationJob", name)
    body = objects.patch("GenerationJob", name, {"metadata": {"labels": {AGENT_LABEL: agent},
                                                              "annotations": {ATTEMPT_ANNOTATION: str(attempt)}}},
                         resource_version=obj["metadata"]["resourceVersion"])
    status: dict[str, Any] = {"phase": "Scheduled", "agent": agent, "attempt": attempt}
    version = body["metadata"]["resourceVersion"]
    for _ in range(5):
        try:
            objects.patch_status("GenerationJob", name, status, resource_version=version)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = objects.get("GenerationJob", name)["metadata"]
        if (current.get("labels", {}).get(AGENT_LABEL) != agent
                or current.get("annotations", {}).get(ATTEMPT_ANNOTATION) != str(attempt)):
            return
        version = current["resourceVersion"]
        status = {"agent": agent, "attempt": attempt}
    raise AssertionError(f"could not write the binding status of job {name}")


def status_of(objects: kube.Objects, name: str) -> dict[str, Any]:
    return objects.get("GenerationJob", name).get("status", {})


def finished(objects: kube.Objects, name: str, timeout_s: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (s := status_of(objects, name)).get("phase") in ("Succeeded", "Failed") and s,
                    timeout_s=timeout_s, message=f"job {name} to finish")


def making_progress(objects: kube.Objects, name: str) -> dict[str, Any]:
    return wait_for(lambda: (s := status_of(objects, name)).get("progress", {}).get("step", 0) > 0 and s,
                    timeout_s=60, message=f"job {name} to make progress")


def in_log(proc: Process, text: str, timeout_s: float = 30) -> None:
    wait_for(lambda: text in proc.log_path.read_text(), timeout_s=timeout_s,
             message=lambda: f"{text!r} in the agent log\n" + proc.tail())


def parameters_of(status: dict[str, Any]) -> str:
    """The generation parameters in the PNG a finished job wrote to the results volume."""
    return Image.open(io.BytesIO(pathlib.Path(status["result"]["location"]).read_bytes())).text["parameters"]


LONG = {"steps": 150, "width": 128, "height": 128}
VERY_LONG = {"steps": 150, "width": 512, "height": 512}  # far longer than any check made while it runs


def metric_samples(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_the_agent_registers_its_cache_agent_owned_by_its_pod_and_renews_its_lease(agent, objects, ns) -> None:
    ca = objects.get("CacheAgent", AGENT)
    assert ca["metadata"]["ownerReferences"][0]["kind"] == "Pod"
    assert ca["metadata"]["ownerReferences"][0]["name"] == AGENT
    assert ca["status"]["node"] == "node-a"
    assert ca["status"]["gpu"]["model"] == "cpu"
    assert (ca["status"]["slots"], ca["status"]["queueSlots"], ca["status"]["freeSlots"]) == (1, 1, 2)
    leases = client.CoordinationV1Api(objects.custom.api_client)
    first = leases.read_namespaced_lease(AGENT, ns).spec.renew_time
    wait_for(lambda: leases.read_namespaced_lease(AGENT, ns).spec.renew_time > first, timeout_s=10,
             message="the lease to be renewed")


def test_a_bound_job_becomes_a_png_of_the_requested_size_with_timings(agent, objects) -> None:
    submit(objects, "first", params={"width": 64, "height": 96})
    status = finished(objects, "first")
    assert status["phase"] == "Succeeded", status
    assert status["cacheHit"] == "miss"
    result = status["result"]
    png = pathlib.Path(result["location"]).read_bytes()
    assert hashlib.sha256(png).hexdigest() == result["sha256"] and len(png) == result["bytes"]
    image = Image.open(io.BytesIO(png))
    assert image.size == (64, 96)
    assert "a lighthouse" in image.text["parameters"] and "Seed: 7" in image.text["parameters"]
    for key in ("queuedSeconds", "downloadSeconds", "slotWaitSeconds", "loadSeconds", "buildSeconds", "inferenceSeconds",
                "uploadSeconds", "totalSeconds"):
        assert status["timings"][key] >= 0, key
    assert status["progress"] == {"step": 3, "steps": 3, "summary": ""} and "stage" not in status
    assert result["seed"] == 7
    ca = objects.get("CacheAgent", AGENT)["status"]
    names = {m["name"]: m for m in ca["models"]}
    assert names["tiny-sd15"]["tier"] == "vram"


def test_the_same_seed_gives_the_same_bytes_and_the_second_job_hits_vram(agent, objects) -> None:
    submit(objects, "again-a")
    a = finished(objects, "again-a")
    submit(objects, "again-b")
    b = finished(objects, "again-b")
    assert a["result"]["sha256"] == b["result"]["sha256"]
    assert b["cacheHit"] == "vram"
    submit(objects, "other-seed", params={"seed": 8})
    assert finished(objects, "other-seed")["result"]["sha256"] != a["result"]["sha256"]


def test_a_lora_changes_the_image(agent, objects) -> None:
    submit(objects, "plain")
    submit(objects, "with-lora", loras=[{"name": "tiny-lora", "weight": 1.0}])
    plain, styled = finished(objects, "plain"), finished(objects, "with-lora")
    assert styled["phase"] == "Succeeded", styled
    assert styled["result"]["sha256"] != plain["result"]["sha256"]
    assert "<lora:tiny-lora:1>" in parameters_of(styled)


def test_a_vae_override_changes_the_image(agent, objects) -> None:
    submit(objects, "plain-for-vae")
    submit(objects, "with-vae", vae="tiny-vae")
    plain, replaced = finished(objects, "plain-for-vae"), finished(objects, "with-vae")
    assert replaced["phase"] == "Succeeded", replaced
    assert replaced["result"]["sha256"] != plain["result"]["sha256"]
    assert "VAE: tiny-vae" in parameters_of(replaced)


def test_a_job_without_a_seed_gets_one_derived_from_its_uid_and_records_it(agent, objects) -> None:
    submit(objects, "seedless", params={"seed": None})
    status = finished(objects, "seedless")
    assert status["phase"] == "Succeeded", status
    expected = seed_for(objects.get("GenerationJob", "seedless")["metadata"]["uid"])
    assert status["result"]["seed"] == expected
    assert f"Seed: {expected}" in parameters_of(status)


def test_the_image_is_put_to_the_output_url(agent, objects) -> None:
    received: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802
            received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/bucket/out.png?X-Signature=secret123"
        submit(objects, "put-out", output={"url": url})
        status = finished(objects, "put-out")
        assert status["phase"] == "Succeeded", status
        assert hashlib.sha256(received["/bucket/out.png?X-Signature=secret123"]).hexdigest() == status["result"]["sha256"]
        assert "secret123" not in json.dumps(status)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_missing_model_fails_the_job_with_model_not_found(agent, objects) -> None:
    submit(objects, "no-model", model="does-not-exist")
    status = finished(objects, "no-model")
    assert status["phase"] == "Failed"
    assert status["reason"] == "ModelNotFound"
    assert "does-not-exist" in status["message"]


def test_a_model_cache_created_within_the_grace_period_is_used(agent, objects, server, models, ns) -> None:
    submit(objects, "late", model="late-model")
    in_log(agent["proc"], f"for ModelCache {ns}/late-model to appear")
    create_model_cache(objects, server, models, "late-model")
    status = finished(objects, "late")
    assert status["phase"] == "Succeeded", status


def test_a_checksum_mismatch_is_reported_on_the_job_and_the_cache_agent(agent, objects, server) -> None:
    objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "corrupt"},
                                  "spec": {"replicas": 0, "source": {"url": server.url("corrupt.safetensors"), "sha256": "0" * 64}}})
    submit(objects, "bad-bytes", model="corrupt")
    failure = wait_for(lambda: status_of(objects, "bad-bytes").get("attemptFailure"), timeout_s=60,
                       message="the attempt failure")
    assert failure["reason"] == "ChecksumMismatch"
    assert failure["retryable"] is False
    failures = wait_for(lambda: objects.get("CacheAgent", AGENT)["status"].get("modelFailures"), timeout_s=10,
                        message="modelFailures in the CacheAgent status")
    assert failures[0]["name"] == "corrupt" and failures[0]["reason"] == "ChecksumMismatch"


def test_a_checkpoint_larger_than_the_vram_budget_is_a_retryable_insufficient_vram_failure(agent, objects) -> None:
    submit(objects, "too-big", model="big-checkpoint")
    failure = wait_for(lambda: status_of(objects, "too-big").get("attemptFailure"), timeout_s=60,
                       message="the attempt failure")
    assert failure["reason"] == "InsufficientVRAM" and failure["retryable"] is True
    assert failure["agent"] == AGENT and failure["attempt"] == 1
    assert status_of(objects, "too-big")["phase"] != "Failed"  # the operator decides: retry elsewhere or fail


def test_a_runner_error_fails_the_job_with_its_reason_and_message(agent, objects) -> None:
    submit(objects, "not-a-checkpoint", model="lora-as-checkpoint")
    status = finished(objects, "not-a-checkpoint")
    assert status["phase"] == "Failed"
    assert status["reason"] == "UnsupportedCheckpoint"
    assert "SD 1.x and SDXL" in status["message"] and not status["message"].startswith("UnsupportedCheckpoint")


def test_jobs_not_bound_to_this_agent_are_left_alone(agent, objects) -> None:
    submit(objects, "unbound", bind=False)
    submit(objects, "elsewhere", bind=False)
    bind_job(objects, "elsewhere", attempt=1, agent="someone-else")
    submit(objects, "ours-after")
    assert finished(objects, "ours-after")["phase"] == "Succeeded"
    # The agent ran a later job of its own, so it has seen the earlier two and skipped them.
    assert status_of(objects, "unbound").get("phase", "Pending") == "Pending"
    assert status_of(objects, "elsewhere")["phase"] == "Scheduled"
    assert "unbound" not in agent["proc"].log_path.read_text()


def test_holds_in_the_spec_are_downloaded_and_reported_as_held(agent, objects) -> None:
    objects.patch("CacheAgent", AGENT, {"spec": {"holds": [{"model": "tiny-vae"}]}})
    model = wait_for(lambda: next((m for m in objects.get("CacheAgent", AGENT)["status"]["models"]
                                   if m["name"] == "tiny-vae" and m["held"]), None), timeout_s=60,
                     message="tiny-vae held")
    assert model["sizeBytes"] > 0
    objects.patch("CacheAgent", AGENT, {"spec": {"holds": []}})
    wait_for(lambda: not any(m["held"] for m in objects.get("CacheAgent", AGENT)["status"]["models"]), timeout_s=10,
             message="the hold released")


def test_the_queued_jobs_model_loads_while_the_running_job_generates(agent, objects) -> None:
    submit(objects, "runs-first", params=VERY_LONG)
    making_progress(objects, "runs-first")
    submit(objects, "waits", model="tiny-sd15-b")

    def staged_while_first_runs() -> dict[str, Any] | None:
        ca = objects.get("CacheAgent", AGENT)["status"]
        tiers = {m["name"]: m["tier"] for m in ca["models"]}
        running = {r["name"]: r for r in ca.get("running", [])}
        if tiers.get("tiny-sd15-b") == "vram" and set(running) == {"runs-first", "waits"}:
            return ca
        assert status_of(objects, "runs-first").get("phase") == "Running", "the first job ended too early"
        return None

    ca = wait_for(staged_while_first_runs, timeout_s=60, message="tiny-sd15-b loaded while runs-first runs")
    assert ca["freeSlots"] == 0
    assert all(r["expectedRemainingSeconds"] > 0 for r in ca["running"])
    objects.delete("GenerationJob", "runs-first")  # it has shown what it had to: free its slot
    waits = finished(objects, "waits")
    assert waits["phase"] == "Succeeded", waits
    assert waits["timings"]["slotWaitSeconds"] > 0
    in_log(agent["proc"], "job runs-first attempt 1 cancelled")


def test_a_job_deleted_and_created_again_under_the_same_name_runs_again(agent, objects) -> None:
    submit(objects, "recreated")
    assert finished(objects, "recreated")["phase"] == "Succeeded"
    objects.delete("GenerationJob", "recreated")
    wait_for(lambda: not any(i["metadata"]["name"] == "recreated" for i in objects.list("GenerationJob")["items"]),
             timeout_s=30, message="the job to be gone")
    submit(objects, "recreated", params={"seed": 9})
    status = finished(objects, "recreated")
    assert status["phase"] == "Succeeded" and status["attempt"] == 1 and status["result"]["seed"] == 9


def test_a_job_rebound_to_the_same_agent_runs_its_new_attempt_and_only_that_one_writes(agent, objects) -> None:
    submit(objects, "rebound", params=LONG)
    making_progress(objects, "rebound")
    bind_job(objects, "rebound", attempt=2)
    status = finished(objects, "rebound")
    assert status["phase"] == "Succeeded", status
    assert status["attempt"] == 2
    assert status["result"]["location"].endswith("__rebound__2.png")
    assert not list(agent["results"].glob("*__rebound__1.png"))
    in_log(agent["proc"], "job rebound attempt 1 cancelled")


def test_a_job_moved_to_another_agent_is_cancelled_and_never_written(agent, objects) -> None:
    submit(objects, "moved", params=LONG)
    making_progress(objects, "moved")
    bind_job(objects, "moved", attempt=2, agent="someone-else")
    in_log(agent["proc"], "job moved attempt 1 cancelled")
    status = status_of(objects, "moved")
    assert (status["phase"], status["agent"], status["attempt"]) == ("Scheduled", "someone-else", 2)
    assert "result" not in status
    assert not list(agent["results"].glob("*__moved__*"))


def test_deleting_a_running_job_cancels_it(agent, objects) -> None:
    submit(objects, "long", params=LONG)
    making_progress(objects, "long")
    objects.delete("GenerationJob", "long")
    in_log(agent["proc"], "job long attempt 1 cancelled")
    assert not list(agent["results"].glob("*long*"))


def test_the_job_metrics_count_outcomes_waits_loads_inference_and_tiers(agent, objects) -> None:
    before = metric_samples(agent["metrics"])
    submit(objects, "metrics-miss", model="metrics-model")
    assert finished(objects, "metrics-miss")["cacheHit"] == "miss"
    submit(objects, "metrics-hit", model="metrics-model")
    assert finished(objects, "metrics-hit")["cacheHit"] == "vram"
    submit(objects, "metrics-failed", model="lora-as-checkpoint")
    assert finished(objects, "metrics-failed")["phase"] == "Failed"
    submit(objects, "metrics-cancelled", params=LONG)
    making_progress(objects, "metrics-cancelled")
    objects.delete("GenerationJob", "metrics-cancelled")
    in_log(agent["proc"], "job metrics-cancelled attempt 1 cancelled")
    after = wait_for(lambda: (m := metric_samples(agent["metrics"])).get(
        'stoker_agent_jobs_total{outcome="cancelled"}', 0) > before.get('stoker_agent_jobs_total{outcome="cancelled"}', 0)
        and m, timeout_s=10, message="the cancellation counted")

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('stoker_agent_jobs_total{outcome="succeeded"}') == 2
    assert grew('stoker_agent_jobs_total{outcome="failed"}') == 1
    assert grew('stoker_agent_jobs_total{outcome="cancelled"}') == 1
    assert grew("stoker_agent_job_queue_wait_seconds_count") >= 3
    assert grew("stoker_agent_job_load_seconds_count") >= 2
    assert grew("stoker_agent_job_inference_seconds_count") >= 2
    # The miss downloaded its checkpoint (a disk miss); the hit found it loaded (a VRAM hit).
    assert grew('stoker_agent_cache_misses_total{tier="disk"}') >= 1
    assert grew('stoker_agent_cache_hits_total{tier="vram"}') >= 1
    assert "stoker_agent_job_cache_tier_total" not in str(after)


class FlakyProxy:
    """A TCP proxy to the API server that can drop every connection and refuse new ones for a while."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.down = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def outage(self) -> None:
        self.down.set()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.outage()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.down.is_set():
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns |= {conn, upstream}
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_an_api_server_outage_at_the_end_of_a_job_delays_its_result_but_never_loses_it(
        agent, control_plane, objects, ns, tmp_path) -> None:
    host, port = control_plane.server.removeprefix("https://").rsplit(":", 1)
    proxy = FlakyProxy((host, int(port)))
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://{host}:{proxy.port}"
    kubeconfig = tmp_path / "kubeconfig-through-proxy"
    kubeconfig.write_text(yaml.safe_dump(config))

    class Upload(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - the image arrives: cut the agent off the API server now
            self.rfile.read(int(self.headers["Content-Length"]))
            proxy.outage()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upload)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    proc = start_agent(control_plane, objects, ns, "agent-flaky", tmp_path, "--metrics-port", "0",
                       kubeconfig=kubeconfig)
    try:
        submit(objects, "through-outage", agent="agent-flaky",
               output={"url": f"http://127.0.0.1:{httpd.server_address[1]}/out.png"})
        in_log(proc, "status write of job through-outage attempt 1 failed", timeout_s=120)
        assert status_of(objects, "through-outage")["phase"] == "Running"
        proxy.restore()
        status = finished(objects, "through-outage", timeout_s=60)
        assert status["phase"] == "Succeeded", status
        assert status["result"]["location"].endswith("/out.png")
    finally:
        proc.stop()
        print(proc.tail(60))
        proxy.close()
        httpd.shutdown()
        httpd.server_close()
