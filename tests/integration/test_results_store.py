"""Images to an S3-compatible results store, on a real S3 server (versitygw on 127.0.0.1).

- the store's own round trip: a signed PUT and GET; the server refuses unsigned requests, and
  credentials meant for one host are never used for another;
- end to end with the user's CLI: `stoker submit --wait -o out.png` against the real API server,
  the operator and a real agent configured with the store: the job's status.result names the
  object, `kubectl wait --for=condition=Succeeded` sees it, and `stoker get image` brings the same
  bytes back with the user's own S3 credentials.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess

import httpx
import pytest
from kubernetes import client

from stoker import kube
from stoker.agent.results_store import Credentials, S3ResultsStore, S3Settings, object_key
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import BIN, operator_process, real_agent_process, wait_for
from stoker.testing.s3_server import S3Server


@pytest.fixture
def s3(tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    with S3Server(tmp_path) as server:
        yield server


def test_the_store_round_trip_is_signed_and_the_credentials_stay_with_their_host(s3: S3Server) -> None:
    settings = S3Settings(endpoint=s3.endpoint, bucket="results", prefix="images/", allow_http=True)
    store = S3ResultsStore(settings, Credentials(host=settings.host, access_key_id=s3.access_key,
                                                 secret_access_key=s3.secret_key))
    try:
        store.ensure_bucket()
        png = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)
        result = store.put(png, namespace="team-a", name="fox/../../x", attempt=2)
        key = object_key(prefix="images/", namespace="team-a", name="fox/../../x", attempt=2)
        assert key == "images/team-a/fox_.._.._x/2.png"
        assert result.location == f"{s3.endpoint}/results/{key}" and result.sha256 == hashlib.sha256(png).hexdigest()
        assert store.get(key) == png
        assert httpx.get(result.location).status_code == 403  # the bucket is private: unsigned reads are refused
    finally:
        store.close()
    with pytest.raises(ValueError, match="never sent elsewhere"):
        S3ResultsStore(settings, Credentials(host="127.0.0.2:9000", access_key_id="a", secret_access_key="b"))
    with pytest.raises(ValueError, match="plain http"):
        S3Settings(endpoint=s3.endpoint, bucket="results")


def stoker(kubeconfig: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "stoker"), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONSAFEPATH": "1", "COLUMNS": "100",
                               **(env or {})})


def test_stoker_submit_waits_for_the_image_in_the_store_and_get_image_fetches_it_back(
        control_plane, api_client: client.ApiClient, kubectl, namespace: str, tmp_path: pathlib.Path, s3: S3Server) -> None:
    objects = kube.Objects(api_client, namespace)
    creds = tmp_path / "results-store"
    creds.mkdir()
    (creds / "accessKeyId").write_text(s3.access_key)
    (creds / "secretAccessKey").write_text(s3.secret_key)
    settings = S3Settings(endpoint=s3.endpoint, bucket="stoker-results", allow_http=True)
    bucket = S3ResultsStore(settings, Credentials(settings.host, s3.access_key, s3.secret_key))
    bucket.ensure_bucket()
    checkpoint = tiny_models.write_tiny_sd15(tmp_path / "tiny-sd15.safetensors", seed=3)
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as models:
        objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                      "metadata": {"name": "tiny"}, "spec": {"replicas": 0, "source": {
                                          "url": models.url("tiny-sd15.safetensors")}}})
        op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log").start()
        agent = real_agent_process(control_plane.kubeconfig, objects, "agent-s3", tmp_path,
                                   "--results-s3-endpoint", s3.endpoint, "--results-s3-bucket", "stoker-results",
                                   "--results-s3-prefix", "stoker/", "--results-s3-credentials-dir", str(creds)).start()
        try:
            wait_for(lambda: (objects.get("CacheAgent", "agent-s3").get("status") or {}).get("slots"), timeout_s=240,
                     message=lambda: f"the agent to register\n{agent.tail()}")
            out = tmp_path / "out.png"
            proc = stoker(control_plane.kubeconfig, "submit", "-n", namespace, "--model", "tiny", "--prompt",
                          "a lighthouse at dusk", "--steps", "6", "--width", "64", "--height", "64", "--seed", "9",
                          "--name", "lighthouse", "--wait", "-o", str(out),
                          env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
            print(f"$ stoker submit --model tiny --prompt 'a lighthouse at dusk' ... --wait -o out.png\n"
                  f"{proc.stderr}{proc.stdout}exit {proc.returncode}")
            assert proc.returncode == 0, proc.stderr + "\n" + agent.tail() + "\n" + op.tail()
            assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            kubectl("wait", "--for=condition=Succeeded", "gj/lighthouse", "--timeout=30s")
            status = objects.get("GenerationJob", "lighthouse")["status"]
            assert status["result"]["location"] == f"{s3.endpoint}/stoker-results/stoker/{namespace}/lighthouse/1.png"
            stored = bucket.get(f"stoker/{namespace}/lighthouse/1.png")
            assert hashlib.sha256(stored).hexdigest() == status["result"]["sha256"] == hashlib.sha256(
                out.read_bytes()).hexdigest()
            again = tmp_path / "again.png"
            got = stoker(control_plane.kubeconfig, "get", "image", "lighthouse", "-n", namespace, "-o", str(again),
                         env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
            assert got.returncode == 0 and again.read_bytes() == stored, got.stderr
            refused = stoker(control_plane.kubeconfig, "get", "image", "lighthouse", "-n", namespace, "-o",
                             str(tmp_path / "x.png"), env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
            assert refused.returncode == 1 and "AWS_ACCESS_KEY_ID" in refused.stderr, refused.stderr
            conditions = {c["type"]: c["status"] for c in status["conditions"]}
            assert conditions == {"Scheduled": "True", "Running": "False", "Succeeded": "True", "Failed": "False"}
            top = stoker(control_plane.kubeconfig, "top", "-n", namespace)
            print(top.stdout + top.stderr)
            assert top.returncode == 0 and "agent-s3" in top.stdout and "tiny" in top.stdout
            listed = stoker(control_plane.kubeconfig, "models", "-n", namespace, "-o", "json")
            assert listed.returncode == 0 and '"model": "tiny"' in listed.stdout, listed.stderr
            # cordon, drain (nothing bound: drained at once), uncordon; an unknown agent is exit 1 with a message
            assert stoker(control_plane.kubeconfig, "drain", "agent-s3", "-n", namespace, "--timeout", "30").returncode == 0
            assert objects.get("CacheAgent", "agent-s3")["spec"]["cordon"] is True
            assert stoker(control_plane.kubeconfig, "uncordon", "agent-s3", "-n", namespace).returncode == 0
            assert objects.get("CacheAgent", "agent-s3")["spec"]["cordon"] is False
            missing = stoker(control_plane.kubeconfig, "cordon", "agent-nope", "-n", namespace)
            assert missing.returncode == 1 and "not found" in missing.stderr, missing.stderr
        finally:
            agent.stop()
            op.stop()
            bucket.close()
