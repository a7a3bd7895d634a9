"""Model source health: when repeated fetch failures make a ModelCache Failed, and when it recovers
(a copy, a new ModelCache or spec, failures ageing out)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings, strategies as st

from stoker.operator import sourcehealth
from stoker.operator.sourcehealth import FetchFailure, ModelIdentity, SourceHealthSettings, plan_source_health

S = SourceHealthSettings(window_s=600, min_agents=3, min_failures=6)


def fail(agent: str, at: float, *, model: str = "ns/m", reason: str = "HTTPServerError", retryable: bool = True,
         standing: bool = False, uid: str | None = None, generation: int | None = None) -> FetchFailure:
    return FetchFailure(model=model, agent=agent, reason=reason, message="the server answered 503",
                        retryable=retryable, at=at, standing=standing, model_uid=uid, model_generation=generation)


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


def test_a_standing_permanent_failure_fails_the_source_at_once_and_for_as_long_as_it_is_refreshed() -> None:
    f = fail("a", 0, reason="ChecksumMismatch", retryable=False, standing=True)
    verdict = plan_source_health([f], with_copy=(), now=1, settings=S)["ns/m"]
    assert (verdict.reason, verdict.permanent) == ("ChecksumMismatch", True)
    assert "ns/m" in plan_source_health([f], with_copy=(), now=S.permanent_max_age_s, settings=S)
    retried = fail("a", 5000, reason="ChecksumMismatch", retryable=False, standing=True)
    assert "ns/m" in plan_source_health([retried], with_copy=(), now=5000 + S.permanent_max_age_s, settings=S)


def test_a_standing_permanent_failure_nobody_refreshed_ages_out_so_new_jobs_try_the_source_again() -> None:
    f = fail("a", 0, reason="HTTPForbidden", retryable=False, standing=True)
    assert plan_source_health([f], with_copy=(), now=S.permanent_max_age_s + 1, settings=S) == {}


CURRENT = {"ns/m": ModelIdentity(uid="uid-2", generation=3, spec_since=1000.0)}


def test_failures_reported_for_an_earlier_modelcache_of_the_same_name_do_not_count() -> None:
    old = fail("a", 2000, reason="ChecksumMismatch", retryable=False, standing=True, uid="uid-1", generation=3)
    assert plan_source_health([old], with_copy=(), now=2001, models=CURRENT, settings=S) == {}
    current = dataclasses.replace(old, model_uid="uid-2")
    assert "ns/m" in plan_source_health([current], with_copy=(), now=2001, models=CURRENT, settings=S)


def test_failures_reported_for_an_earlier_spec_do_not_count_however_recent() -> None:
    old = fail("a", 2000, reason="HTTPForbidden", retryable=False, standing=True, uid="uid-2", generation=2)
    assert plan_source_health([old], with_copy=(), now=2001, models=CURRENT, settings=S) == {}
    flaky = [fail(a, 2000, uid="uid-2", generation=2) for a in "abc"]
    assert plan_source_health(flaky, with_copy=(), now=2001, models=CURRENT, settings=S) == {}


def test_a_failure_that_names_the_current_spec_counts_even_if_the_clocks_disagree() -> None:
    skewed = fail("a", 900, reason="ChecksumMismatch", retryable=False, standing=True, uid="uid-2", generation=3)
    assert "ns/m" in plan_source_health([skewed], with_copy=(), now=1001, models=CURRENT, settings=S)


def test_failures_without_a_uid_count_only_after_the_current_spec_took_effect() -> None:
    before = [fail("a", 990, reason="HTTPNotFound", retryable=False)] + [fail(a, 995) for a in "bcd"]
    assert plan_source_health(before, with_copy=(), now=1010, models=CURRENT, settings=S) == {}
    after = [fail("a", 1005, reason="HTTPNotFound", retryable=False)]
    assert "ns/m" in plan_source_health(after, with_copy=(), now=1010, models=CURRENT, settings=S)


def test_failures_of_a_model_not_observed_are_taken_as_they_are() -> None:
    f = fail("a", 0, model="ns/unknown", reason="HTTPNotFound", retryable=False, standing=True, uid="x", generation=9)
    assert "ns/unknown" in plan_source_health([f], with_copy=(), now=1, models=CURRENT, settings=S)


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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.floats(0, 5000), st.booleans(), st.booleans(),
                          st.sampled_from([None, 1, 2])), max_size=30),
       st.booleans())
def test_a_model_with_a_copy_is_never_failed_and_failed_ones_have_current_evidence_young_enough(
        raw: list[tuple[str, float, bool, bool, int | None]], has_copy: bool) -> None:
    failures = [fail(a, t, retryable=r, standing=s and not r, reason="HTTPServerError" if r else "HTTPNotFound",
                     uid=None if g is None else "uid", generation=g)
                for a, t, r, s, g in raw]
    models = {"ns/m": ModelIdentity(uid="uid", generation=2, spec_since=1000.0)}
    now = 5000.0
    verdicts = plan_source_health(failures, with_copy={"ns/m"} if has_copy else set(), now=now, models=models,
                                  settings=S)
    current = [f for f in failures if f.model_generation == 2 or (f.model_generation is None and f.at >= 1000.0)]
    assert verdicts == plan_source_health(current, with_copy={"ns/m"} if has_copy else set(), now=now, settings=S), (
        "failures of an earlier spec change nothing")
    if has_copy:
        assert verdicts == {}
    elif "ns/m" in verdicts:
        recent = [f for f in current if now - f.at <= S.window_s]
        standing = [f for f in current if f.standing and not f.retryable and now - f.at <= S.permanent_max_age_s]
        assert standing or any(not f.retryable for f in recent) or (
            len({f.agent for f in recent if f.retryable}) >= S.min_agents or len(recent) >= S.min_failures)


class TestOversize:
    def test_a_model_larger_than_every_budget_is_failed_as_too_large(self) -> None:
        out = sourcehealth.plan_oversize({"ns/big": [20 << 30], "ns/ok": [5 << 30]}, budgets=[10 << 30, 12 << 30])
        assert set(out) == {"ns/big"}
        verdict = out["ns/big"]
        assert verdict.reason == sourcehealth.TOO_LARGE and verdict.permanent
        assert str(20 << 30) in verdict.message and str(12 << 30) in verdict.message and "disk budget" in verdict.message

    def test_one_agent_big_enough_or_a_copy_anywhere_keeps_it_placeable(self) -> None:
        assert sourcehealth.plan_oversize({"ns/big": [20 << 30]}, budgets=[10 << 30, 30 << 30]) == {}
        assert sourcehealth.plan_oversize({"ns/big": [20 << 30]}, budgets=[10 << 30], with_copy={"ns/big"}) == {}

    def test_without_known_budgets_or_sizes_nothing_is_too_large(self) -> None:
        assert sourcehealth.plan_oversize({"ns/big": [20 << 30]}, budgets=[]) == {}
        assert sourcehealth.plan_oversize({"ns/x": []}, budgets=[1]) == {}
