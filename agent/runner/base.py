"""The runner interface: what a job asks for, what a runner gets, what it returns.

A runner turns weights that Stoker has already loaded (checkpoint, LoRAs, VAE) plus the
job's generation parameters into one PNG. The job loop depends only on this module;
the built-in diffusers runner and the HTTP (ComfyUI) runner implement `Runner`.

Samplers and schedulers are the API's (`stoker.api.generationjob`): one list, admitted by
the API server, that every runner honours. Model sites and ComfyUI use the same names:

=============  ==================================  ================================
sampler        diffusers scheduler                 ComfyUI ``sampler_name``
=============  ==================================  ================================
euler          EulerDiscreteScheduler              euler
euler_a        EulerAncestralDiscreteScheduler     euler_ancestral
heun           HeunDiscreteScheduler               heun
dpm_2          KDPM2DiscreteScheduler              dpm_2
dpm_2_a        KDPM2AncestralDiscreteScheduler     dpm_2_ancestral
dpmpp_2m       DPMSolverMultistepScheduler         dpmpp_2m
dpmpp_2m_sde   DPMSolverMultistepScheduler (SDE)   dpmpp_2m_sde
lms            LMSDiscreteScheduler                lms
ddim           DDIMScheduler                       ddim
unipc          UniPCMultistepScheduler             uni_pc
deis           DEISMultistepScheduler              deis
lcm            LCMScheduler                        lcm
=============  ==================================  ================================

Schedulers (the noise level/timestep spacing): ``normal`` (the model's default), ``karras``,
``exponential``, ``sgm_uniform`` (trailing timesteps); euler_a, ddim and lcm take only
``normal`` and ``sgm_uniform`` (`SCHEDULES_BY_SAMPLER`). Anything else is refused with
reason ``InvalidParameters`` before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from stoker.api import generationjob

if TYPE_CHECKING:
    import torch

# The API's lists, so a runner can never accept what the API refuses or the other way round.
Sampler = generationjob.Sampler
Schedule = generationjob.NoiseSchedule
SCHEDULES_BY_SAMPLER = generationjob.SCHEDULES_BY_SAMPLER

MAX_SIDE_PX = 4096
MAX_STEPS = 500
MAX_BATCH_SIZE = 8


class Reason(enum.StrEnum):
    """Machine-readable failure reasons; they end up in GenerationJob `status.reason`."""

    UNSUPPORTED_CHECKPOINT = "UnsupportedCheckpoint"
    UNSUPPORTED_LORA = "UnsupportedLora"
    UNSUPPORTED_VAE = "UnsupportedVae"
    INVALID_PARAMETERS = "InvalidParameters"
    INSUFFICIENT_VRAM = "InsufficientVRAM"
    CANCELLED = "Cancelled"
    GENERATION_FAILED = "GenerationFailed"
    BACKEND_UNAVAILABLE = "BackendUnavailable"
    BACKEND_FAILED = "BackendFailed"
    OUTPUT_FAILED = "OutputFailed"


class RunnerError(Exception):
    """Root of every runner failure: `reason` for machines, the message for people.

    `retryable` says whether running the same job elsewhere (or later) may succeed:
    true for VRAM exhaustion and an unreachable backend, false for bad inputs.
    """

    def __init__(self, reason: Reason, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ArtifactKind(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    LORA = "lora"
    VAE = "vae"


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """The generation parameters of one job (GenerationJob `spec.params`)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    sampler: str = "euler"
    scheduler: str = "normal"
    batch_size: int = 1
    clip_skip: int = 1  # 1 = last text-encoder layer, 2 = the one before (model-site convention)


@dataclasses.dataclass(frozen=True)
class LoadedArtifact:
    """One model file whose tensors the loader has already placed (GPU or host memory).

    The runner uses `tensors` in place; it never mutates them. `name` identifies the
    model (its ModelCache name); `sha256` identifies its content, which keys runner caches.
    `path` is the verified file in the disk cache the tensors came from; runners that
    drive a separate server (ComfyUI) use it instead of the tensors, which may be empty.
    """

    name: str
    kind: ArtifactKind
    tensors: Mapping[str, torch.Tensor]
    sha256: str
    weight: float = 1.0  # LoRA strength; ignored for checkpoints and VAEs
    path: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """The finished image: PNG bytes with the generation parameters in text chunks."""

    png: bytes
    width: int
    height: int
    content_type: str = "image/png"
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    build_seconds: float = 0.0
    """Of the runner's time, what building pipeline modules on the weights took (0 when they were built before)."""


class Runner(Protocol):
    """Turns loaded weights plus parameters into an image.

    `on_step(i, n)` is called after denoising step i of n (1-based, n = `request.steps`,
    whatever number of model evaluations the sampler makes). `should_cancel()` is polled
    between steps; when it returns true the runner stops and raises
    `RunnerError(Reason.CANCELLED, ...)`. All failures are `RunnerError`.

    `uses_loaded_weights` is false for a runner that reads the model files itself (a
    separate inference server): the job loop then hands it pinned file paths with empty
    `tensors` and loads nothing into the agent's memory tiers.
    """

    uses_loaded_weights: bool

    def generate(
        self,
        *,
        checkpoint: LoadedArtifact,
        loras: Sequence[LoadedArtifact],
        vae: LoadedArtifact | None,
        request: GenerationRequest,
        on_step: Callable[[int, int], None],
        should_cancel: Callable[[], bool],
    ) -> GeneratedImage: ...


