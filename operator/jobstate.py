"""The GenerationJob state machine (pure, no I/O).

    Pending --bind--> Scheduled --start--> Running --succeed--> Succeeded
       ^                  |                   |
       +---- requeue -----+-------------------+      (agent lost, retryable failure;
                          |                   |       attempt + 1, history recorded)
                          +----> Failed <-----+      (attempts exhausted, deadline,
                                                      model unavailable, cancelled,
                                                      non-retryable failure)

Every transition is a function from a frozen `JobState` to a new one, or raises
`InvalidTransition`. Writes that come from an agent carry the agent name and the
attempt number they are about; a write for another agent or an older attempt raises
`StaleAttempt`, so a result is only ever recorded for the current attempt. Succeeded
and Failed are terminal: nothing leaves them. The attempt number never decreases.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

__all__ = [
    "AttemptRecord",
    "InvalidTransition",
    "JobPhase",
    "JobState",
    "JobStateError",
    "Outcome",
    "Reason",
    "StaleAttempt",
    "agent_lost",
    "bind",
    "cancel",
    "check_deadline",
    "fail",
    "failed_agents",
    "is_expired",
    "model_unavailable",
    "new_job",
    "start",
    "succeed",
    "unschedulable",
]


class JobStateError(Exception):
    """Root of the job state machine's errors."""


class InvalidTransition(JobStateError):
    """The transition is not allowed from the job's current phase."""


class StaleAttempt(InvalidTransition):
    """A write about an agent or attempt that is no longer current; it must be dropped."""


class JobPhase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


class Reason(enum.StrEnum):
    """Reasons the operator itself sets; agents may report others (e.g. LoadFailed)."""

    ATTEMPTS_EXHAUSTED = "AttemptsExhausted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    MODEL_UNAVAILABLE = "ModelUnavailable"
    CANCELLED = "Cancelled"
    AGENT_LOST = "AgentLost"


class Outcome(enum.StrEnum):
    """How one attempt ended (the values of GenerationJob status.history[].outcome)."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    """The attempt failed, or the job failed around it (deadline, model unavailable)."""
    REQUEUED = "Requeued"
    """The agent vanished (Lease expired) while the attempt was bound to it."""
    CANCELLED = "Cancelled"


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt: int
    agent: str
    outcome: Outcome
    reason: str = ""
    message: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class JobState:
    """What the state machine knows about one job. Times are seconds on the caller's clock."""

    phase: JobPhase = JobPhase.PENDING
    agent: str | None = None
    """The agent the current attempt is bound to (Scheduled, Running), or that produced the
    result (Succeeded); None while Pending and once Failed."""
    attempt: int = 1
    """Number of the current (or last) attempt, from 1."""
    max_attempts: int = 3
    history: tuple[AttemptRecord, ...] = ()
    reason: str | None = None
    message: str | None = None
    created_at: float = 0.0
    deadline: float | None = None
    """Absolute time after which the job fails with DeadlineExceeded; None: no limit."""
    bound_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise JobStateError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.attempt < 1:
            raise JobStateError(f"attempt must be >= 1, got {self.attempt}")

    @property
    def terminal(self) -> bool:
        return self.phase.terminal


def new_job(*, created_at: float, max_attempts: int = 3, timeout_s: float | None = None) -> JobState:
    """A freshly created job: Pending, attempt 1, deadline `timeout_s` after creation."""
    deadline = None if timeout_s is None else created_at + timeout_s
    return JobState(created_at=created_at, max_attempts=max_attempts, deadline=deadline)


def bind(state: JobState, *, agent: str, now: float) -> JobState:
    """Pending -> Scheduled on `agent`. Refused for an agent that already failed this job."""
    _require(state, "bind", JobPhase.PENDING)
    if agent in failed_agents(state):
        raise InvalidTransition(
            f"cannot bind attempt {state.attempt} to agent {agent!r}: an earlier attempt failed there; "
            "choose another agent"
        )
    return replace(state, phase=JobPhase.SCHEDULED, agent=agent, bound_at=now, reason=None, message=None)


def start(state: JobState, *, agent: str, attempt: int) -> JobState:
    """Scheduled -> Running, reported by the agent the current attempt is bound to."""
    _require_current(state, "start", agent, attempt)
    _require(state, "start", JobPhase.SCHEDULED)
    return replace(state, phase=JobPhase.RUNNING)


def succeed(state: JobState, *, agent: str, attempt: int, now: float) -> JobState:
    """Scheduled/Running -> Succeeded (an agent may finish before its Running report lands)."""
    _require_current(state, "succeed", agent, attempt)
    _require(state, "succeed", JobPhase.SCHEDULED, JobPhase.RUNNING)
    record = AttemptRecord(attempt, agent, Outcome.SUCCEEDED, at=now)
    return replace(state, phase=JobPhase.SUCCEEDED, history=state.history + (record,), finished_at=now, reason=None, message=None)


def fail(
    state: JobState, *, agent: str, attempt: int, reason: str, message: str = "", retryable: bool, now: float
) -> JobState:
    """The agent reports that the current attempt failed.

    Retryable with attempts left -> Pending with attempt + 1 (and the agent blocked for
    this job); retryable without -> Failed/AttemptsExhausted; not retryable -> Failed
    with the agent's reason."""
    _require_current(state, "fail", agent, attempt)
    _require(state, "fail", JobPhase.SCHEDULED, JobPhase.RUNNING)
    record = AttemptRecord(attempt, agent, Outcome.FAILED, reason, message, now)
    if retryable:
        return _requeue_or_exhaust(state, record, now=now)
    return _finish_failed(state, record, reason=reason, message=message or f"attempt {attempt} on {agent} failed", now=now)


