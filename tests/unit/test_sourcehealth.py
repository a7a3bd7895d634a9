"""Model source health: when repeated fetch failures make a ModelCache Failed, and when it recovers."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from stoker.operator.sourcehealth import FetchFailure, SourceHealthSettings, plan_source_health

S = SourceHealthSettings(window_s=600, min_agents=3, min_failures=6)


def fail(agent: str, at: float, *, model: str = "ns/m", reason: str = "HTTPServerError", retryable: bool = True,
         standing: bool = False) -> FetchFailure:
    return FetchFailure(model=model, agent=agent, reason=reason, message="the server answered 503",
                        retryable=retryable, at=at, standing=standing)


def test_retryable_failures_on_three_agents_within_the_window_fail_the_source() -> None:
    verdicts = plan_source_health([fail("a", 0), fail("b", 10), fail("c", 20)], with_copy=(), now=30, settings=S)
    assert verdicts["ns/m"].reason == "HTTPServerError"
    assert verdicts["ns/m"].agents == 3
    assert "3 fetch failures on 3 agent(s)" in verdicts["ns/m"].message


def test_retryable_failures_on_fewer_agents_do_not_fail_the_source() -> None:
    assert plan_source_health([fail("a", 0), fail("b", 10)], with_copy=(), now=30, settings=S) == {}


def test_many_failures_on_a_single_agent_fail_the_source_eventually() -> None:
    failures = [fail("only", t) for t in range(0, 60, 10)]
    assert plan_source_health(failures[:5], with_copy=(), now=60, settings=S) == {}
    assert "ns/m" in plan_source_health(failures, with_copy=(), now=60, settings=S)


def test_retryable_failures_age_out_of_the_window() -> None:
    failures = [fail("a", 0), fail("b", 10), fail("c", 20)]
    assert plan_source_health(failures, with_copy=(), now=615, settings=S) == {}


def test_a_copy_on_a_ready_agent_clears_the_failure() -> None:
    failures = [fail("a", 0), fail("b", 10), fail("c", 20), fail("d", 0, reason="ChecksumMismatch", retryable=False,
                                                                    standing=True)]
    assert plan_source_health(failures, with_copy={"ns/m"}, now=30, settings=S) == {}


def test_a_standing_permanent_failure_fails_the_source_at_once_and_does_not_age_out() -> None:
    f = fail("a", 0, reason="ChecksumMismatch", retryable=False, standing=True)
    verdict = plan_source_health([f], with_copy=(), now=10_000, settings=S)["ns/m"]
    assert verdict.reason == "ChecksumMismatch"


def test_a_permanent_failure_seen_only_in_job_history_ages_out() -> None:
    f = fail("a", 0, reason="HTTPNotFound", retryable=False)
    assert "ns/m" in plan_source_health([f], with_copy=(), now=100, settings=S)
    assert plan_source_health([f], with_copy=(), now=1000, settings=S) == {}


def test_the_most_frequent_reason_names_the_failure() -> None:
    failures = [fail("a", 0, reason="Timeout"), fail("b", 1, reason="Timeout"), fail("c", 2, reason="HTTPServerError")]
    assert plan_source_health(failures, with_copy=(), now=3, settings=S)["ns/m"].reason == "Timeout"


def test_failures_of_other_models_do_not_count_together() -> None:
    failures = [fail("a", 0, model="ns/x"), fail("b", 0, model="ns/y"), fail("c", 0, model="ns/z")]
    assert plan_source_health(failures, with_copy=(), now=1, settings=S) == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.floats(0, 1200), st.booleans(), st.booleans()), max_size=30),
       st.booleans())
def test_a_model_with_a_copy_is_never_failed_and_failed_ones_have_evidence_in_the_window(
        raw: list[tuple[str, float, bool, bool]], has_copy: bool) -> None:
    failures = [fail(a, t, retryable=r, standing=s and not r, reason="HTTPServerError" if r else "HTTPNotFound")
                for a, t, r, s in raw]
    now = 1200.0
    verdicts = plan_source_health(failures, with_copy={"ns/m"} if has_copy else set(), now=now, settings=S)
    if has_copy:
        assert verdicts == {}
    elif "ns/m" in verdicts:
        recent = [f for f in failures if now - f.at <= S.window_s]
        standing = [f for f in failures if f.standing and not f.retryable]
        assert standing or any(not f.retryable for f in recent) or (
            len({f.agent for f in recent if f.retryable}) >= S.min_agents or len(recent) >= S.min_failures)
