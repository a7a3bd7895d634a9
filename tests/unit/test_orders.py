"""The retry schedule for held models that could not be fetched (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stoker.agent.orders import retry_delay_s


def test_the_delay_doubles_from_the_initial_one_up_to_the_cap() -> None:
    delays = [retry_delay_s(n, initial_s=5, max_s=60, jitter=0.999999) for n in range(1, 7)]
    assert [round(d) for d in delays] == [5, 10, 20, 40, 60, 60]


@given(failures=st.integers(min_value=0, max_value=10_000), jitter=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_jitter_keeps_every_delay_within_the_upper_half_of_its_interval_and_under_the_cap(failures: int, jitter: float) -> None:
    delay = retry_delay_s(failures, initial_s=2.0, max_s=300.0, jitter=jitter)
    base = min(300.0, 2.0 * 2 ** min(max(0, failures - 1), 60))
    assert base / 2 <= delay <= base <= 300
