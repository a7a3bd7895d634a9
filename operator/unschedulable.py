"""Why a pending GenerationJob cannot be placed, like a Pod's FailedScheduling (pure, no I/O).

`diagnose` looks at one pending job against the ModelCaches and agents of its namespace
and names the first thing that keeps it from any agent, in this order:

- ModelCacheNotFound: a ModelCache the job names (model, LoRA, VAE) does not exist.
  Waiting cannot fix that unless someone creates it, so the job fails once it has waited
  its grace (spec.missingModelGraceSeconds, else the operator's default).
- NoReadyAgent: no agent in the namespace is Ready and uncordoned.
- TooLargeForAnyAgent: the job's files, by their known sizes, exceed every Ready agent's
  disk budget.
- InsufficientVRAM: they exceed every Ready agent's GPU memory (where agents report it).
- Unschedulable: the last placement pass found no agent (every one failed the job, or
  models in use leave no room); its message says which.

A size is known when an agent measured it or the ModelCache's spec gives it; a file of
unknown size counts as nothing here and the message says so, so a guess never makes a job
look impossible. A job that merely waits for a busy agent has no diagnosis: queueing is
normal and costs no write.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stoker.units import format_bytes

__all__ = ["AgentFacts", "Diagnosis", "FleetFacts", "JobFacts", "ModelFacts", "UnschedulableReason", "diagnose"]


class UnschedulableReason(enum.StrEnum):
    MODEL_CACHE_NOT_FOUND = "ModelCacheNotFound"
    NO_READY_AGENT = "NoReadyAgent"
    TOO_LARGE_FOR_ANY_AGENT = "TooLargeForAnyAgent"
    INSUFFICIENT_VRAM = "InsufficientVRAM"
    UNSCHEDULABLE = "Unschedulable"


@dataclass(frozen=True, slots=True)
class JobFacts:
    key: str
    created_at: float
    artifacts: tuple[tuple[str, str], ...]
    """(ModelCache name, role: model, lora or vae), checkpoint first."""
    missing_grace_s: float
    """How long after creation a missing ModelCache fails the job."""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    name: str
    size_bytes: int | None
    """Measured by an agent or given in spec; None while unknown."""


@dataclass(frozen=True, slots=True)
class AgentFacts:
    name: str
    ready: bool
    cordoned: bool
    disk_budget_bytes: int | None
    """None: not reported yet (does not limit)."""
    vram_bytes: int | None
    """GPU memory for loaded models; None or 0: unknown (does not limit)."""


@dataclass(frozen=True, slots=True)
class FleetFacts:
    """What `diagnose` needs of a namespace's agents, the same for every job: summed once per pass
    (`of`), so that diagnosing each of many pending jobs does not walk every agent again."""

    agents: int
    not_ready: int
    cordoned: int
    """Ready but cordoned."""
    usable: int
    """Ready and not cordoned."""
    max_disk_bytes: int | None
    """The largest disk budget of the usable agents, when every one of them reports one."""
    max_vram_bytes: int | None
    """The largest GPU memory of the usable agents, when every one of them reports it."""

    @classmethod
    def of(cls, agents: Sequence[AgentFacts]) -> FleetFacts:
        usable = [a for a in agents if a.ready and not a.cordoned]
        disks = [a.disk_budget_bytes for a in usable if a.disk_budget_bytes]
        vrams = [a.vram_bytes for a in usable if a.vram_bytes]
        return cls(agents=len(agents), not_ready=sum(1 for a in agents if not a.ready),
                   cordoned=sum(1 for a in agents if a.ready and a.cordoned), usable=len(usable),
                   max_disk_bytes=max(disks) if disks and len(disks) == len(usable) else None,
                   max_vram_bytes=max(vrams) if vrams and len(vrams) == len(usable) else None)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    reason: UnschedulableReason
    message: str
    fail: bool = False
    """Waiting will not help: fail the job now."""


def _size(n: int) -> str:
    return format_bytes(n)


def diagnose(job: JobFacts, *, models: Mapping[str, ModelFacts], agents: Sequence[AgentFacts] | FleetFacts,
             now: float, placement_message: str | None = None) -> Diagnosis | None:
    """The reason `job` cannot be placed now, or None when it can (or only waits for a free agent).
    Pass `FleetFacts.of(agents)` when diagnosing many jobs against the same agents."""
    fleet = agents if isinstance(agents, FleetFacts) else FleetFacts.of(agents)
    missing = [(name, role) for name, role in job.artifacts if name not in models]
    if missing:
        names = ", ".join(f"{role} {name}" for name, role in missing)
        waited = now - job.created_at
        fail = waited >= job.missing_grace_s
        message = (f"ModelCache not found: {names}; create it (kubectl apply) or fix the job's spec. "
                   + ("The job waited {:.0f}s for it and fails.".format(waited) if fail else
                      f"The job fails if it is still missing {job.missing_grace_s:.0f}s after the job's creation "
                      "(spec.missingModelGraceSeconds)."))
        return Diagnosis(UnschedulableReason.MODEL_CACHE_NOT_FOUND, message, fail=fail)
    if not fleet.usable:
        return Diagnosis(UnschedulableReason.NO_READY_AGENT,
                         f"0/{fleet.agents} agents are available: {fleet.not_ready} not Ready, {fleet.cordoned} "
                         "cordoned; the job waits for an agent to become Ready (check the agent pods, or uncordon one)")
    known = [(name, models[name].size_bytes) for name, _ in job.artifacts if models[name].size_bytes]
    unknown = [name for name, _ in job.artifacts if not models[name].size_bytes]
    total = sum(size for _, size in known)
    note = (f" ({', '.join(unknown)}: size unknown until an agent downloads it, not counted)" if unknown else "")
    if known and fleet.max_disk_bytes is not None and total > fleet.max_disk_bytes:
        return Diagnosis(UnschedulableReason.TOO_LARGE_FOR_ANY_AGENT,
                         f"0/{fleet.usable} Ready agents can hold {_size(total)} of files{note}: the largest disk "
                         f"budget is {_size(fleet.max_disk_bytes)}; add an agent with a larger agent.cache.budget")
    if known and fleet.max_vram_bytes is not None and total > fleet.max_vram_bytes:
        return Diagnosis(UnschedulableReason.INSUFFICIENT_VRAM,
                         f"0/{fleet.usable} Ready agents have {_size(total)} of GPU memory for the job's weights{note}: "
                         f"the most any has is {_size(fleet.max_vram_bytes)}; add an agent with a larger GPU")
    if placement_message:
        return Diagnosis(UnschedulableReason.UNSCHEDULABLE, placement_message + note)
    return None
