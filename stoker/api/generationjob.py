"""GenerationJob: one image generation request."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from stoker.api.base import Condition, ObjectName, Resource, StokerModel

IMMUTABLE_SPEC = {
    "rule": "self == oldSelf",
    "message": "a GenerationJob's spec is immutable: delete the job and create a new one",
}


class JobPhase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class CacheHit(enum.StrEnum):
    VRAM = "vram"
    RAM = "ram"
    DISK = "disk"
    MISS = "miss"


class Sampler(enum.StrEnum):
    """The denoising algorithm, by the names model sites and ComfyUI use."""

    EULER = "euler"
    EULER_A = "euler_a"
    HEUN = "heun"
    DPM_2 = "dpm_2"
    DPM_2_A = "dpm_2_a"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_SDE = "dpmpp_2m_sde"
    LMS = "lms"
    DDIM = "ddim"
    UNIPC = "unipc"
    DEIS = "deis"
    LCM = "lcm"


class NoiseSchedule(enum.StrEnum):
    """How the noise levels of the steps are spaced."""

    NORMAL = "normal"
    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    SGM_UNIFORM = "sgm_uniform"


_ALL_SCHEDULES = frozenset(NoiseSchedule)
_SPACING_ONLY = frozenset({NoiseSchedule.NORMAL, NoiseSchedule.SGM_UNIFORM})

SCHEDULES_BY_SAMPLER: dict[Sampler, frozenset[NoiseSchedule]] = {
    sampler: _SPACING_ONLY if sampler in (Sampler.EULER_A, Sampler.DDIM, Sampler.LCM) else _ALL_SCHEDULES
    for sampler in Sampler
}
"""The schedules each sampler runs with: the one list the API admits and every runner honours.
euler_a, ddim and lcm space timesteps only; they have no karras or exponential noise levels."""


def is_supported(sampler: str, scheduler: str) -> bool:
    """Whether `sampler` can run with `scheduler` (names as in the API). Pure."""
    try:
        return NoiseSchedule(scheduler) in SCHEDULES_BY_SAMPLER[Sampler(sampler)]
    except ValueError:
        return False


def _pair_rule() -> dict[str, str]:
    """The CEL rule refusing a sampler/scheduler pair outside the table (built from it)."""
    groups: dict[frozenset[NoiseSchedule], list[str]] = {}
    for sampler, allowed in SCHEDULES_BY_SAMPLER.items():
        if allowed != _ALL_SCHEDULES:
            groups.setdefault(allowed, []).append(sampler.value)
    clauses = [f"(!(self.sampler in {_cel_list(samplers)}) || self.scheduler in {_cel_list(allowed)})"
               for allowed, samplers in groups.items()]
    messages = [f"{', '.join(sorted(samplers))} run only with {' or '.join(sorted(allowed))}"
                for allowed, samplers in groups.items()]
    return {
        "rule": "!has(self.sampler) || !has(self.scheduler) || " + " && ".join(clauses or ["true"]),
        "fieldPath": ".scheduler",
        "reason": "FieldValueInvalid",
        "message": "this scheduler is not available with this sampler: " + "; ".join(messages),
    }


def _cel_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in sorted(values)) + "]"


class LoraRef(StokerModel):
    """A LoRA applied on top of the checkpoint."""

    name: ObjectName
    """Name of a ModelCache of kind lora in the job's namespace."""
    weight: float = Field(default=1.0, ge=-10, le=10)
    """Strength of the LoRA."""


class GenerationParams(StokerModel):
    """What to generate."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_pair_rule()]})

    prompt: str = Field(min_length=1, max_length=4000)
    """Text prompt."""
    negative_prompt: str = Field(default="", max_length=4000)
    """What the image should not contain."""
    steps: int = Field(default=20, ge=1, le=150)
    """Denoising steps."""
    cfg_scale: float = Field(default=7.0, ge=0, le=30)
    """Classifier-free guidance scale."""
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    """Image width in pixels, a multiple of 8."""
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    """Image height in pixels, a multiple of 8."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Random seed. When absent the agent derives one from the job's uid, so every attempt makes the same image, and records it in status.result.seed; the same seed gives the same image on the same hardware."""
    sampler: Sampler = Sampler.EULER_A
    """Sampler: euler, euler_a (Euler ancestral), heun, dpm_2, dpm_2_a, dpmpp_2m (DPM++ 2M), dpmpp_2m_sde, lms, ddim, unipc, deis or lcm."""
    scheduler: NoiseSchedule = NoiseSchedule.NORMAL
    """Noise schedule: normal (the model's own), karras, exponential or sgm_uniform (trailing timesteps). euler_a, ddim and lcm take only normal or sgm_uniform."""
    batch_size: int = Field(default=1, ge=1, le=8)
    """Images generated in one run; they come back side by side in one PNG."""

    @model_validator(mode="after")
    def _supported_pair(self) -> GenerationParams:
        if not is_supported(self.sampler, self.scheduler):
            raise ValueError(f"scheduler {self.scheduler} is not available with sampler {self.sampler}: "
                             f"{_pair_rule()['message'].split(': ', 1)[1]}")
        return self


