"""The built-in runner runs the real denoising loop on tiny single-file checkpoints on the CPU."""

from __future__ import annotations

import io
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from stoker.agent.runner import base, diffusers_runner
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact, Reason, RunnerError
from stoker.agent.runner.diffusers_runner import DiffusersRunner, Family
from stoker.api import generationjob
from stoker.testing import tiny_models

pytestmark = pytest.mark.timeout(600)

REQUEST = GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=2, width=64, height=48,
                            seed=7, sampler="euler", cfg_scale=5.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from threads, and OpenMP spinning on a busy 2-core machine costs 100x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _artifact(path: pathlib.Path, kind: ArtifactKind, *, weight: float = 1.0) -> LoadedArtifact:
    return LoadedArtifact(name=path.stem, kind=kind, tensors=load_file(str(path)), sha256=f"sha-{path.stem}",
                          weight=weight)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "sd15": tiny_models.write_tiny_sd15(folder / "tiny-sd15.safetensors", seed=0),
        "sdxl": tiny_models.write_tiny_sdxl(folder / "tiny-sdxl.safetensors", seed=0),
        "lora": tiny_models.write_tiny_lora(folder / "tiny-lora.safetensors", base="sd15", seed=1),
        "lora_xl": tiny_models.write_tiny_lora(folder / "tiny-lora-xl.safetensors", base="sdxl", seed=1),
        "vae": tiny_models.write_tiny_vae(folder / "tiny-vae.safetensors", seed=3),
    }


@pytest.fixture(scope="module")
def checkpoint(files: dict[str, pathlib.Path]) -> LoadedArtifact:
    return _artifact(files["sd15"], ArtifactKind.CHECKPOINT)


@pytest.fixture(scope="module")
def runner() -> DiffusersRunner:
    return DiffusersRunner(device="cpu")


def _pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


def _generate(runner: DiffusersRunner, checkpoint: LoadedArtifact, *, loras=(), vae=None,
              request: GenerationRequest = REQUEST, on_step=lambda i, n: None, should_cancel=lambda: False):
    return runner.generate(checkpoint=checkpoint, loras=list(loras), vae=vae, request=request, on_step=on_step,
                           should_cancel=should_cancel)


@pytest.fixture(scope="module")
def plain(runner: DiffusersRunner, checkpoint: LoadedArtifact) -> base.GeneratedImage:
    return _generate(runner, checkpoint)


def test_a_tiny_sd15_checkpoint_becomes_a_png_of_the_requested_size(plain: base.GeneratedImage) -> None:
    image = Image.open(io.BytesIO(plain.png))
    assert image.format == "PNG"
    assert image.size == (64, 48) == (plain.width, plain.height)
    assert plain.content_type == "image/png"


def test_the_png_carries_the_generation_parameters_as_text(plain: base.GeneratedImage) -> None:
    text = Image.open(io.BytesIO(plain.png)).text["parameters"]
    assert text.startswith("a lighthouse at dusk\nNegative prompt: blurry\n")
    assert "Steps: 2, Sampler: euler" in text and "Seed: 7" in text and "Size: 64x48" in text
    assert plain.metadata["parameters"] == text


def test_the_same_seed_gives_the_same_bytes_even_from_a_fresh_runner(
    plain: base.GeneratedImage, checkpoint: LoadedArtifact, runner: DiffusersRunner
) -> None:
    assert _generate(runner, checkpoint).png == plain.png
    assert _generate(DiffusersRunner(device="cpu"), checkpoint).png == plain.png


def test_a_different_seed_gives_different_bytes(plain, runner, checkpoint) -> None:
    other = _generate(runner, checkpoint, request=GenerationRequest(**{**REQUEST.__dict__, "seed": 8}))
    assert other.png != plain.png


def test_repeated_jobs_reuse_the_built_pipeline(runner: DiffusersRunner, checkpoint: LoadedArtifact) -> None:
    _generate(runner, checkpoint)
    builds = runner.builds
    _generate(runner, checkpoint)
    assert runner.builds == builds