def agent_lost(state: JobState, *, now: float, agent: str | None = None) -> JobState:
    """The job's agent went NotReady: Scheduled/Running -> Pending with attempt + 1, or
    Failed/AttemptsExhausted when none are left. With `agent`, refuses (StaleAttempt)
    when the job has meanwhile moved to another agent."""
    _require(state, "agent_lost", JobPhase.SCHEDULED, JobPhase.RUNNING)
    if state.agent is None:
        raise InvalidTransition(f"job in phase {state.phase.value} has no agent to lose")
    if agent is not None and agent != state.agent:
        raise StaleAttempt(f"agent {agent!r} was lost but attempt {state.attempt} is bound to {state.agent!r}; nothing to do")
    record = AttemptRecord(state.attempt, state.agent, Outcome.REQUEUED, Reason.AGENT_LOST, f"agent {state.agent} stopped renewing its lease", now)
    return _requeue_or_exhaust(state, record, now=now)


def check_deadline(state: JobState, *, now: float) -> JobState:
    """Failed/DeadlineExceeded once `now` reaches the deadline; otherwise unchanged
    (also unchanged for finished jobs: this is a check, not a command)."""
    if state.terminal or state.deadline is None or now < state.deadline:
        return state
    return _abort(state, Reason.DEADLINE_EXCEEDED, f"the job did not finish within its timeout (deadline passed {now - state.deadline:.1f}s ago)", now=now)


def model_unavailable(state: JobState, *, message: str, now: float) -> JobState:
    """Failed/ModelUnavailable: the model's source keeps failing, retrying would not help."""
    _require(state, "model_unavailable", JobPhase.PENDING, JobPhase.SCHEDULED, JobPhase.RUNNING)
    return _abort(state, Reason.MODEL_UNAVAILABLE, message, now=now)


def unschedulable(state: JobState, *, reason: str, message: str, now: float) -> JobState:
    """Pending -> Failed with `reason`: what keeps the job from every agent cannot pass by
    waiting (a ModelCache it names does not exist, past the job's grace)."""
    _require(state, "fail_unschedulable", JobPhase.PENDING)
    return replace(state, phase=JobPhase.FAILED, agent=None, finished_at=now, reason=reason, message=message)


def cancel(state: JobState, *, now: float, message: str = "the GenerationJob was deleted") -> JobState:
    """Failed/Cancelled from any non-terminal phase; the agent must stop the attempt."""
    _require(state, "cancel", JobPhase.PENDING, JobPhase.SCHEDULED, JobPhase.RUNNING)
    return _abort(state, Reason.CANCELLED, message, now=now)


def failed_agents(state: JobState) -> frozenset[str]:
    """Agents on which an attempt of this job failed or was lost (bad-node blocking)."""
    return frozenset(r.agent for r in state.history if r.outcome in (Outcome.FAILED, Outcome.REQUEUED))


def is_expired(state: JobState, *, ttl_s: float | None, now: float) -> bool:
    """True when a finished job has outlived `ttl_s` (ttlSecondsAfterFinished) and should be deleted."""
    if ttl_s is None or not state.terminal or state.finished_at is None:
        return False
    return now >= state.finished_at + ttl_s


# --- internals -------------------------------------------------------------------


def _require(state: JobState, action: str, *phases: JobPhase) -> None:
    if state.phase not in phases:
        allowed = ", ".join(p.value for p in phases)
        raise InvalidTransition(f"cannot {action} a job in phase {state.phase.value} (attempt {state.attempt}); allowed from: {allowed}")


def _require_current(state: JobState, action: str, agent: str, attempt: int) -> None:
    if agent != state.agent or attempt != state.attempt or state.phase.terminal:
        raise StaleAttempt(
            f"{action} from agent {agent!r} for attempt {attempt} refused: the job is {state.phase.value} with "
            f"attempt {state.attempt} on {state.agent!r}; the agent must drop this attempt"
        )


def _requeue_or_exhaust(state: JobState, record: AttemptRecord, *, now: float) -> JobState:
    history = state.history + (record,)
    if state.attempt >= state.max_attempts:
        return replace(
            state, phase=JobPhase.FAILED, agent=None, history=history, finished_at=now,
            reason=Reason.ATTEMPTS_EXHAUSTED,
            message=f"all {state.max_attempts} attempts failed; last: {record.reason} on {record.agent}",
        )
    return replace(
        state, phase=JobPhase.PENDING, agent=None, attempt=state.attempt + 1, history=history,
        bound_at=None, reason=record.reason, message=record.message,
    )


def _finish_failed(state: JobState, record: AttemptRecord, *, reason: str, message: str, now: float) -> JobState:
    return replace(
        state, phase=JobPhase.FAILED, agent=None, history=state.history + (record,),
        finished_at=now, reason=reason, message=message,
    )


def _abort(state: JobState, reason: Reason, message: str, *, now: float) -> JobState:
    history = state.history
    if state.agent is not None:
        outcome = Outcome.CANCELLED if reason is Reason.CANCELLED else Outcome.FAILED
        history += (AttemptRecord(state.attempt, state.agent, outcome, reason, message, now),)
    return replace(state, phase=JobPhase.FAILED, agent=None, history=history, finished_at=now, reason=reason, message=message)
