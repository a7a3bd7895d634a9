"""Integration fixtures: one real etcd + kube-apiserver per session, a namespace per test."""

from __future__ import annotations

import os
import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from stoker.testing import controlplane

REPO = pathlib.Path(__file__).resolve().parents[2]
# Identities without permissions of their own; tests bind the chart's roles to them.
EXTRA_USERS = ("stoker-operator", "stoker-agent")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    with controlplane.run_control_plane(
        workdir=tmp_path_factory.mktemp("control-plane"), crd_dir=REPO / "crds", users=EXTRA_USERS,
    ) as cp:
        yield cp


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary: $STOKER_HELM (hack/setup.sh exports it), else the one hack/install-helm.sh installs."""
    if env := os.environ.get("STOKER_HELM"):
        return env
    out = subprocess.run(["bash", str(REPO / "hack" / "install-helm.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool: $STOKER_PROMTOOL (hack/setup.sh exports it), else the one hack/build-promtool.sh builds."""
    if env := os.environ.get("STOKER_PROMTOOL"):
        return env
    out = subprocess.run(["bash", str(REPO / "hack" / "build-promtool.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def api_client(control_plane: controlplane.ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(control_plane.kubeconfig))


@pytest.fixture
def namespace(control_plane: controlplane.ControlPlane, api_client: client.ApiClient) -> str:
    """A fresh namespace for one test (left behind: there is no namespace controller)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


@pytest.fixture(autouse=True)
def show_logs_on_failure(tmp_path: pathlib.Path) -> Iterator[None]:
    """Print the tails of the logs of the processes a test started; pytest shows them only when it failed."""
    yield
    for log in sorted(tmp_path.glob("*.log")):
        print(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-80:]))


@pytest.fixture
def kubectl(control_plane: controlplane.ControlPlane, namespace: str):  # type: ignore[no-untyped-def]
    """kubectl in the test's namespace: kubectl("get", "gj") -> CompletedProcess."""

    def run(*args: str, check: bool = True, user: str = controlplane.ADMIN_USER, input_text: str | None = None):  # type: ignore[no-untyped-def]
        return control_plane.kubectl("-n", namespace, *args, check=check, user=user, input_text=input_text)

    return run
