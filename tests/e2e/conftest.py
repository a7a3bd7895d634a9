"""End-to-end fixtures: one real one-node cluster per session (stoker.testing.cluster),
the locally built images imported into it, and a table of step times printed at the end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from stoker.testing import cluster as e2e_cluster

REPO = pathlib.Path(__file__).resolve().parents[2]
# Step → seconds, in the order the steps ran; printed in the terminal summary.
STEP_TIMES: dict[str, float] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
            # The first test's setup builds images and starts the cluster (cold: a long while).
            item.add_marker(pytest.mark.timeout(int(os.environ.get("STOKER_E2E_TIMEOUT_S", "3600"))))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    if STEP_TIMES:
        terminalreporter.section("end-to-end step times")
        for step, seconds in STEP_TIMES.items():
            terminalreporter.write_line(f"{seconds:8.1f} s  {step}")


class StepTimer:
    """`with steps("helm install"):` records how long a step took (also when it failed)."""

    def __call__(self, name: str) -> "_Step":
        return _Step(name)


class _Step:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        STEP_TIMES[self.name] = time.perf_counter() - self.start


@pytest.fixture(scope="session")
def steps() -> StepTimer:
    return StepTimer()


@pytest.fixture(scope="session")
def images(steps: StepTimer) -> dict[str, str]:
    with steps("images: build or reuse (hack/build-images.sh)"):
        return e2e_cluster.build_images("operator", "agent", "pause")


@pytest.fixture(scope="session")
def cluster(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
            steps: StepTimer) -> Iterator[e2e_cluster.Cluster]:
    with steps("cluster: start (node binaries, control plane, containerd, image import, node Ready)"):
        stack = e2e_cluster.run_cluster(images=images, workdir=tmp_path_factory.mktemp("cluster"))
        cluster = stack.__enter__()
    for part, seconds in cluster.timings_s.items():
        STEP_TIMES[f"cluster: {part}"] = seconds
    try:
        yield cluster
    finally:
        with steps("cluster: tear down"):
            stack.__exit__(None, None, None)


@pytest.fixture(scope="session")
def helm() -> str:
    if env := os.environ.get("STOKER_HELM"):
        return env
    out = subprocess.run(["bash", str(REPO / "hack" / "install-helm.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]
