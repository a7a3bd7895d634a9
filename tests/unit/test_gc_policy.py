"""The operator's garbage-collection policy: freeze what survived a full collection, sweep now and then."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from stoker.operator.gc_policy import Collector, Step, next_step


def test_a_full_collection_since_the_last_look_freezes_its_survivors() -> None:
    assert next_step(full_collections=4, seen=3, now=10.0, swept_at=0.0, sweep_every_s=600.0) is Step.FREEZE
    assert next_step(full_collections=4, seen=4, now=10.0, swept_at=0.0, sweep_every_s=600.0) is Step.NOTHING


def test_frozen_objects_are_handed_back_every_sweep_period_whatever_else_happened() -> None:
    assert next_step(full_collections=4, seen=4, now=600.0, swept_at=0.0, sweep_every_s=600.0) is Step.SWEEP
    assert next_step(full_collections=5, seen=4, now=700.0, swept_at=0.0, sweep_every_s=600.0) is Step.SWEEP


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_collector_freezes_after_a_full_collection_and_a_sweep_frees_cycles_that_died_frozen(thawed: None) -> None:
    collector = Collector(sweep_every_s=60.0)
    assert collector.tick(0.0) is Step.NOTHING  # the first look only counts
    assert collector.tick(1.0) is Step.NOTHING and gc.get_freeze_count() == 0
    kept = [Cycle() for _ in range(100)]
    refs = [weakref.ref(c) for c in kept]
    gc.collect()
    assert collector.tick(2.0) is Step.FREEZE
    assert gc.get_freeze_count() >= 100
    del kept  # cycles: only the collector frees them, and it no longer looks at frozen objects
    gc.collect()
    assert all(r() is not None for r in refs)
    assert collector.tick(3.0) is Step.FREEZE  # (that collection's survivors)
    assert collector.tick(61.0) is Step.SWEEP and gc.get_freeze_count() == 0
    gc.collect()  # the sweep handed them back: the next full collection frees them
    assert all(r() is None for r in refs)
