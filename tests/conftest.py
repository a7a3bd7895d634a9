"""Shared test configuration: markers by folder, GPU skipping, repeatable generated examples."""

from __future__ import annotations

import os
import pathlib

import pytest
from hypothesis import settings

# The same generated examples on every run, so that a failure is one anyone can reproduce;
# STOKER_HYPOTHESIS_PROFILE=explore searches new ones.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("STOKER_HYPOTHESIS_PROFILE", "repeatable"))

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
        # The marker, not the keyword: keywords include every parent folder's name (a checkout in .../gpu).
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
    return REPO
