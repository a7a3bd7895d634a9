"""GenerationJob conditions: what each phase shows, computed from the list already there (pure).

Every writer of a job's status (the operator, the bound agent) writes the whole
`status.conditions` list with a resourceVersion precondition, computed by `job_conditions`
from the list on the object it read, so a condition keeps its lastTransitionTime while
its status stays the same and no writer drops another's condition.

    phase       Scheduled        Running         Succeeded      Failed
    Pending     False (reason)*  False (reason)*  -              -
    Scheduled   True             False Queued     -              -
    Running     True             True             -              -
    Succeeded   True             False            True           False
    Failed      (kept if True,   False            False          True (reason)
                else False)

    * written only when there is a reason: a fresh job waiting for a free agent has none,
      so a burst of queued jobs costs no condition writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SCHEDULED = "Scheduled"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
TYPES = (SCHEDULED, RUNNING, SUCCEEDED, FAILED)


def set_condition(conditions: Sequence[Mapping[str, Any]], *, type_: str, status: bool, reason: str, message: str,
                  now: str, generation: int | None) -> list[dict[str, Any]]:
    """`conditions` with `type_` set; its lastTransitionTime moves only when its status changes."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for c in conditions:
        if c.get("type") != type_:
            out.append(dict(c))
            continue
        found = True
        since = c.get("lastTransitionTime") if c.get("status") == value and c.get("lastTransitionTime") else now
        out.append(_condition(type_, value, reason, message, since, generation))
    if not found:
        out.append(_condition(type_, value, reason, message, now, generation))
    return sorted(out, key=lambda c: TYPES.index(c["type"]) if c["type"] in TYPES else len(TYPES))


def _condition(type_: str, status: str, reason: str, message: str, since: str, generation: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": reason or type_, "message": message[:2048],
                            "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def job_conditions(conditions: Sequence[Mapping[str, Any]], *, phase: str, now: str, generation: int | None,
                   reason: str | None = None, message: str | None = None) -> list[dict[str, Any]]:
    """The conditions a job shows in `phase` (see the table above), from the current list."""
    reason, message = reason or "", message or ""
    out = [dict(c) for c in conditions]

    def put(type_: str, status: bool, why: str, text: str) -> None:
        nonlocal out
        out = set_condition(out, type_=type_, status=status, reason=why, message=text, now=now, generation=generation)

    present = {c.get("type") for c in out}
    if phase == "Pending":
        if reason:
            put(SCHEDULED, False, reason, message)
            if RUNNING in present:
                put(RUNNING, False, reason, message)
    elif phase == "Scheduled":
        put(SCHEDULED, True, reason or "Accepted", message)
        put(RUNNING, False, "Queued", "waiting on the agent for a job slot")
    elif phase == "Running":
        if SCHEDULED not in present or not _is_true(out, SCHEDULED):
            put(SCHEDULED, True, "Accepted", message)
        put(RUNNING, True, reason or "Started", message)
    elif phase == "Succeeded":
        if SCHEDULED not in present or not _is_true(out, SCHEDULED):
            put(SCHEDULED, True, "Accepted", "")
        put(RUNNING, False, "Succeeded", message)
        put(SUCCEEDED, True, "Succeeded", message)
        put(FAILED, False, "Succeeded", "")
    elif phase == "Failed":
        why = reason or "Failed"
        if not _is_true(out, SCHEDULED):
            put(SCHEDULED, False, why, message)  # it never ran: say why here too
        if RUNNING in present:
            put(RUNNING, False, why, message)
        put(SUCCEEDED, False, why, message)
        put(FAILED, True, why, message)
    else:
        raise ValueError(f"unknown GenerationJob phase {phase!r}")
    return out


def _is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions)


def condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_`, or None."""
    return next((c for c in conditions if c.get("type") == type_), None)