class OutputSpec(StokerModel):
    """Where the image goes."""

    url: str | None = Field(default=None, max_length=4096, pattern=r"^https?://[^\s/$.?#][^\s]*$")
    """HTTP PUT target, for example a presigned object-store URL. Its query string is treated as a secret. When absent the image is written to the agent's results volume."""


class GenerationJobSpec(StokerModel):
    """A generation request. Immutable once created."""

    model: ObjectName
    """Name of the checkpoint ModelCache in the job's namespace."""
    loras: list[LoraRef] = Field(default_factory=list, max_length=16)
    """LoRAs to apply, with weights."""
    vae: ObjectName | None = None
    """Name of a ModelCache of kind vae replacing the checkpoint's own VAE."""
    params: GenerationParams
    """Generation parameters."""
    priority: int = Field(default=0, ge=-1000, le=1000)
    """Higher runs first. Waiting raises a job's effective priority so no job starves."""
    max_attempts: int = Field(default=3, ge=1, le=20)
    """Attempts before the job fails, counting retries after an agent vanished or failed."""
    timeout_seconds: int = Field(default=3600, ge=1, le=7 * 86400)
    """The job fails with DeadlineExceeded this long after creation if it has not finished."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the image goes."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=365 * 86400)
    """Delete the job this long after it succeeds or fails. When absent, the operator's default applies (the chart's operator.jobTTLSecondsAfterFinished); kept forever when that is unset too."""
    missing_model_grace_seconds: int | None = Field(default=None, ge=0, le=86400)
    """How long the job waits for a ModelCache it names (model, LoRA or VAE) to be created before it fails with ModelCacheNotFound. Default: the operator's setting (60 s unless changed)."""


class Attempt(StokerModel):
    """One attempt at running the job."""

    attempt: int = Field(ge=1)
    """Attempt number, from 1."""
    agent: str = ""
    """CacheAgent that ran (or was to run) the attempt."""
    outcome: Literal["Succeeded", "Failed", "Requeued", "Cancelled"]
    """How the attempt ended."""
    reason: str = ""
    """Why, in one CamelCase word."""
    message: str = ""
    """Detail."""
    finished_at: str | None = None
    """When the attempt ended (RFC 3339)."""


class Timings(StokerModel):
    """Where the time went, in seconds."""

    queued_seconds: float | None = None
    """From creation to the start of the attempt that succeeded."""
    download_seconds: float | None = None
    """Downloading missing artifacts."""
    slot_wait_seconds: float | None = None
    """Waiting on the agent for a free generation slot (downloads and loads overlap it)."""
    load_seconds: float | None = None
    """Loading weights to the GPU (or host memory)."""
    build_seconds: float | None = None
    """Building the pipeline's modules on the loaded weights: the first job of a checkpoint (or
    VAE) on an agent; near 0 once they are built and kept."""
    inference_seconds: float | None = None
    """Running the pipeline (denoising and decoding)."""
    upload_seconds: float | None = None
    """Delivering the image."""
    total_seconds: float | None = None
    """From creation to finish."""


class Stage(enum.StrEnum):
    """What the bound agent is doing with the current attempt."""

    QUEUED = "Queued"
    """Accepted; waiting for a place among the agent's job and queue slots."""
    DOWNLOADING = "Downloading"
    """Fetching the checkpoint, LoRAs or VAE to the agent's disk."""
    LOADING = "Loading"
    """Loading weights into GPU memory, or waiting for a generation slot with them loaded."""
    GENERATING = "Generating"
    """Denoising and decoding."""
    UPLOADING = "Uploading"
    """Delivering the image."""


class Progress(StokerModel):
    """Progress of the current attempt, written by the bound agent (debounced, about once a second)."""

    step: int = Field(default=0, ge=0)
    """Denoising steps done."""
    steps: int = Field(default=0, ge=0)
    """Denoising steps in all."""
    downloaded_bytes: int | None = Field(default=None, ge=0)
    """Bytes of the job's missing files downloaded so far (stage Downloading)."""
    download_bytes: int | None = Field(default=None, ge=0)
    """Bytes of the job's missing files in all, when known (stage Downloading)."""
    summary: str = Field(default="", max_length=64)
    """The stage and how far it got, for `kubectl get`: Queued, Downloading 42%, Loading, Generating 7/20, Uploading."""