def test_the_time_spent_building_modules_is_reported_apart_and_only_when_they_are_built(
        checkpoint: LoadedArtifact, monkeypatch: pytest.MonkeyPatch) -> None:
    from stoker.agent.runner import diffusers_runner

    now = [0.0]  # a clock that only building a UNet moves (by 5 s)
    real_build_unet = diffusers_runner.build_unet

    def slow_build_unet(*args, **kwargs):  # type: ignore[no-untyped-def]
        now[0] += 5.0
        return real_build_unet(*args, **kwargs)

    monkeypatch.setattr(diffusers_runner, "build_unet", slow_build_unet)
    fresh = DiffusersRunner(device="cpu", clock=lambda: now[0])
    first, second = _generate(fresh, checkpoint), _generate(fresh, checkpoint)
    assert fresh.builds == 1
    assert (first.build_seconds, second.build_seconds) == (5.0, 0.0)


def test_the_modules_use_the_loaded_tensors_in_place(runner: DiffusersRunner, checkpoint: LoadedArtifact) -> None:
    _generate(runner, checkpoint)
    storages = {t.untyped_storage().data_ptr() for t in checkpoint.tensors.values()}
    model = runner._models[checkpoint.sha256]
    for component in ("unet", "text_encoder", "vae"):
        parameters = list(model.modules[component].parameters())
        assert parameters
        assert all(p.untyped_storage().data_ptr() in storages for p in parameters), component


