"""Agent metrics by tier, and the measured load rates the CacheAgent status reports."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
import safetensors.numpy
import torch

from stoker.agent.loader import Loader
from stoker.agent.metrics import AgentMetrics, InstrumentedWeights, LoadRates
from stoker.agent.weights import Weights


def model_file(path: pathlib.Path, seed: int, *, floats: int = 64 * 1024) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    safetensors.numpy.save_file({"w": rng.standard_normal(floats, dtype=np.float32)}, str(path))
    return path


class TestLoadRates:
    def test_the_first_load_sets_the_rate_and_later_ones_move_it_gradually(self) -> None:
        rates = LoadRates()
        assert rates.bps("disk") == 0.0
        rates.record("disk", size_bytes=1000, seconds=1.0)
        assert rates.bps("disk") == 1000.0
        rates.record("disk", size_bytes=2000, seconds=1.0)
        assert rates.bps("disk") == pytest.approx(1000 + LoadRates.WEIGHT * 1000)
        assert rates.bps("ram") == 0.0

    def test_a_load_without_bytes_or_time_is_not_a_measurement(self) -> None:
        rates = LoadRates()
        rates.record("ram", size_bytes=0, seconds=1.0)
        rates.record("ram", size_bytes=10, seconds=0.0)
        assert rates.bps("ram") == 0.0

    def test_rates_are_published_by_source(self) -> None:
        metrics = AgentMetrics()
        LoadRates(metrics).record("ram", size_bytes=4000, seconds=2.0)
        assert metrics.value("stoker_agent_load_bandwidth_bytes_per_second", {"source": "ram"}) == 2000.0


class TestHotTierMetrics:
    @pytest.fixture
    def weights(self) -> Iterator[Weights]:
        w = Weights(loader=Loader(), device=torch.device("cpu"), vram_budget_bytes=2**30, ram_budget_bytes=2**30,
                    ram_tier=True)
        yield w
        w.close()
        w.loader.close()

    def test_uses_count_hits_and_misses_per_tier_and_measure_disk_loads(self, weights: Weights, tmp_path) -> None:
        metrics, rates = AgentMetrics(), LoadRates()
        metered = InstrumentedWeights(weights, metrics=metrics, rates=rates)
        path = model_file(tmp_path / "a.safetensors", 1)
        with metered.use("team/a", path) as (_, tier):
            assert tier == "disk"
        with metered.use("team/a", path) as (_, tier):
            assert tier == "vram"

        def count(name: str, tier: str) -> float:
            return metrics.value(f"stoker_agent_cache_{name}_total", {"tier": tier})

        assert (count("hits", "vram"), count("misses", "vram")) == (1, 1)
        assert (count("hits", "ram"), count("misses", "ram")) == (0, 1)  # a VRAM hit never asks RAM
        assert rates.bps("disk") > 0 and rates.bps("ram") == 0

    def test_a_model_served_from_ram_counts_a_ram_hit_and_measures_ram_to_device(self, weights: Weights, tmp_path) -> None:
        metrics, rates = AgentMetrics(), LoadRates()
        metered = InstrumentedWeights(weights, metrics=metrics, rates=rates)
        path = model_file(tmp_path / "a.safetensors", 2)
        metered.stage("team/a", path)  # passed through to Weights: a pinned host copy in the RAM tier
        with metered.use("team/a", path) as (_, tier):
            assert tier == "ram"
        assert metrics.value("stoker_agent_cache_hits_total", {"tier": "ram"}) == 1
        assert metrics.value("stoker_agent_cache_misses_total", {"tier": "vram"}) == 1
        assert rates.bps("ram") > 0 and rates.bps("disk") == 0

    def test_hot_tier_bytes_are_read_from_the_tiers_when_scraped(self, weights: Weights, tmp_path) -> None:
        metrics = AgentMetrics()
        metrics.watch_tier("vram", weights.vram.snapshot)
        assert metrics.value("stoker_agent_cache_used_bytes", {"tier": "vram"}) == 0
        assert metrics.value("stoker_agent_cache_budget_bytes", {"tier": "vram"}) == 2**30
        path = model_file(tmp_path / "a.safetensors", 3)
        with weights.use("team/a", path):
            pass
        assert metrics.value("stoker_agent_cache_used_bytes", {"tier": "vram"}) == 64 * 1024 * 4
        text = metrics.render().decode()
        assert 'stoker_agent_cache_used_bytes{tier="vram"} 262144.0' in text
