"""Runner benchmark: time per image of the built-in diffusers runner.

    .venv/bin/python bench/runner_bench.py              # tiny SD 1.5 / SDXL checkpoints on the CPU
    .venv/bin/python bench/runner_bench.py --real-size  # adds a real-size SD 1.5 architecture on CUDA

The tiny models are the test checkpoints (random weights, real architecture). The real-size
run builds SD 1.5's full architecture (UNet 860M, CLIP ViT-L, VAE) with random fp16 weights
directly on the GPU, in the single-file layout, and times 512x512 at 20 steps; random
weights take the same time as trained ones. Figures are medians of several runs after a
warm-up, written to BENCHMARKS.md (section "runner").
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

if not __package__:  # run as a file: make `bench` importable, behind the standard library
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from bench import report
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact
from stoker.agent.runner.diffusers_runner import DiffusersRunner
from stoker.testing import tiny_models


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


def _job(runner: DiffusersRunner, checkpoint: LoadedArtifact, request: GenerationRequest) -> Callable[[], object]:
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


def real_size_sd15_state(device: torch.device, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """SD 1.5's full architecture in single-file layout with random weights, made on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu"))
    generator = torch.Generator(device).manual_seed(0)

    def fill(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: torch.randn(v.shape, generator=generator, device=device, dtype=dtype) * 0.02
                for k, v in module.state_dict().items() if not k.endswith("position_ids")}

    state = tiny_models.unet_to_ldm(fill(unet), unet.config)
    state |= {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
              for k, v in fill(text).items()}
    state |= tiny_models.vae_to_ldm(fill(vae), levels=4, prefix="first_stage_model.")
    return state


def bench_real_size(*, repeats: int) -> list[str]:
    device = torch.device("cuda")
    state = real_size_sd15_state(device)
    checkpoint = LoadedArtifact(name="sd15-random", kind=ArtifactKind.CHECKPOINT, tensors=state, sha256="sd15")
    size_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    started = time.perf_counter()
    runner = DiffusersRunner(device=device)
    runner._model(checkpoint)
    build_s = time.perf_counter() - started
    request = GenerationRequest(prompt="a lighthouse", width=512, height=512, steps=20, seed=1, sampler="euler")
    median = _median_s(_job(runner, checkpoint, request), repeats=repeats, sync=torch.cuda.synchronize)
    gpu = torch.cuda.get_device_name(device)
    return [f"| SD 1.5 architecture, random fp16 ({size_gb:.1f} GB) | {gpu} | 512x512 | 20 | "
            f"{median * 1000:.0f} ms | {build_s * 1000:.0f} ms |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-size", action="store_true", help="also time a real-size SD 1.5 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tiny models")
    args = parser.parse_args()
    rows = bench_tiny(repeats=args.repeats, threads=args.threads)
    if args.real_size:
        if torch.cuda.is_available():
            rows += bench_real_size(repeats=args.repeats)
        else:
            rows.append("| SD 1.5 architecture (real size) | no CUDA device on this machine | | | not run | |")
    command = ".venv/bin/python bench/runner_bench.py" + (" --real-size" if args.real_size else "")
    markdown = "\n".join([
        "## Runner: time per image (built-in diffusers runner)",
        "",
        f"Command: `{command}`. Machine: {report.describe_machine()}.",
        f"Median of {args.repeats} runs after a warm-up; euler sampler, CFG on (two UNet passes per step), "
        "batch 1, PNG encoding included. \"Build\" is the one-off construction of the pipeline modules from "
        "already loaded tensors (meta device + assign, no weight copies); later jobs on the same model reuse them.",
        "",
        "| model | device | size | steps | time per image | build |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(markdown)
    report.write_section("runner", markdown)


if __name__ == "__main__":
    main()
