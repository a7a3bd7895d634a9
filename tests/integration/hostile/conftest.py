"""The hostile-input suite: one real operator and one real agent, installed as the chart installs
them (its RBAC and its admission policy, the agent on a service-account token bound to its Pod
object), shared by every case. Each case feeds something hostile in and checks the exact reason
a user sees, then that nothing else was harmed: a canary job still succeeds on the same agent,
the canary model is still on its disk, and the agent's Lease is still being renewed.

Every server listens on loopback. 127.0.0.1 and localhost are the agent's allowed hosts;
127.0.0.2 stands for any host that is not allowed, and must never receive a request.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing import identities, tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, operator_process, wait_for

REPO = pathlib.Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "stoker"
BIN = pathlib.Path(sys.executable).parent
API = "stoker.dev/v1alpha1"
AGENT = "agent-0"
OUTPUT_TIMEOUT_S = 10.0
SECRET_VALUE = "hub-secret-value-4242"
ENV_SECRET_VALUE = "env-secret-value-1717"


@dataclasses.dataclass
class Suite:
    """What every hostile case works with."""

    cp: Any
    admin: kube.Objects
    ns: str
    agent: Process
    operator: Process
    good: ModelServer
    files: dict[str, pathlib.Path]
    work: pathlib.Path
    _names: Iterator[int] = dataclasses.field(default_factory=itertools.count)
    secret_value: str = SECRET_VALUE
    """What the mounted Secret hub-token holds (declared for host localhost)."""
    env_secret_value: str = ENV_SECRET_VALUE
    """What the variable declared for Secret env-token holds (host localhost)."""

    def name(self, prefix: str) -> str:
        return f"{prefix}-{next(self._names)}"

    # ---- resources

    def model(self, name: str, url: str, *, kind: str = "checkpoint", sha256: str | None = None,
              size_bytes: int | None = None, secret: str | None = None, **spec: Any) -> None:
        source: dict[str, Any] = {"url": url}
        if sha256 is not None:
            source["sha256"] = sha256
        if size_bytes is not None:
            source["sizeBytes"] = size_bytes
        if secret is not None:
            source["secretRef"] = {"name": secret}
        self.admin.create("ModelCache", {"apiVersion": API, "kind": "ModelCache", "metadata": {"name": name},
                                         "spec": {"source": source, "kind": kind, "replicas": 0, **spec}})

    def served_model(self, name: str, file: str = "tiny-sd15", **kwargs: Any) -> None:
        """A ModelCache for one of the good server's files, with its digest."""
        self.model(name, self.good.url(f"{file}.safetensors"),
                   sha256=hashlib.sha256(self.files[file].read_bytes()).hexdigest(), **kwargs)

    def job(self, name: str, *, model: str = "canary", output_url: str | None = None, max_attempts: int = 1,
            **spec: Any) -> None:
        params = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler": "euler"}
        params.update(spec.pop("params", {}))
        body: dict[str, Any] = {"model": model, "params": params, "maxAttempts": max_attempts, **spec}
        if output_url is not None:
            body["output"] = {"url": output_url}
        self.admin.create("GenerationJob", {"apiVersion": API, "kind": "GenerationJob", "metadata": {"name": name},
                                            "spec": body})

    def status(self, name: str) -> dict[str, Any]:
        return self.admin.get("GenerationJob", name).get("status") or {}

    def final(self, name: str, *, timeout_s: float = 90) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status(name)).get("phase") in ("Succeeded", "Failed") and s,
                        timeout_s=timeout_s, message=lambda: f"job {name} to finish: {self.status(name)}\n"
                        + self.agent.tail(40) + "\n" + self.operator.tail(20))

    def failed(self, name: str, reason: str, *, attempt_reason: str | None = None, says: str = "",
               timeout_s: float = 90) -> dict[str, Any]:
        """Wait for job `name` to fail and check what its user sees: `reason` (and the last attempt's
        reason, when the attempt failure was retryable and the operator ran out of attempts)."""
        st = self.final(name, timeout_s=timeout_s)
        assert st["phase"] == "Failed", st
        assert st.get("reason") == reason, st
        if attempt_reason is not None:
            assert st["history"][-1]["reason"] == attempt_reason, st
        shown = f"{st.get('message', '')} {st['history'][-1].get('message', '') if st.get('history') else ''}"
        assert says in shown, st
        for secret in (SECRET_VALUE, ENV_SECRET_VALUE):
            assert secret not in json.dumps(st)
        return st

    # ---- nothing else harmed

    def lease_renewed(self) -> None:
        """The agent's Lease was renewed within the last few renewal intervals."""
        spec = client.CoordinationV1Api(self.admin.core.api_client).read_namespaced_lease(AGENT, self.ns).spec
        age_s = (dt.datetime.now(dt.timezone.utc) - spec.renew_time).total_seconds()
        assert age_s < 3.5, f"the agent's Lease was last renewed {age_s:.1f} s ago"

    def cache_intact(self) -> None:
        models = {m["name"] for m in (self.admin.get("CacheAgent", AGENT).get("status") or {}).get("models", [])}
        assert "canary" in models, models

    def start_canary(self) -> str:
        """A job for the canary model (cached on the agent since the suite started)."""
        name = self.name("canary")
        self.job(name)
        return name

    def check_unharmed(self, canary: str, *, cached: bool = True) -> None:
        """The canary job succeeded from the agent's cache, which still holds the canary model, and
        the agent's Lease is being renewed: whatever the case did, it harmed nothing else."""
        st = self.final(canary)
        assert st["phase"] == "Succeeded", st
        if cached:
            assert st["cacheHit"] in ("vram", "ram", "disk"), st
        self.cache_intact()
        self.lease_renewed()
        assert self.agent.alive and self.operator.alive

    def unharmed(self, *, cached: bool = True) -> None:
        self.check_unharmed(self.start_canary(), cached=cached)

    def agent_rss_bytes(self) -> int:
        assert self.agent.proc is not None
        for line in pathlib.Path(f"/proc/{self.agent.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def disk_reserved_bytes(self) -> int:
        return int(((self.admin.get("CacheAgent", AGENT).get("status") or {}).get("disk") or {}).get("reservedBytes", 0))


def _install_chart_identities(helm: str, cp: Any, ns: str) -> None:
    """The chart's Roles and the agents' admission policy; the operator's Role bound to the test's operator user."""
    rendered = subprocess.run(
        [helm, "template", "stoker", str(CHART), "--namespace", ns, "--show-only", "templates/rbac.yaml",
         "--show-only", "templates/agent-admission-policy.yaml"], check=True, capture_output=True, text=True).stdout
    cp.kubectl("apply", "-f", "-", input_text=rendered)
    cp.kubectl("apply", "-f", "-", input_text=json.dumps({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "stoker-operator-user", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "stoker-operator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "stoker-operator"}]}))


@pytest.fixture(scope="package")
def suite(control_plane, api_client, helm, tmp_path_factory) -> Iterator[Suite]:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("hostile")
    ns = f"hostile-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    _install_chart_identities(helm, control_plane, ns)
    admin = kube.Objects(api_client, ns)

    models = work / "models"
    models.mkdir()
    files = {"tiny-sd15": tiny_models.write_tiny_sd15(models / "tiny-sd15.safetensors", seed=1),
             "tiny-lora": tiny_models.write_tiny_lora(models / "tiny-lora.safetensors", seed=2)}
    secrets = work / "secrets" / "hub-token"
    secrets.mkdir(parents=True)
    (secrets / "token").write_text(SECRET_VALUE)

    identity = identities.pod_identity(control_plane, api_client, ns, AGENT)
    grants = [{"secret": "hub-token", "hosts": ["localhost"]},
              {"secret": "env-token", "hosts": ["localhost"], "env": {"token": "HOSTILE_ENV_TOKEN"}}]
    agent = Process([
        str(BIN / "stoker-agent"), "--kubeconfig", str(identity.kubeconfig), "--namespace", ns, "--pod-name", AGENT,
        "--node-name", "node-0", "--cache-dir", str(work / "cache"), "--results-dir", str(work / "results"),
        "--allow-http", "--allowed-hosts", "127.0.0.1,localhost",
        "--output-allow-http", "--output-allowed-hosts", "127.0.0.1,localhost", "--output-timeout-s", str(OUTPUT_TIMEOUT_S),
        "--download-min-bytes-per-s", "4000", "--download-throughput-window-s", "1.5", "--download-deadline-s", "20",
        "--download-max-attempts", "2", "--download-read-timeout-s", "5", "--download-connect-timeout-s", "2",
        "--credentials", json.dumps(grants), "--secrets-dir", str(work / "secrets"),
        "--disk-budget-bytes", "8GiB", "--job-slots", "1", "--queue-slots", "2",
        "--lease-duration-s", "6", "--lease-renew-interval-s", "1", "--status-min-interval-s", "0.2",
        "--model-not-found-grace-s", "1", "--metrics-port", "0", "--device", "cpu",
        # budgets above the operator's guess for a model of unknown size (4 GiB), so every case is placed here
        "--vram-budget-bytes", "8GiB",
        "--torch-threads", "1",
    ], work / "agent.log")
    operator = operator_process(control_plane.kubeconfig_for("stoker-operator"), ns, work / "operator.log")
    with ModelServer({f"{k}.safetensors": v for k, v in files.items()}) as good:
        os.environ["HOSTILE_ENV_TOKEN"] = ENV_SECRET_VALUE  # only the agent process keeps it
        try:
            agent.start()
        finally:
            del os.environ["HOSTILE_ENV_TOKEN"]
        operator.start()
        s = Suite(cp=control_plane, admin=admin, ns=ns, agent=agent, operator=operator, good=good, files=files, work=work)
        try:
            wait_for(lambda: (admin.get("CacheAgent", AGENT).get("status") or {}).get("slots"), timeout_s=180,
                     message=lambda: "the agent to register\n" + agent.tail())
            s.served_model("canary")
            s.unharmed(cached=False)  # warms the canary model: from here on, it must stay cached
            yield s
        finally:
            operator.stop(timeout_s=5)
            agent.stop(timeout_s=5)
            print(agent.tail(60))
            print(operator.tail(30))


@pytest.fixture
def unharmed(suite: Suite) -> Callable[[], None]:
    """Starts a canary job as the case starts, to run beside whatever the case does; calling the
    result checks that it succeeded and that the cache and the Lease are unharmed."""
    canary = suite.start_canary()
    return lambda: suite.check_unharmed(canary)
