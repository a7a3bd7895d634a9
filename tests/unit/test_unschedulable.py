"""Why a pending job cannot be placed (pure): the first blocking reason, sizes unknown never block."""

from __future__ import annotations

from stoker.operator.unschedulable import AgentFacts, FleetFacts, JobFacts, ModelFacts, UnschedulableReason, diagnose

GiB = 1 << 30


def agent(name: str = "a", *, ready: bool = True, cordoned: bool = False, disk: int | None = 50 * GiB,
          vram: int | None = 16 * GiB) -> AgentFacts:
    return AgentFacts(name, ready=ready, cordoned=cordoned, disk_budget_bytes=disk, vram_bytes=vram)


def job(*artifacts: tuple[str, str], grace_s: float = 60.0) -> JobFacts:
    return JobFacts("ns/j", created_at=100.0, artifacts=artifacts or (("m", "model"),), missing_grace_s=grace_s)


MODELS = {"m": ModelFacts("m", 2 * GiB), "style": ModelFacts("style", None), "big": ModelFacts("big", 80 * GiB),
          "wide": ModelFacts("wide", 20 * GiB)}


def test_a_job_that_only_waits_for_a_busy_agent_has_no_diagnosis() -> None:
    assert diagnose(job(), models=MODELS, agents=[agent()], now=200.0) is None


def test_a_missing_lora_is_named_and_fails_the_job_only_after_its_grace() -> None:
    j = job(("m", "model"), ("nope", "lora"), grace_s=30)
    early = diagnose(j, models=MODELS, agents=[agent()], now=110.0)
    assert early is not None and early.reason is UnschedulableReason.MODEL_CACHE_NOT_FOUND and not early.fail
    assert "lora nope" in early.message and "30s" in early.message
    late = diagnose(j, models=MODELS, agents=[agent()], now=130.0)
    assert late is not None and late.fail


def test_without_a_ready_uncordoned_agent_the_counts_say_which_are_missing() -> None:
    d = diagnose(job(), models=MODELS, agents=[agent("a", ready=False), agent("b", cordoned=True)], now=200.0)
    assert d is not None and d.reason is UnschedulableReason.NO_READY_AGENT and not d.fail
    assert "0/2 agents are available: 1 not Ready, 1 cordoned" in d.message


def test_files_larger_than_every_disk_budget_are_too_large_and_then_vram_is_checked() -> None:
    big = diagnose(job(("big", "model")), models=MODELS, agents=[agent(disk=50 * GiB)], now=200.0)
    assert big is not None and big.reason is UnschedulableReason.TOO_LARGE_FOR_ANY_AGENT and "80.0 GiB" in big.message
    wide = diagnose(job(("wide", "model")), models=MODELS, agents=[agent(vram=16 * GiB), agent("b", vram=8 * GiB)],
                    now=200.0)
    assert wide is not None and wide.reason is UnschedulableReason.INSUFFICIENT_VRAM and "16.0 GiB" in wide.message


def test_an_unknown_size_counts_as_nothing_and_the_message_says_so() -> None:
    assert diagnose(job(("m", "model"), ("style", "lora")), models=MODELS, agents=[agent(vram=3 * GiB)],
                    now=200.0) is None
    d = diagnose(job(("wide", "model"), ("style", "lora")), models=MODELS, agents=[agent(vram=3 * GiB)], now=200.0)
    assert d is not None and "style: size unknown until an agent downloads it" in d.message


def test_an_agent_that_reports_no_budget_yet_limits_nothing() -> None:
    assert diagnose(job(("big", "model")), models=MODELS, agents=[agent(disk=None, vram=None)], now=200.0) is None


def test_the_last_placement_message_is_the_fallback() -> None:
    d = diagnose(job(), models=MODELS, agents=[agent()], now=200.0, placement_message="every agent failed this job")
    assert d is not None and d.reason is UnschedulableReason.UNSCHEDULABLE and d.message == "every agent failed this job"


def test_the_fleet_is_summed_once_over_the_agents_that_could_take_a_job() -> None:
    cases = [
        ([agent()], (1, 0, 0, 1, 50 * GiB, 16 * GiB)),
        ([agent("a", ready=False), agent("b", cordoned=True)], (2, 1, 1, 0, None, None)),
        ([agent(vram=16 * GiB), agent("b", vram=8 * GiB)], (2, 0, 0, 2, 50 * GiB, 16 * GiB)),
        ([agent(disk=100 * GiB), agent("b", disk=None)], (2, 0, 0, 2, None, 16 * GiB)),  # b limits nothing yet
        ([agent(ready=False, disk=100 * GiB), agent("b")], (2, 1, 0, 1, 50 * GiB, 16 * GiB)),  # only usable ones count
        ([agent(cordoned=True, vram=80 * GiB), agent("b", vram=None)], (2, 0, 1, 1, 50 * GiB, None)),
        ([], (0, 0, 0, 0, None, None)),
    ]
    for agents, expected in cases:
        f = FleetFacts.of(agents)
        assert (f.agents, f.not_ready, f.cordoned, f.usable, f.max_disk_bytes, f.max_vram_bytes) == expected, agents
    # diagnosing against the sum: the messages of the tests above
    d = diagnose(job(("big", "model")), models=MODELS, agents=FleetFacts.of([agent(disk=50 * GiB)]), now=200.0)
    assert d is not None and d.reason is UnschedulableReason.TOO_LARGE_FOR_ANY_AGENT and "80.0 GiB" in d.message