def parse_sampler(name: str) -> Sampler:
    """The sampler named `name`, or `RunnerError(InvalidParameters)` naming the choices."""
    try:
        return Sampler(name.strip().lower())
    except ValueError:
        choices = ", ".join(s.value for s in Sampler)
        raise RunnerError(
            Reason.INVALID_PARAMETERS, f"unknown sampler {name!r}; use one of: {choices}"
        ) from None


def parse_schedule(name: str) -> Schedule:
    """The schedule named `name`, or `RunnerError(InvalidParameters)` naming the choices."""
    try:
        return Schedule(name.strip().lower())
    except ValueError:
        choices = ", ".join(s.value for s in Schedule)
        raise RunnerError(
            Reason.INVALID_PARAMETERS, f"unknown scheduler {name!r}; use one of: {choices}"
        ) from None


def validate_request(request: GenerationRequest) -> list[str]:
    """Every problem with `request` as a sentence; empty when it can run. Pure."""
    problems = []
    for side, value in (("width", request.width), ("height", request.height)):
        if not 8 <= value <= MAX_SIDE_PX or value % 8:
            problems.append(f"{side} {value} must be a multiple of 8 between 8 and {MAX_SIDE_PX}")
    if not 1 <= request.steps <= MAX_STEPS:
        problems.append(f"steps {request.steps} must be between 1 and {MAX_STEPS}")
    if not 1 <= request.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"batch size {request.batch_size} must be between 1 and {MAX_BATCH_SIZE}")
    if not 0.0 <= request.cfg_scale <= 50.0:
        problems.append(f"cfg scale {request.cfg_scale} must be between 0 and 50")
    if not 0 <= request.seed < 2**64:
        problems.append(f"seed {request.seed} must be between 0 and 2**64-1")
    if not 1 <= request.clip_skip <= 12:
        problems.append(f"clip skip {request.clip_skip} must be between 1 and 12")
    return problems


def check_request(request: GenerationRequest) -> tuple[Sampler, Schedule]:
    """Validate `request`; raise one `RunnerError(InvalidParameters)` listing every problem."""
    problems = validate_request(request)
    sampler = schedule = None
    for parse, value in ((parse_sampler, request.sampler), (parse_schedule, request.scheduler)):
        try:
            parsed = parse(value)
        except RunnerError as error:
            problems.append(error.message)
            continue
        if isinstance(parsed, Sampler):
            sampler = parsed
        else:
            schedule = parsed
    if sampler is not None and schedule is not None and schedule not in SCHEDULES_BY_SAMPLER[sampler]:
        allowed = " or ".join(sorted(SCHEDULES_BY_SAMPLER[sampler]))
        problems.append(f"sampler {sampler} runs only with the {allowed} scheduler, not {schedule}")
    if problems or sampler is None or schedule is None:
        raise RunnerError(Reason.INVALID_PARAMETERS, "; ".join(problems))
    return sampler, schedule


def format_parameters(request: GenerationRequest, *, model: str, loras: Sequence[LoadedArtifact] = (),
                      vae: str | None = None, model_hash: str = "") -> str:
    """The `parameters` text chunk in the layout model sites parse (prompt, negative, settings)."""
    sampler, schedule = check_request(request)
    prompt = request.prompt
    for lora in loras:
        prompt += f" <lora:{lora.name}:{lora.weight:g}>"
    settings = [
        f"Steps: {request.steps}",
        f"Sampler: {sampler}",
        f"Schedule type: {schedule}",
        f"CFG scale: {request.cfg_scale:g}",
        f"Seed: {request.seed}",
        f"Size: {request.width}x{request.height}",
    ]
    if model_hash:
        settings.append(f"Model hash: {model_hash[:10]}")
    settings.append(f"Model: {model}")
    if vae:
        settings.append(f"VAE: {vae}")
    if request.clip_skip > 1:
        settings.append(f"Clip skip: {request.clip_skip}")
    if request.batch_size > 1:
        settings.append(f"Batch size: {request.batch_size}")
    lines = [prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(images: Sequence[Any], *, parameters: str) -> GeneratedImage:
    """One PNG of PIL `images` (side by side when a batch has several) with a `parameters` text chunk."""
    from PIL import Image, PngImagePlugin

    width, height = images[0].width, images[0].height
    if len(images) == 1:
        canvas = images[0]
    else:
        canvas = Image.new("RGB", (sum(image.width for image in images), max(image.height for image in images)))
        left = 0
        for image in images:
            canvas.paste(image, (left, 0))
            left += image.width
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", pnginfo=info)
    return GeneratedImage(png=buffer.getvalue(), width=canvas.width, height=canvas.height,
                          metadata={"parameters": parameters})