def test_progress_is_reported_after_every_denoising_step(runner, checkpoint) -> None:
    steps: list[tuple[int, int]] = []
    _generate(runner, checkpoint, request=GenerationRequest(**{**REQUEST.__dict__, "steps": 3}),
              on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_cancellation_stops_between_steps_and_leaves_the_runner_usable(runner, checkpoint, plain) -> None:
    steps: list[int] = []
    with pytest.raises(RunnerError) as caught:
        _generate(runner, checkpoint, request=GenerationRequest(**{**REQUEST.__dict__, "steps": 4}),
                  on_step=lambda i, n: steps.append(i), should_cancel=lambda: bool(steps))
    assert caught.value.reason is Reason.CANCELLED
    assert steps == [1]
    assert _generate(runner, checkpoint).png == plain.png


def test_a_job_cancelled_before_it_starts_runs_no_step(runner, checkpoint) -> None:
    steps: list[int] = []
    with pytest.raises(RunnerError) as caught:
        _generate(runner, checkpoint, on_step=lambda i, n: steps.append(i), should_cancel=lambda: True)
    assert caught.value.reason is Reason.CANCELLED
    assert steps == []


def test_an_unknown_sampler_is_refused_with_the_list_of_choices(runner, checkpoint) -> None:
    steps: list[int] = []
    with pytest.raises(RunnerError) as caught:
        _generate(runner, checkpoint, request=GenerationRequest(**{**REQUEST.__dict__, "sampler": "warp_drive"}),
                  on_step=lambda i, n: steps.append(i))
    assert caught.value.reason is Reason.INVALID_PARAMETERS
    assert "warp_drive" in str(caught.value) and "dpmpp_2m" in str(caught.value)
    assert steps == []


@pytest.mark.parametrize(("sampler", "scheduler"), [("euler_a", "normal"), ("dpmpp_2m", "karras"),
                                                    ("ddim", "normal"), ("unipc", "sgm_uniform")])
def test_documented_samplers_run(runner, checkpoint, sampler: str, scheduler: str) -> None:
    request = GenerationRequest(**{**REQUEST.__dict__, "sampler": sampler, "scheduler": scheduler})
    assert _generate(runner, checkpoint, request=request).width == 64


def test_a_lora_changes_the_image_and_is_gone_after_the_job(runner, checkpoint, files, plain) -> None:
    lora = _artifact(files["lora"], ArtifactKind.LORA, weight=0.8)
    with_lora = _generate(runner, checkpoint, loras=[lora])
    assert with_lora.png != plain.png
    assert "<lora:tiny-lora:0.8>" in with_lora.metadata["parameters"]
    assert _generate(runner, checkpoint).png == plain.png


def test_a_lora_at_weight_zero_leaves_the_image_unchanged(runner, checkpoint, files, plain) -> None:
    lora = _artifact(files["lora"], ArtifactKind.LORA, weight=0.0)
    image = _generate(runner, checkpoint, loras=[lora])
    assert _pixels(image.png) == _pixels(plain.png)


def test_a_diffusers_format_lora_acts_like_the_same_kohya_lora(runner, checkpoint) -> None:
    generator = torch.Generator().manual_seed(3)
    rank, kohya, peft = 2, {}, {}
    for layer in range(tiny_models.TINY_TEXT_LAYERS):
        down = torch.randn((rank, tiny_models.TINY_TEXT_HIDDEN), generator=generator)
        up = torch.randn((tiny_models.TINY_TEXT_HIDDEN, rank), generator=generator)
        name = f"text_model.encoder.layers.{layer}.self_attn.q_proj"
        kohya |= {f"lora_te_{name.replace('.', '_')}.lora_down.weight": down,
                  f"lora_te_{name.replace('.', '_')}.lora_up.weight": up,
                  f"lora_te_{name.replace('.', '_')}.alpha": torch.tensor(float(rank))}
        peft |= {f"text_encoder.{name}.lora_A.weight": down, f"text_encoder.{name}.lora_B.weight": up}
    as_kohya = LoadedArtifact(name="k", kind=ArtifactKind.LORA, tensors=kohya, sha256="k")
    as_peft = LoadedArtifact(name="k", kind=ArtifactKind.LORA, tensors=peft, sha256="p")
    assert _generate(runner, checkpoint, loras=[as_kohya]).png == _generate(runner, checkpoint, loras=[as_peft]).png


def test_kohya_unet_names_in_ldm_and_diffusers_spelling_hit_the_same_layers(runner, checkpoint, files) -> None:
    ldm_named = load_file(str(files["lora"]))
    _generate(runner, checkpoint)
    table = runner._models[checkpoint.sha256].lora_targets["unet"]
    diffusers_name = {}
    for name, module in table.items():
        if name.startswith(("down_blocks", "mid_block", "up_blocks")):
            diffusers_name[id(module)] = name
    renamed = {}
    for key, tensor in ldm_named.items():
        module_name, _, part = key.partition(".")
        if module_name.startswith("lora_unet_"):
            module_name = "lora_unet_" + diffusers_name[id(table[module_name.removeprefix("lora_unet_")])]
        renamed[f"{module_name}.{part}"] = tensor
    assert set(renamed) != set(ldm_named)
    as_ldm = LoadedArtifact(name="l", kind=ArtifactKind.LORA, tensors=ldm_named, sha256="l")
    as_diffusers = LoadedArtifact(name="l", kind=ArtifactKind.LORA, tensors=renamed, sha256="d")
    assert _generate(runner, checkpoint, loras=[as_ldm]).png == _generate(runner, checkpoint, loras=[as_diffusers]).png


def test_a_lora_for_another_base_model_is_refused(runner, checkpoint, files) -> None:
    with pytest.raises(RunnerError) as caught:
        _generate(runner, checkpoint, loras=[_artifact(files["lora_xl"], ArtifactKind.LORA)])
    assert caught.value.reason is Reason.UNSUPPORTED_LORA


def test_a_vae_override_changes_the_image(runner, checkpoint, files, plain) -> None:
    vae = _artifact(files["vae"], ArtifactKind.VAE)
    with_vae = _generate(runner, checkpoint, vae=vae)
    assert with_vae.png != plain.png
    assert "VAE: tiny-vae" in with_vae.metadata["parameters"]
    assert _generate(runner, checkpoint).png == plain.png


def test_a_vae_in_diffusers_layout_gives_the_same_image_as_in_ldm_layout(runner, checkpoint, files, tmp_path) -> None:
    as_diffusers = tiny_models.write_tiny_vae_diffusers(tmp_path / "tiny-vae-diffusers.safetensors", seed=3)
    from_ldm = _generate(runner, checkpoint, vae=_artifact(files["vae"], ArtifactKind.VAE))
    from_diffusers = _generate(runner, checkpoint, vae=_artifact(as_diffusers, ArtifactKind.VAE))
    assert _pixels(from_ldm.png) == _pixels(from_diffusers.png)


def test_a_batch_comes_back_as_one_strip_of_images(runner, checkpoint) -> None:
    request = GenerationRequest(**{**REQUEST.__dict__, "batch_size": 2})
    image = _generate(runner, checkpoint, request=request)
    assert (image.width, image.height) == (128, 48)


def test_a_tiny_sdxl_checkpoint_with_its_lora_generates(runner, files) -> None:
    checkpoint = _artifact(files["sdxl"], ArtifactKind.CHECKPOINT)
    plain = _generate(runner, checkpoint)
    assert Image.open(io.BytesIO(plain.png)).size == (64, 48)
    lora = _artifact(files["lora_xl"], ArtifactKind.LORA)
    assert _generate(runner, checkpoint, loras=[lora]).png != plain.png


def test_a_file_that_is_not_a_checkpoint_is_refused(runner, files) -> None:
    not_a_checkpoint = _artifact(files["vae"], ArtifactKind.CHECKPOINT)
    with pytest.raises(RunnerError) as caught:
        _generate(runner, not_a_checkpoint)
    assert caught.value.reason is Reason.UNSUPPORTED_CHECKPOINT


def test_the_tiny_model_files_are_the_same_bytes_for_the_same_seed(tmp_path: pathlib.Path, files) -> None:
    again = tiny_models.write_tiny_sd15(tmp_path / "again.safetensors", seed=0)
    assert again.read_bytes() == files["sd15"].read_bytes()


def test_families_are_told_apart_by_their_keys(files) -> None:
    assert diffusers_runner.detect_family(load_file(str(files["sd15"]))) is Family.SD15
    assert diffusers_runner.detect_family(load_file(str(files["sdxl"]))) is Family.SDXL
    with pytest.raises(RunnerError, match="SD 2.x"):
        diffusers_runner.detect_family(["model.diffusion_model.x", "cond_stage_model.model.ln_final.weight"])


def test_the_clip_vocabulary_matches_the_published_token_ids() -> None:
    tokenizer = diffusers_runner.clip_tokenizer("<|endoftext|>", 77)
    # Ids of the openai/clip-vit-large-patch14 tokenizer for this phrase.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@given(st.sampled_from(list(base.Sampler)))
def test_every_api_sampler_name_is_accepted_in_any_case(name: str) -> None:
    assert base.parse_sampler(name.upper()) is base.Sampler(name)


@given(st.text(min_size=1, max_size=20))
def test_any_other_sampler_name_is_refused(name: str) -> None:
    if name.strip().lower() in {s.value for s in base.Sampler}:
        return
    with pytest.raises(RunnerError) as caught:
        base.parse_sampler(name)
    assert caught.value.reason is Reason.INVALID_PARAMETERS


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("sampler", list(base.Sampler))
def test_the_runner_builds_exactly_the_sampler_schedule_pairs_the_api_admits(family, sampler) -> None:
    for schedule in base.Schedule:
        admitted = schedule in base.SCHEDULES_BY_SAMPLER[sampler]
        assert generationjob.is_supported(sampler, schedule) is admitted
        request = GenerationRequest(prompt="x", sampler=sampler, scheduler=schedule)
        if admitted:
            assert base.check_request(request) == (sampler, schedule)
            scheduler = diffusers_runner.build_scheduler(sampler, schedule, family)
            scheduler.set_timesteps(4)
            continue
        for refuse in (lambda: base.check_request(request),
                       lambda: diffusers_runner.build_scheduler(sampler, schedule, family)):
            with pytest.raises(RunnerError) as caught:
                refuse()
            assert caught.value.reason is Reason.INVALID_PARAMETERS


def test_the_api_refuses_the_pairs_the_runner_refuses() -> None:
    with pytest.raises(ValueError, match="scheduler karras is not available with sampler ddim"):
        generationjob.GenerationParams(prompt="x", sampler="ddim", scheduler="karras")
    assert generationjob.GenerationParams(prompt="x", sampler="dpmpp_2m", scheduler="karras").scheduler == "karras"


def test_the_api_documents_every_sampler_and_schedule() -> None:
    fields = generationjob.GenerationParams.model_fields
    for sampler in base.Sampler:
        assert sampler.value in (fields["sampler"].description or "")
    for schedule in base.Schedule:
        assert schedule.value in (fields["scheduler"].description or "")


def test_the_png_names_the_canonical_sampler_and_schedule(runner, checkpoint) -> None:
    request = GenerationRequest(**{**REQUEST.__dict__, "sampler": " DPMPP_2M ", "scheduler": "Karras"})
    text = _generate(runner, checkpoint, request=request).metadata["parameters"]
    assert "Sampler: dpmpp_2m, Schedule type: karras" in text


def test_progress_counts_the_jobs_steps_for_samplers_that_evaluate_twice_per_step(runner, checkpoint) -> None:
    steps: list[tuple[int, int]] = []
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 3, "sampler": "heun"})
    _generate(runner, checkpoint, request=request, on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


@settings(max_examples=200)
@given(width=st.integers(-10, 5000), height=st.integers(-10, 5000), steps=st.integers(-2, 600))
def test_requests_are_valid_exactly_when_sizes_and_steps_are_in_range(width: int, height: int, steps: int) -> None:
    request = GenerationRequest(prompt="x", width=width, height=height, steps=steps)
    expected_ok = all(8 <= v <= base.MAX_SIDE_PX and v % 8 == 0 for v in (width, height)) and 1 <= steps <= 500
    assert (base.validate_request(request) == []) == expected_ok


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_an_fp16_sdxl_checkpoint_decodes_with_an_fp32_copy_of_its_vae_and_keeps_the_rest_in_place() -> None:
    state = tiny_models.tiny_sdxl_state(seed=0, dtype=torch.float16)
    checkpoint = LoadedArtifact(name="xl-fp16", kind=ArtifactKind.CHECKPOINT, tensors=state, sha256="xl-fp16")
    runner = DiffusersRunner(device="cpu")
    image = _generate(runner, checkpoint)
    assert (image.width, image.height) == (64, 48)
    loaded = _storages(state.values())
    model = runner._models["xl-fp16"]
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert _storages(model.modules[component].parameters()) <= loaded, component
    decoder = runner._vaes[("xl-fp16", "sdxl/fp32")][1]
    assert decoder.dtype == torch.float32
    assert not _storages(decoder.parameters()) & loaded


def test_an_fp16_fix_vae_override_is_used_in_fp16_without_a_copy() -> None:
    state = tiny_models.tiny_sdxl_state(seed=0, dtype=torch.float16)
    checkpoint = LoadedArtifact(name="xl-fp16", kind=ArtifactKind.CHECKPOINT, tensors=state, sha256="xl-fp16")
    vae_state = tiny_models.tiny_vae_state(seed=3, dtype=torch.float16)
    vae = LoadedArtifact(name="sdxl-vae-fp16-fix", kind=ArtifactKind.VAE, tensors=vae_state, sha256="fix")
    runner = DiffusersRunner(device="cpu")
    _generate(runner, checkpoint, vae=vae)
    assert [key for key in runner._vaes if key[1].endswith("/fp32")] == []
    assert diffusers_runner.is_fp16_fix("SDXL_VAE_fp16fix") and not diffusers_runner.is_fp16_fix("sdxl-vae")


def test_sd15_in_fp16_decodes_with_its_own_vae() -> None:
    state = tiny_models.tiny_sd15_state(seed=0, dtype=torch.float16)
    checkpoint = LoadedArtifact(name="sd-fp16", kind=ArtifactKind.CHECKPOINT, tensors=state, sha256="sd-fp16")
    runner = DiffusersRunner(device="cpu")
    _generate(runner, checkpoint)
    assert runner._vaes == {}


def test_prepare_builds_the_tokenizers_the_first_job_would_otherwise_wait_for() -> None:
    from stoker.agent.runner.diffusers_runner import clip_tokenizer

    clip_tokenizer.cache_clear()
    DiffusersRunner(device="cpu").prepare()
    built = clip_tokenizer.cache_info()
    assert built.currsize >= 2  # SD 1.5's and SDXL's second tokenizer pad differently
    DiffusersRunner(device="cpu").prepare()
    assert clip_tokenizer.cache_info().hits > built.hits
