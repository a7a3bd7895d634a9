"""The Dockerfile builds from what the repository holds, with pinned bases and the lock files."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_every_base_image_is_pinned_by_digest() -> None:
    bases = dict(re.findall(r"^ARG (\w+_BASE)=(\S+)$", DOCKERFILE, re.MULTILINE))
    assert set(bases) == {"PYTHON_BASE", "CUDA_BASE"}
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", ref) for ref in bases.values()), bases


def test_both_targets_exist_and_run_as_a_non_root_user() -> None:
    stages = re.findall(r"^FROM \S+ AS (\w+)$", DOCKERFILE, re.MULTILINE)
    assert {"operator", "agent"} <= set(stages)
    for stage in ("operator", "agent"):
        body = DOCKERFILE.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001:10001$", body, re.MULTILINE), stage
        assert "org.opencontainers.image.licenses" in body, stage


def test_every_copied_path_exists_and_is_not_dockerignored() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()}
    for line in re.findall(r"^COPY (?!--)(.+)$", DOCKERFILE, re.MULTILINE):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.split("/")[0] not in ignored, source


def test_the_images_install_the_generated_lock_files() -> None:
    assert "-r /out/requirements-operator.lock" in DOCKERFILE
    assert "-r /out/requirements-agent.lock" in DOCKERFILE
    assert "--no-deps" in DOCKERFILE  # exactly the pins, nothing resolved at build time
