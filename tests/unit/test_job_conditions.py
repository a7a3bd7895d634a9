"""GenerationJob conditions per phase (pure): whole lists, transition times kept while a status holds."""

from __future__ import annotations

from stoker.api.conditions import job_conditions


def table(conds: list[dict]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in conds}


def test_a_fresh_pending_job_gets_no_conditions_and_an_unplaceable_one_says_why() -> None:
    assert job_conditions([], phase="Pending", now="t0", generation=1) == []
    conds = job_conditions([], phase="Pending", now="t0", generation=1, reason="NoReadyAgent", message="0/0")
    assert table(conds) == {"Scheduled": ("False", "NoReadyAgent")}
    assert conds[0]["observedGeneration"] == 1 and conds[0]["lastTransitionTime"] == "t0"


def test_a_job_through_its_life_keeps_each_transition_time_until_the_status_changes() -> None:
    pending = job_conditions([], phase="Pending", now="t0", generation=1, reason="NoReadyAgent")
    scheduled = job_conditions(pending, phase="Scheduled", now="t1", generation=1)
    assert table(scheduled) == {"Scheduled": ("True", "Accepted"), "Running": ("False", "Queued")}
    running = job_conditions(scheduled, phase="Running", now="t2", generation=1)
    assert {c["type"]: c["lastTransitionTime"] for c in running} == {"Scheduled": "t1", "Running": "t2"}
    done = job_conditions(running, phase="Succeeded", now="t3", generation=1, message="image at x")
    assert table(done) == {"Scheduled": ("True", "Accepted"), "Running": ("False", "Succeeded"),
                           "Succeeded": ("True", "Succeeded"), "Failed": ("False", "Succeeded")}
    assert [c["type"] for c in done] == ["Scheduled", "Running", "Succeeded", "Failed"]


def test_a_requeued_job_is_not_scheduled_nor_running_with_the_reason() -> None:
    running = job_conditions([], phase="Running", now="t0", generation=1)
    requeued = job_conditions(running, phase="Pending", now="t1", generation=1, reason="AgentLost", message="gone")
    assert table(requeued) == {"Scheduled": ("False", "AgentLost"), "Running": ("False", "AgentLost")}


def test_a_job_failing_before_it_ran_says_why_it_was_never_scheduled() -> None:
    failed = job_conditions([], phase="Failed", now="t0", generation=1, reason="ModelCacheNotFound", message="m")
    assert table(failed) == {"Scheduled": ("False", "ModelCacheNotFound"), "Succeeded": ("False", "ModelCacheNotFound"),
                             "Failed": ("True", "ModelCacheNotFound")}