class JobResult(StokerModel):
    """The delivered image."""

    location: str
    """Where the image is: the PUT URL without its query string, or a path on the agent's results volume."""
    sha256: str
    """SHA-256 of the PNG bytes."""
    bytes: int
    """Size of the PNG."""
    content_type: str = "image/png"
    """MIME type."""
    seed: int | None = None
    """Seed used."""


class AttemptFailure(StokerModel):
    """An attempt that failed on its agent in a way another agent might not (written by the agent; the operator decides whether to retry)."""

    attempt: int = Field(ge=1)
    """Attempt that failed."""
    agent: str
    """Agent it failed on."""
    reason: str
    """Why, one CamelCase word (for example InsufficientVRAM, DownloadFailed)."""
    message: str = ""
    """Detail."""
    retryable: bool = True
    """Whether another attempt, elsewhere, may succeed."""


class GenerationJobStatus(StokerModel):
    """Observed state (stoker.api.protocol says who writes each field). The operator writes Pending, requeues, the reasons a job cannot be placed and the failures it decides; the bound agent writes Scheduled when it accepts the attempt, Running, stage, progress, timings, cacheHit, result and Succeeded/Failed for its attempt."""

    phase: JobPhase = JobPhase.PENDING
    """Pending (from creation: waiting for an agent), Scheduled (accepted by an agent, queued there), Running, Succeeded or Failed."""
    stage: Stage | None = None
    """What the bound agent is doing: Queued, Downloading, Loading, Generating or Uploading; absent when no agent has the job."""
    agent: str | None = None
    """CacheAgent the current attempt is bound to."""
    attempt: int = Field(default=0, ge=0)
    """Current attempt number (0 before the first binding)."""
    history: list[Attempt] = Field(default_factory=list, max_length=100)
    """Earlier attempts and how they ended."""
    cache_hit: CacheHit | None = None
    """Tier the checkpoint came from: vram, ram, disk or miss (downloaded)."""
    timings: Timings | None = None
    """Where the time went."""
    progress: Progress | None = None
    """Progress of the current attempt: download bytes, denoising steps, and a summary for kubectl get."""
    result: JobResult | None = None
    """The delivered image."""
    attempt_failure: AttemptFailure | None = None
    """Set by the agent when the current attempt failed; the operator requeues the job or fails it."""
    reason: str | None = None
    """Why the job failed, or why it is not running yet, one CamelCase word (for example ModelCacheNotFound, NoReadyAgent, TooLargeForAnyAgent, AgentLost, AttemptsExhausted, DeadlineExceeded)."""
    message: str | None = None
    """Detail of the reason and what to do."""
    scheduled_at: str | None = None
    """When the current attempt was bound (RFC 3339)."""
    started_at: str | None = None
    """When the current attempt started running."""
    finished_at: str | None = None
    """When the job succeeded or failed."""
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    """Scheduled (an agent accepted the attempt; False with the reason it cannot be placed or was requeued), Running, Succeeded, Failed: `kubectl wait --for=condition=Succeeded gj/NAME`."""


class GenerationJob(Resource):
    """One image generation request, scheduled onto the agent that can start it soonest."""

    kind_name: ClassVar[str] = "GenerationJob"
    plural: ClassVar[str] = "generationjobs"
    short_names: ClassVar[tuple[str, ...]] = ("gj",)
    printer_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
        # Written by the agent's first status write when it accepts the attempt, and kept once the job
        # finished (the binding label, in -o wide, is there from the binding until the job finishes).
        {"name": "Agent", "type": "string", "jsonPath": ".status.agent"},
        {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
        {"name": "Hit", "type": "string", "jsonPath": ".status.cacheHit"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Bound To", "type": "string", "jsonPath": ".metadata.labels.stoker\\.dev/agent", "priority": 1},
        {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority", "priority": 1},
        {"name": "Max Attempts", "type": "integer", "jsonPath": ".spec.maxAttempts", "priority": 1},
        {"name": "Queued", "type": "number", "jsonPath": ".status.timings.queuedSeconds", "priority": 1,
         "description": "seconds from creation to the start of the attempt"},
        {"name": "Download", "type": "number", "jsonPath": ".status.timings.downloadSeconds", "priority": 1},
        {"name": "Load", "type": "number", "jsonPath": ".status.timings.loadSeconds", "priority": 1},
        {"name": "Inference", "type": "number", "jsonPath": ".status.timings.inferenceSeconds", "priority": 1},
        {"name": "Total", "type": "number", "jsonPath": ".status.timings.totalSeconds", "priority": 1},
    )
    status_default: ClassVar[dict[str, Any] | None] = {}
    spec_rules: ClassVar[tuple[dict[str, str], ...]] = (IMMUTABLE_SPEC,)

    kind: Literal["GenerationJob"] = "GenerationJob"
    spec: GenerationJobSpec
    """What to generate and how."""
    status: GenerationJobStatus | None = None
    """Observed state."""
