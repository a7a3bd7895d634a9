"""Hot replicas on the agent: a held model stays loaded under LRU pressure, a released one is unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stoker.agent.hot_holds import HotHolds
from stoker.agent.loader import Loader, LoadOptions
from stoker.agent.weights import Weights

CPU = torch.device("cpu")
MODEL_BYTES = 4096 * 4 + 12


def write_model(path: Path, *, fill: float) -> Path:
    save_file({"w": torch.full((4096,), fill), "b": torch.arange(3, dtype=torch.int32)}, path)
    return path


@pytest.fixture
def loader():
    with Loader(LoadOptions(chunk_bytes=4096, reader_threads=2)) as ldr:
        yield ldr


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {k: write_model(tmp_path / f"{k}.safetensors", fill=float(i + 1)) for i, k in enumerate("abc")}


def vram_keys(weights: Weights) -> set[str]:
    return {e.key for e in weights.vram.snapshot().entries}


def test_a_held_model_is_loaded_and_survives_lru_pressure_that_evicts_the_others(loader, models) -> None:
    weights = Weights(loader=loader, device=CPU, vram_budget_bytes=2 * MODEL_BYTES, ram_budget_bytes=0)
    hot = HotHolds(weights)
    hot.load("ns/a", models["a"], "vram")
    assert vram_keys(weights) == {"ns/a"} and hot.held() == {"ns/a": "vram"}
    for key in ("b", "c", "b", "c"):  # jobs cycling through two other models in a budget of two
        with weights.use(f"ns/{key}", models[key]):
            pass
    assert "ns/a" in vram_keys(weights)
    with weights.use("ns/a", models["a"]) as (model, tier):
        assert tier == "vram" and float(model.tensors["w"][0]) == 1.0


def test_releasing_a_hold_unloads_the_model_unless_a_job_uses_it(loader, models) -> None:
    weights = Weights(loader=loader, device=CPU, vram_budget_bytes=3 * MODEL_BYTES, ram_budget_bytes=0)
    hot = HotHolds(weights)
    hot.load("ns/a", models["a"], "vram")
    hot.load("ns/b", models["b"], "vram")
    assert hot.release("ns/a") is True and "ns/a" not in vram_keys(weights)
    with weights.use("ns/b", models["b"]):  # a job is using b when its order goes
        assert hot.release("ns/b") is True
        assert "ns/b" in vram_keys(weights)
    assert hot.held() == {} and hot.release("ns/b") is False
    with weights.use("ns/c", models["c"]), weights.use("ns/a", models["a"]):
        pass  # b, no longer held, is an ordinary LRU entry: the budget of three takes c and a beside it
    assert vram_keys(weights) == {"ns/a", "ns/b", "ns/c"}


def test_a_hold_the_budget_cannot_fit_fails_with_the_tier_error_and_holds_nothing(loader, models) -> None:
    from stoker.agent.disk_cache import InsufficientCache

    weights = Weights(loader=loader, device=CPU, vram_budget_bytes=MODEL_BYTES, ram_budget_bytes=0)
    hot = HotHolds(weights)
    with weights.use("ns/b", models["b"]):  # in use: cannot be evicted to make room
        with pytest.raises(InsufficientCache):
            hot.load("ns/a", models["a"], "vram")
    assert hot.held() == {}


def test_a_ram_hold_keeps_a_host_copy_that_vram_eviction_leaves_alone(loader, models) -> None:
    weights = Weights(loader=loader, device=CPU, vram_budget_bytes=MODEL_BYTES, ram_budget_bytes=2 * MODEL_BYTES,
                      ram_tier=True)
    hot = HotHolds(weights)
    hot.load("ns/a", models["a"], "ram")
    assert weights.ram is not None and weights.ram.holds("ns/a")
    hot.load("ns/a", models["a"], "ram")  # already held there: nothing changes
    assert hot.held() == {"ns/a": "ram"}
    assert hot.release("ns/a") and not weights.ram.holds("ns/a")
