"""Runner benchmark: time per image of the built-in diffusers runner.

    .venv/bin/python bench/runner_bench.py              # tiny SD 1.5 / SDXL checkpoints on the CPU
    .venv/bin/python bench/runner_bench.py --real-size  # real-size SD 1.5 and SDXL on CUDA, from files

The tiny models are the test checkpoints (random weights, real architecture), timed from
tensors in memory (section "runner").

``--real-size`` measures what a job on a fresh agent pays, stage by stage, for each
family's full architecture with random fp16 weights (SD 1.5: UNet 860M, CLIP ViT-L, VAE;
SDXL base: UNet 2.6B, CLIP ViT-L and OpenCLIP ViT-bigG, VAE): the weights are made on the
device, written as one single-file safetensors checkpoint, loaded from that file (in the
page cache, as after a download) through Stoker's loader, then the pipeline is built and
images are timed at 512x512 and 1024x1024, 20 steps (each family's native size first,
then the other while the time budget lasts). Random weights take the same time as trained
ones. ``--architecture tiny --device cpu`` runs the same stages with the tiny architectures
(the dry run of bench/gpu_check.sh). Section "runner-real-size", or ``--json`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

if not __package__:  # run as a file: make `bench` importable, behind the standard library
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from bench import report
from stoker.agent import loader as stoker_loader
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact
from stoker.agent.runner.diffusers_runner import DiffusersRunner, Family, family_defaults
from stoker.testing import tiny_models

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE = "a lighthouse at dusk, oil painting", "blurry"


def _median_s(run: Callable[[], object], *, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    run()  # warm-up: builds and caches the pipeline modules
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _job(runner: DiffusersRunner, checkpoint: LoadedArtifact, request: GenerationRequest) -> Callable[[], Any]:
    return lambda: runner.generate(checkpoint=checkpoint, loras=[], vae=None, request=request,
                                   on_step=lambda i, n: None, should_cancel=lambda: False)


def bench_tiny(*, repeats: int, threads: int) -> list[str]:
    torch.set_num_threads(threads)
    rows = []
    for family, state in (("SD 1.5", tiny_models.tiny_sd15_state()), ("SDXL", tiny_models.tiny_sdxl_state())):
        checkpoint = LoadedArtifact(name=f"tiny-{family}", kind=ArtifactKind.CHECKPOINT, tensors=state,
                                    sha256=family)
        size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
        started = time.perf_counter()
        runner = DiffusersRunner(device="cpu")
        runner._model(checkpoint)  # cold build: meta construction + assign of the loaded tensors
        build_s = time.perf_counter() - started
        for width, steps in ((64, 4), (256, 20)):
            request = GenerationRequest(prompt="a lighthouse", width=width, height=width, steps=steps, seed=1)
            median = _median_s(_job(runner, checkpoint, request), repeats=repeats)
            rows.append(f"| tiny {family} ({size_mb:.0f} MB) | cpu, {threads} thread(s) | {width}x{width} | "
                        f"{steps} | {median * 1000:.0f} ms | {build_s * 1000:.0f} ms |")
    return rows


# ----------------------------------------------------------------------------- real-size architectures


def real_size_modules(family: Family) -> dict[str, torch.nn.Module]:
    """The family's full architecture on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(hidden: int, layers: int, act: str, *, projection: bool = False) -> torch.nn.Module:
        config = CLIPTextConfig(vocab_size=tiny_models.CLIP_VOCAB_SIZE, hidden_size=hidden,
                                intermediate_size=4 * hidden, num_hidden_layers=layers,
                                num_attention_heads=hidden // 64, max_position_embeddings=tiny_models.CLIP_MAX_TOKENS,
                                hidden_act=act, projection_dim=hidden)  # fmt: skip
        return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = clip(768, 12, "quick_gelu")  # CLIP ViT-L/14, in both families
        if family is Family.SD15:
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            return {"unet": unet, "vae": vae, "text": text}
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        text2 = clip(1280, 32, "gelu", projection=True)  # OpenCLIP ViT-bigG/14
    return {"unet": unet, "vae": vae, "text": text, "text2": text2}


