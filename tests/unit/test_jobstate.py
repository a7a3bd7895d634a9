"""The GenerationJob state machine: transitions, guards against stale writes, invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from stoker.operator import jobstate as js
from stoker.operator.jobstate import InvalidTransition, JobPhase, JobState, Outcome, Reason, StaleAttempt


def running(agent: str = "a", *, max_attempts: int = 3) -> JobState:
    state = js.bind(js.new_job(created_at=0, max_attempts=max_attempts, timeout_s=600), agent=agent, now=1)
    return js.start(state, agent=agent, attempt=state.attempt)


class TestHappyPath:
    def test_a_job_goes_pending_scheduled_running_succeeded(self) -> None:
        state = js.new_job(created_at=0, timeout_s=60)
        assert (state.phase, state.attempt, state.deadline) == (JobPhase.PENDING, 1, 60)
        state = js.bind(state, agent="a", now=1)
        assert (state.phase, state.agent, state.bound_at) == (JobPhase.SCHEDULED, "a", 1)
        state = js.start(state, agent="a", attempt=1)
        state = js.succeed(state, agent="a", attempt=1, now=5)
        assert (state.phase, state.finished_at) == (JobPhase.SUCCEEDED, 5)
        assert state.history == (js.AttemptRecord(1, "a", Outcome.SUCCEEDED, at=5),)

    def test_an_agent_may_report_success_before_its_running_report(self) -> None:
        state = js.bind(js.new_job(created_at=0), agent="a", now=1)
        assert js.succeed(state, agent="a", attempt=1, now=2).phase is JobPhase.SUCCEEDED


class TestFailures:
    def test_a_lost_agent_sends_the_job_back_to_pending_with_the_next_attempt(self) -> None:
        state = js.agent_lost(running("a"), now=10, agent="a")
        assert (state.phase, state.agent, state.attempt) == (JobPhase.PENDING, None, 2)
        assert state.history[-1].outcome is Outcome.REQUEUED and state.history[-1].reason == Reason.AGENT_LOST
        assert js.failed_agents(state) == {"a"}

    def test_attempts_run_out_into_attempts_exhausted(self) -> None:
        state = js.new_job(created_at=0, max_attempts=2)
        for agent in ("a", "b"):
            state = js.bind(state, agent=agent, now=1)
            state = js.fail(state, agent=agent, attempt=state.attempt, reason="RunnerFailed", retryable=True, now=2)
        assert (state.phase, state.reason, state.attempt) == (JobPhase.FAILED, Reason.ATTEMPTS_EXHAUSTED, 2)
        assert [r.agent for r in state.history] == ["a", "b"]
        assert state.finished_at == 2

    def test_faults_of_agents_use_none_of_the_jobs_attempts(self) -> None:
        state = js.new_job(created_at=0, max_attempts=1)
        state = js.agent_lost(js.bind(state, agent="a", now=1), now=2)
        state = js.bind(state, agent="b", now=3)
        state = js.fail(state, agent="b", attempt=2, reason="DiskFull", retryable=True, now=4, agent_fault=True)
        assert (state.phase, state.attempt, js.attempts_used(state.history)) == (JobPhase.PENDING, 3, (0, 2))
        state = js.succeed(js.bind(state, agent="c", now=5), agent="c", attempt=3, now=6)
        assert state.phase is JobPhase.SUCCEEDED and state.reason is None

    def test_a_job_that_keeps_losing_its_agents_still_ends(self) -> None:
        state = js.new_job(created_at=0, max_attempts=3)
        for i in range(state.max_agent_faults + 1):
            state = js.agent_lost(js.bind(state, agent=f"a{i}", now=i), now=i + 0.5)
        assert (state.phase, state.reason) == (JobPhase.FAILED, Reason.ATTEMPTS_EXHAUSTED)
        assert "faults of their agents" in (state.message or "")

    def test_a_retryable_failure_requeues_and_blocks_that_agent(self) -> None:
        state = js.fail(running("a"), agent="a", attempt=1, reason="OutOfMemory", retryable=True, now=3)
        assert (state.phase, state.attempt, state.reason) == (JobPhase.PENDING, 2, "OutOfMemory")
        with pytest.raises(InvalidTransition, match="earlier attempt failed"):
            js.bind(state, agent="a", now=4)
        assert js.bind(state, agent="b", now=4).agent == "b"

    def test_a_non_retryable_failure_fails_the_job_with_the_agents_reason(self) -> None:
        state = js.fail(running("a"), agent="a", attempt=1, reason="InvalidParams", message="width", retryable=False, now=3)
        assert (state.phase, state.reason, state.message) == (JobPhase.FAILED, "InvalidParams", "width")

    def test_the_deadline_fails_the_job_once_reached(self) -> None:
        state = running("a")
        assert js.check_deadline(state, now=599) is state
        failed = js.check_deadline(state, now=600)
        assert (failed.phase, failed.reason) == (JobPhase.FAILED, Reason.DEADLINE_EXCEEDED)
        assert failed.history[-1].agent == "a"

    def test_a_job_without_timeout_never_exceeds_a_deadline(self) -> None:
        state = js.new_job(created_at=0)
        assert js.check_deadline(state, now=10**9) is state

    def test_an_unavailable_model_fails_the_job_instead_of_retrying(self) -> None:
        state = js.model_unavailable(js.new_job(created_at=0), message="source returns 404", now=1)
        assert (state.phase, state.reason, state.message) == (JobPhase.FAILED, Reason.MODEL_UNAVAILABLE, "source returns 404")

    def test_cancel_fails_the_job_from_any_live_phase(self) -> None:
        for state in (js.new_job(created_at=0), js.bind(js.new_job(created_at=0), agent="a", now=0), running()):
            cancelled = js.cancel(state, now=1)
            assert (cancelled.phase, cancelled.reason) == (JobPhase.FAILED, Reason.CANCELLED)


class TestGuards:
    def test_a_write_from_another_agent_is_refused(self) -> None:
        with pytest.raises(StaleAttempt):
            js.succeed(running("a"), agent="b", attempt=1, now=2)

    def test_a_write_for_an_older_attempt_is_refused(self) -> None:
        state = js.bind(js.agent_lost(running("a"), now=2), agent="b", now=3)
        for write in (
            lambda: js.start(state, agent="a", attempt=1),
            lambda: js.succeed(state, agent="a", attempt=1, now=4),
            lambda: js.fail(state, agent="a", attempt=1, reason="X", retryable=True, now=4),
            lambda: js.succeed(state, agent="b", attempt=1, now=4),
        ):
            with pytest.raises(StaleAttempt):
                write()
        assert js.succeed(state, agent="b", attempt=2, now=4).phase is JobPhase.SUCCEEDED

    def test_losing_an_agent_the_job_already_left_is_stale(self) -> None:
        state = js.bind(js.agent_lost(running("a"), now=2), agent="b", now=3)
        with pytest.raises(StaleAttempt):
            js.agent_lost(state, now=4, agent="a")

    def test_terminal_phases_are_terminal(self) -> None:
        done = js.succeed(running("a"), agent="a", attempt=1, now=2)
        failed = js.cancel(js.new_job(created_at=0), now=1)
        for state in (done, failed):
            for action in (
                lambda: js.bind(state, agent="z", now=9),
                lambda: js.start(state, agent="a", attempt=1),
                lambda: js.succeed(state, agent="a", attempt=1, now=9),
                lambda: js.fail(state, agent="a", attempt=1, reason="X", retryable=True, now=9),
                lambda: js.agent_lost(state, now=9),
                lambda: js.cancel(state, now=9),
                lambda: js.model_unavailable(state, message="x", now=9),
            ):
                with pytest.raises(InvalidTransition):
                    action()
            assert js.check_deadline(state, now=10**9) is state

    def test_invalid_construction_is_refused(self) -> None:
        with pytest.raises(js.JobStateError):
            js.new_job(created_at=0, max_attempts=0)


class TestTtl:
    def test_a_finished_job_expires_after_its_ttl(self) -> None:
        done = js.succeed(running("a"), agent="a", attempt=1, now=100)
        assert not js.is_expired(done, ttl_s=60, now=159)
        assert js.is_expired(done, ttl_s=60, now=160)
        assert not js.is_expired(done, ttl_s=None, now=10**9)

    def test_a_live_job_never_expires(self) -> None:
        assert not js.is_expired(running("a"), ttl_s=0, now=10**9)


# --- random sequences of events -----------------------------------------------------

AGENTS = ["a", "b", "c"]
events = st.lists(
    st.one_of(
        st.tuples(st.just("bind"), st.sampled_from(AGENTS), st.just(0)),
        st.tuples(st.sampled_from(["start", "succeed", "fail", "fail_final"]), st.sampled_from(AGENTS), st.integers(1, 4)),
        st.tuples(st.sampled_from(["lost", "deadline", "cancel", "unavailable"]), st.sampled_from(AGENTS), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=400, deadline=None)
@given(events, st.integers(1, 4))
def test_invariants_hold_for_any_sequence_of_events(sequence: list[tuple[str, str, int]], max_attempts: int) -> None:
    state = js.new_job(created_at=0, max_attempts=max_attempts, timeout_s=1000)
    for now, (kind, agent, attempt) in enumerate(sequence, start=1):
        before = state
        current = before.agent == agent and before.attempt == attempt and not before.terminal
        try:
            if kind == "bind":
                state = js.bind(state, agent=agent, now=now)
            elif kind == "start":
                state = js.start(state, agent=agent, attempt=attempt)
            elif kind == "succeed":
                state = js.succeed(state, agent=agent, attempt=attempt, now=now)
            elif kind in ("fail", "fail_final"):
                state = js.fail(state, agent=agent, attempt=attempt, reason="X", retryable=kind == "fail", now=now,
                                agent_fault=kind == "fail" and now % 2 == 0)
            elif kind == "lost":
                state = js.agent_lost(state, now=now, agent=agent)
            elif kind == "deadline":
                state = js.check_deadline(state, now=now * 100)
            elif kind == "cancel":
                state = js.cancel(state, now=now)
            else:
                state = js.model_unavailable(state, message="gone", now=now)
        except StaleAttempt:
            assert kind in ("start", "succeed", "fail", "fail_final", "lost")
            assert not current or kind == "lost"
        except InvalidTransition:
            pass
        else:
            if kind in ("start", "succeed", "fail", "fail_final"):
                assert current  # an agent's write lands only for the current attempt
        # The invariants.
        assert state.attempt >= before.attempt
        assert 1 <= state.attempt <= state.max_attempts + state.max_agent_faults
        used, agent_faults = js.attempts_used(state.history)
        assert used <= state.max_attempts and agent_faults <= state.max_agent_faults + 1
        if before.terminal:
            assert state == before
        assert state.history[: len(before.history)] == before.history
        assert (state.agent is not None) == (state.phase in (JobPhase.SCHEDULED, JobPhase.RUNNING, JobPhase.SUCCEEDED))
        assert (state.finished_at is not None) == state.terminal
        if state.phase is JobPhase.SCHEDULED and before.phase is JobPhase.PENDING:
            assert state.agent not in js.failed_agents(before)
