"""Leader election's rules that need no API server."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stoker.operator.leader import LeaderSettings, honoured_duration_s


def test_a_foreign_lease_longer_than_our_own_is_waited_out_for_our_own_duration_only() -> None:
    assert honoured_duration_s(3600, own_s=15.0) == 15.0


def test_a_shorter_or_missing_duration_is_taken_as_written_or_replaced_by_our_own() -> None:
    assert honoured_duration_s(5, own_s=15.0) == 5.0
    assert honoured_duration_s(None, own_s=15.0) == 15.0
    assert honoured_duration_s(0, own_s=15.0) == 15.0


@given(st.one_of(st.none(), st.integers(-10, 10**9)), st.floats(0.5, 3600))
def test_no_written_duration_ever_makes_a_standby_wait_longer_than_its_own(written, own) -> None:
    assert 0 < honoured_duration_s(written, own_s=own) <= own


def test_lease_requests_time_out_within_the_renew_deadline() -> None:
    s = LeaderSettings(namespace="ns", identity="op", lease_duration_s=6.0)
    connect, read = s.request_timeout
    assert read <= s.deadline_s and connect <= s.deadline_s