def random_state(shapes: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of `shapes`' shapes on `device`: norm scales (the only 1-D weights) 1, the rest N(0, 0.02)."""
    generator = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, like in sorted(shapes.items()):
        if like.ndim == 1 and name.endswith(".weight"):
            out[name] = torch.ones(like.shape, device=device, dtype=dtype)
        else:
            out[name] = torch.randn(like.shape, generator=generator, device=device, dtype=dtype).mul_(0.02)
    return out


def checkpoint_state(family: Family, *, architecture: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's tensors: the real-size architecture (random) or the tiny test one."""
    if architecture == "tiny":
        state = tiny_models.tiny_sd15_state() if family is Family.SD15 else tiny_models.tiny_sdxl_state()
        return {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    modules = real_size_modules(family)
    shapes = tiny_models.ldm_state(unet=modules["unet"], vae=modules["vae"], text=modules["text"],
                                   text2=modules.get("text2"))  # fmt: skip
    return random_state(shapes, device=device, dtype=dtype)


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    """Stream `tensors` (on any device) into a safetensors file, one tensor in host memory at a time.

    safetensors' save_file first copies every tensor into Python bytes: twice the checkpoint
    (14 GB for SDXL) in host memory at once.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    partial.replace(path)


# ----------------------------------------------------------------------------- timed stages


@dataclasses.dataclass
class ImageFigures:
    width: int
    steps: int
    first_s: float | None = None
    """The first image at this size (warm-up: kernel selection, and the build for the model's first image)."""
    runs_s: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    skipped: str | None = None
    """Why it was not run (time budget, the model failed before): not a failure of this image."""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.runs_s) if self.runs_s else None


@dataclasses.dataclass
class ModelFigures:
    family: str
    architecture: str
    params: int = 0
    file_bytes: int = 0
    make_s: float | None = None
    write_s: float | None = None
    load_s: float | None = None
    load_method: str = ""
    build_s: float | None = None
    """Building the pipeline modules on the loaded tensors (the model's first job pays it)."""
    images: list[ImageFigures] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def load_gbps(self) -> float | None:
        return self.file_bytes / self.load_s / 1e9 if self.load_s and self.file_bytes else None


class Budget:
    """A deadline for optional work, also ended early by SIGTERM (the caller's stage timeout)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = time.monotonic() + seconds if seconds else None
        self.stopped: str | None = None
        self.terminated = False

    def __enter__(self) -> Budget:
        self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_term(self, *_: object) -> None:
        self.stopped = "stopped by SIGTERM (stage timeout)"
        self.terminated = True

    def exhausted(self) -> bool:
        if self.stopped is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = "time budget spent"
        return self.stopped is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip()[:300]}"


def bench_from_files(*, architecture: str, device: torch.device, dtype: torch.dtype, sizes: list[int], steps: int,
                     repeats: int, work_dir: pathlib.Path, budget: Budget,
                     on_progress: Callable[[list[ModelFigures]], None] = lambda _: None) -> list[ModelFigures]:  # fmt: skip
    """Make, write, load (Stoker's loader) and build each family, then time images, native sizes first.

    Native sizes run unless the caller's timeout has fired; the others only while the budget
    lasts. `on_progress` gets the figures after every model and image, so a run killed at its
    timeout still leaves what it measured.
    """
    runner = DiffusersRunner(device=device, max_cached_models=len(Family))
    loader = stoker_loader.Loader()
    if device.type == "cuda":
        loader.prepare(device)
    runner.prepare()  # imports and tokenizers: an agent does this once at start
    loaded: dict[Family, LoadedArtifact] = {}
    figures: dict[Family, ModelFigures] = {}
    for family in Family:
        fig = figures[family] = ModelFigures(family=family.value, architecture=architecture)
        native = family_defaults(family)["vae"]["sample_size"]
        ordered = sorted(sizes, key=lambda s: (s != native, sizes.index(s)))
        fig.images = [ImageFigures(width=s, steps=steps) for s in ordered]
        path = work_dir / f"{family.value}-{architecture}.safetensors"
        try:
            t0 = time.perf_counter()
            state = checkpoint_state(family, architecture=architecture, device=device, dtype=dtype)
            _sync(device)
            fig.make_s = time.perf_counter() - t0
            fig.params = sum(t.numel() for t in state.values())
            t0 = time.perf_counter()
            write_safetensors(path, state)
            fig.write_s = time.perf_counter() - t0
            del state
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _sync(device)
            t0 = time.perf_counter()
            model = loader.load(path, device=device)
            _sync(device)
            fig.load_s, fig.load_method, fig.file_bytes = time.perf_counter() - t0, model.method, model.size_bytes
            loaded[family] = LoadedArtifact(name=f"{family.value}-random", kind=ArtifactKind.CHECKPOINT,
                                            tensors=model.tensors, sha256=f"random-{family.value}-{architecture}",
                                            path=path)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - a failing stage is a figure too
            fig.error = f"making or loading the checkpoint failed: {_error(err)}"
        finally:
            path.unlink(missing_ok=True)  # the loaded tensors no longer need the file
        on_progress(list(figures.values()))
    for native_pass in (True, False):
        for family, checkpoint in loaded.items():
            fig = figures[family]
            for image in fig.images[:1] if native_pass else fig.images[1:]:
                _time_image(runner, checkpoint, image, fig, device=device, repeats=repeats, budget=budget,
                            optional=not native_pass)  # fmt: skip
                on_progress(list(figures.values()))
    return [figures[f] for f in Family]


def _time_image(runner: DiffusersRunner, checkpoint: LoadedArtifact, image: ImageFigures, fig: ModelFigures, *,
                device: torch.device, repeats: int, budget: Budget, optional: bool) -> None:  # fmt: skip
    if image is not fig.images[0] and fig.images[0].error:
        image.skipped = "not run: the model's first image failed"
        return
    if budget.exhausted() and (optional or budget.terminated):
        image.skipped = f"not run: {budget.stopped}"
        return
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=image.width, height=image.width,
                                steps=image.steps, seed=1, sampler="euler")  # fmt: skip
    job = _job(runner, checkpoint, request)
    try:
        t0 = time.perf_counter()
        result = job()
        _sync(device)
        image.first_s = time.perf_counter() - t0
        if fig.build_s is None:
            fig.build_s = result.build_seconds
        for _ in range(repeats):
            if image.runs_s and budget.exhausted():
                break
            t0 = time.perf_counter()
            job()
            _sync(device)
            image.runs_s.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001
        image.error = f"generation failed: {_error(err)}"


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds is not None else "-"


def _s(seconds: float | None) -> str:
    return f"{seconds:.2f} s" if seconds is not None else "-"


def render_files(models: list[ModelFigures], *, device_name: str, command: str, repeats: int,
                 stopped: str | None) -> str:  # fmt: skip
    lines = [
        f"## Runner: real-size architectures from files ({device_name})",
        "",
        f"Command: `{command}`. Machine: {report.describe_machine()}; torch {torch.__version__}.",
        "Per family: random weights made on the device, written as one single-file checkpoint, loaded from the "
        "page cache by Stoker's loader, pipeline modules built on the loaded tensors (meta device + assign). Then "
        f"per size: a first image (warm-up), then the median of up to {repeats} more; euler sampler, CFG on, "
        "batch 1, PNG encoding included. Native size first, the other while the time budget lasted.",
        "",
        "| model | params | file | write | load (Stoker) | build | size | steps | first image | time per image |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for m in models:
        name = f"{'SD 1.5' if m.family == 'sd15' else 'SDXL'} ({m.architecture})"
        load = f"{_s(m.load_s)} ({m.load_gbps:.2f} GB/s, {m.load_method})" if m.load_gbps else _s(m.load_s)
        head = (f"| {name} | {m.params / 1e6:.0f} M | {m.file_bytes / 1e9:.2f} GB | {_s(m.write_s)} | {load} | "
                f"{_s(m.build_s)} |")
        if m.error:
            lines.append(f"{head} - | - | - | {m.error} |")
            continue
        for image in m.images:
            figure = image.error or image.skipped or f"{_ms(image.median_s)} ({len(image.runs_s)} runs)"
            lines.append(f"{head} {image.width}x{image.width} | {image.steps} | {_ms(image.first_s)} | {figure} |")
            head = "| | | | | | |"
    if stopped:
        lines += ["", f"Stopped early: {stopped}."]
    return "\n".join(lines) + "\n"


def figures_json(models: list[ModelFigures]) -> list[dict[str, Any]]:
    out = []
    for m in models:
        d = dataclasses.asdict(m)
        d["load_gbps"] = m.load_gbps
        d["images"] = [dict(dataclasses.asdict(i), median_s=i.median_s) for i in m.images]
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-size", action="store_true",
                        help="real-size SD 1.5 and SDXL from files through the loader (default: tiny models on the CPU)")
    parser.add_argument("--architecture", choices=["real", "tiny"], default="real",
                        help="with --real-size: the architectures to build (tiny: the CPU dry run)")
    parser.add_argument("--device", default=None, help="with --real-size: cuda (default) or cpu")
    parser.add_argument("--sizes", default="512,1024", help="with --real-size: square image sizes (default 512,1024)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5; 3 with --real-size)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="with --real-size: weight dtype (default float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on the CPU")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to write the checkpoints (default .cache/runner-bench)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; optional images are skipped once spent")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures as JSON here")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    command = "PYTHONSAFEPATH=1 .venv/bin/python bench/runner_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.real_size:
        repeats = args.repeats or 5
        rows = bench_tiny(repeats=repeats, threads=args.threads)
        markdown = "\n".join([
            "## Runner: time per image (built-in diffusers runner)",
            "",
            f"Command: `{command.strip()}`. Machine: {report.describe_machine()}.",
            f"Median of {repeats} runs after a warm-up; euler sampler, CFG on (two UNet passes per step), "
            "batch 1, PNG encoding included. \"Build\" is the one-off construction of the pipeline modules from "
            "already loaded tensors (meta device + assign, no weight copies); later jobs on the same model reuse them.",
            "",
            "| model | device | size | steps | time per image | build |",
            "|---|---|---|---|---|---|",
            *rows,
        ])  # fmt: skip
        print(markdown)
        if not args.no_write:
            report.write_section("runner", markdown)
        return 0

    budget = Budget(args.time_budget)
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (use --device cpu --architecture tiny for a dry run)")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else 3
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    base = args.dir or REPO / ".cache" / "runner-bench"
    base.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="run-", dir=base))

    def write_json(models: list[ModelFigures], *, final: bool = False) -> str:
        markdown = render_files(models, device_name=device_name, command=command.strip(), repeats=repeats,
                                stopped=budget.stopped)  # fmt: skip
        if args.json:
            tmp = args.json.with_suffix(".partial")
            tmp.write_text(json.dumps({
                "device": str(device), "device_name": device_name, "architecture": args.architecture,
                "steps": args.steps, "sizes": sizes, "repeats": repeats, "torch": torch.__version__,
                "complete": final, "stopped_early": budget.stopped, "models": figures_json(models),
                "markdown": markdown,
            }, indent=2))  # fmt: skip
            tmp.replace(args.json)
        return markdown

    try:
        dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
        with budget:
            models = bench_from_files(architecture=args.architecture, device=device, dtype=dtype, sizes=sizes,
                                      steps=args.steps, repeats=repeats, work_dir=work, budget=budget,
                                      on_progress=write_json)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    markdown = write_json(models, final=True)
    print(markdown)
    if not args.no_write:
        report.write_section("runner-real-size", markdown)
    return 0 if all(m.error is None and all(i.error is None for i in m.images) for m in models) else 1


if __name__ == "__main__":
    raise SystemExit(main())
