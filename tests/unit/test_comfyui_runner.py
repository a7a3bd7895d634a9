"""The ComfyUI runner queues a workflow on a server speaking ComfyUI's API and returns its image."""

from __future__ import annotations

import io
import pathlib
import socket
import threading
from collections.abc import Iterator

import pytest
from PIL import Image

from stoker.agent.runner import base, comfyui
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact, Reason, RunnerError
from stoker.testing.comfyui_stub import ComfyUIStub

REQUEST = GenerationRequest(prompt="a red fox", negative_prompt="text", steps=4, width=64, height=40, seed=11,
                            sampler="dpm_2_a", scheduler="karras")


def _artifact(folder: pathlib.Path, name: str, kind: ArtifactKind, *, sha: str, weight: float = 1.0) -> LoadedArtifact:
    path = folder / f"{sha}.safetensors"  # the disk cache names files by content, not by user input
    path.write_bytes(b"weights of " + name.encode())
    return LoadedArtifact(name=name, kind=kind, tensors={}, sha256=sha, weight=weight, path=path)


@pytest.fixture
def stub(tmp_path: pathlib.Path) -> Iterator[ComfyUIStub]:
    with ComfyUIStub(tmp_path / "comfyui") as server:
        yield server


@pytest.fixture
def cache(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


@pytest.fixture
def runner(stub: ComfyUIStub) -> Iterator[comfyui.ComfyUIRunner]:
    settings = comfyui.ComfyUISettings(url=stub.url, models_dir=stub.models_dir, poll_interval_s=0.01,
                                       timeout_s=30.0)
    runner = comfyui.ComfyUIRunner(settings)
    yield runner
    runner.close()


def _run(runner, checkpoint, *, loras=(), vae=None, request=REQUEST, should_cancel=lambda: False, on_step=None):
    return runner.generate(checkpoint=checkpoint, loras=list(loras), vae=vae, request=request,
                           on_step=on_step or (lambda i, n: None), should_cancel=should_cancel)


def test_a_job_becomes_a_png_of_the_requested_size_with_its_parameters(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "dreamy/v1", ArtifactKind.CHECKPOINT, sha="a" * 64)
    steps: list[tuple[int, int]] = []
    image = _run(runner, checkpoint, on_step=lambda i, n: steps.append((i, n)))
    png = Image.open(io.BytesIO(image.png))
    assert png.size == (64, 40) == (image.width, image.height)
    assert png.text["parameters"].startswith("a red fox\nNegative prompt: text\n")
    assert "prompt" not in png.text  # ComfyUI's own chunks name server-side files
    assert steps == [(4, 4)]


def test_the_workflow_wires_checkpoint_loras_vae_and_sampler(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="b" * 64)
    loras = [_artifact(cache, "style", ArtifactKind.LORA, sha="c" * 64, weight=0.6),
             _artifact(cache, "detail", ArtifactKind.LORA, sha="d" * 64, weight=1.2)]
    vae = _artifact(cache, "vae-ft", ArtifactKind.VAE, sha="e" * 64)
    _run(runner, checkpoint, loras=loras, vae=vae)
    (graph,) = stub.prompts.values()
    by_type: dict[str, list[dict]] = {}
    for node in graph.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert by_type["CheckpointLoaderSimple"] == [{"ckpt_name": "stoker/base-bbbbbbbbbbbb.safetensors"}]
    assert [(n["lora_name"], n["strength_model"]) for n in by_type["LoraLoader"]] == [
        ("stoker/style-cccccccccccc.safetensors", 0.6), ("stoker/detail-dddddddddddd.safetensors", 1.2)]
    assert by_type["VAELoader"] == [{"vae_name": "stoker/vae-ft-eeeeeeeeeeee.safetensors"}]
    (sampler,) = by_type["KSampler"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["seed"], sampler["steps"]) == (
        "dpm_2_ancestral", "karras", 11, 4)
    decode = next(n for n in graph.values() if n["class_type"] == "VAEDecode")
    assert graph[decode["inputs"]["vae"][0]]["class_type"] == "VAELoader"


def test_model_files_are_linked_under_safe_names_in_the_agents_own_subfolder(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "../../etc/passwd", ArtifactKind.CHECKPOINT, sha="f" * 64)
    _run(runner, checkpoint)
    assert [p.name for p in (stub.models_dir / "checkpoints").iterdir()] == ["stoker"]
    (placed,) = (stub.models_dir / "checkpoints" / "stoker").iterdir()
    assert placed.name == "etc_passwd-ffffffffffff.safetensors"
    assert placed.is_symlink() and placed.resolve() == checkpoint.path.resolve()


def test_copy_mode_places_a_real_file_and_prune_removes_what_is_no_longer_held(tmp_path, cache) -> None:
    models = tmp_path / "models"
    kept = _artifact(cache, "kept", ArtifactKind.CHECKPOINT, sha="1" * 64)
    gone = _artifact(cache, "gone", ArtifactKind.LORA, sha="2" * 64)
    names = comfyui.sync_model_folder(models, [kept, gone], link="copy")
    assert names[kept.sha256] == "stoker/kept-111111111111.safetensors"
    placed = models / "checkpoints" / names[kept.sha256]
    assert not placed.is_symlink() and placed.read_bytes() == kept.path.read_bytes()
    removed = comfyui.prune_model_folder(models, keep=[names[kept.sha256]])
    assert [f"stoker/{p.name}" for p in removed] == [names[gone.sha256]]
    assert placed.exists()


def test_the_same_inputs_queue_the_same_workflow_and_give_the_same_bytes(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="3" * 64)
    lora = _artifact(cache, "style", ArtifactKind.LORA, sha="c" * 64, weight=0.5)
    first, second = (_run(runner, checkpoint, loras=[lora]) for _ in range(2))
    graphs = list(stub.prompts.values())

    def without_prefix(graph: dict) -> dict:  # the output file prefix is unique per prompt on purpose
        return {k: {**n, "inputs": {**n["inputs"], "filename_prefix": None}} for k, n in graph.items()}

    assert without_prefix(graphs[0]) == without_prefix(graphs[1])
    assert graphs[0]["9"]["inputs"]["filename_prefix"] != graphs[1]["9"]["inputs"]["filename_prefix"]
    assert first.png == second.png and first.metadata == second.metadata


def test_every_api_sampler_has_a_comfyui_name_the_server_accepts(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="3" * 64)
    assert set(comfyui.COMFY_SAMPLERS) == set(base.Sampler)
    for sampler in base.Sampler:
        for schedule in base.SCHEDULES_BY_SAMPLER[sampler]:
            request = GenerationRequest(prompt="x", width=64, height=64, steps=1, sampler=sampler, scheduler=schedule)
            assert _run(runner, checkpoint, request=request).width == 64


def test_a_batch_comes_back_as_one_strip_like_the_built_in_runner(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="3" * 64)
    request = GenerationRequest(**{**REQUEST.__dict__, "batch_size": 3})
    image = _run(runner, checkpoint, request=request)
    png = Image.open(io.BytesIO(image.png))
    assert png.size == (3 * 64, 40) == (image.width, image.height)
    colours = {png.getpixel((i * 64 + 10, 10)) for i in range(3)}
    assert len(colours) == 3
    assert "Batch size: 3" in png.text["parameters"]


def test_a_link_to_an_evicted_file_is_pruned_after_the_next_job_and_user_files_stay(runner, stub, cache) -> None:
    evicted = _artifact(cache, "old", ArtifactKind.CHECKPOINT, sha="e" * 64)
    _run(runner, evicted)
    link = stub.models_dir / "checkpoints" / "stoker" / "old-eeeeeeeeeeee.safetensors"
    assert link.is_symlink()
    users_own = stub.models_dir / "checkpoints" / "v1-5-pruned.safetensors"
    users_own.write_bytes(b"not placed by stoker")
    evicted.path.unlink()  # the disk cache evicted it
    _run(runner, _artifact(cache, "new", ArtifactKind.CHECKPOINT, sha="f" * 64))
    assert not link.is_symlink()
    assert users_own.exists()
    assert (stub.models_dir / "checkpoints" / "stoker" / "new-ffffffffffff.safetensors").is_symlink()


def test_the_users_own_files_are_never_pruned_even_with_names_like_the_agents(stub, cache) -> None:
    mine = stub.models_dir / "checkpoints" / "dreamshaper-0123456789ab.safetensors"  # looks like a placed name
    mine.write_bytes(b"the user's model")
    theirs_linked = stub.models_dir / "loras" / "style-aaaaaaaaaaaa.safetensors"
    theirs_linked.symlink_to(cache / "elsewhere.safetensors")  # even a dangling link of theirs stays
    for link in ("symlink", "copy"):
        runner = comfyui.ComfyUIRunner(comfyui.ComfyUISettings(url=stub.url, models_dir=stub.models_dir, link=link,
                                                               poll_interval_s=0.01))
        _run(runner, _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="b" * 64))
        runner.prune()
        runner.close()
    assert mine.read_bytes() == b"the user's model" and theirs_linked.is_symlink()


def test_a_dangling_link_left_by_an_earlier_run_is_pruned_at_start(stub, cache) -> None:
    gone = cache / "gone.safetensors"
    dangling = stub.models_dir / "loras" / "stoker" / "gone-0123456789ab.safetensors"
    dangling.parent.mkdir()
    dangling.symlink_to(gone)
    kept = _artifact(cache, "kept", ArtifactKind.LORA, sha="a" * 64)
    comfyui.sync_model_folder(stub.models_dir, [kept])
    runner = comfyui.ComfyUIRunner(comfyui.ComfyUISettings(url=stub.url, models_dir=stub.models_dir))
    runner.close()
    assert not dangling.is_symlink()
    assert (stub.models_dir / "loras" / "stoker" / "kept-aaaaaaaaaaaa.safetensors").is_symlink()


def test_the_runner_asks_for_file_paths_not_loaded_weights() -> None:
    assert comfyui.ComfyUIRunner.uses_loaded_weights is False


def test_cancelling_a_running_prompt_interrupts_it(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="4" * 64)
    stub.hold()
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            _run(runner, checkpoint, should_cancel=cancel.is_set)
        except RunnerError as error:
            outcome.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    assert stub.running.wait(timeout=30)
    cancel.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert isinstance(outcome[0], RunnerError) and outcome[0].reason is Reason.CANCELLED
    (prompt_id,) = stub.prompts
    assert stub.interrupts == [{"prompt_id": prompt_id}]
    assert stub.deleted == [prompt_id]


def test_a_model_the_server_does_not_have_is_reported_with_comfyuis_reason(runner, stub, cache) -> None:
    checkpoint = _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="5" * 64)
    graph = comfyui.build_workflow(REQUEST, checkpoint="missing.safetensors", loras=[], vae=None,
                                   filename_prefix="x")
    with pytest.raises(RunnerError) as caught:
        runner._queue(graph)
    assert caught.value.reason is Reason.INVALID_PARAMETERS
    assert "missing.safetensors" in str(caught.value)
    _run(runner, checkpoint)  # the runner stays usable


def test_an_out_of_memory_failure_on_the_server_is_insufficient_vram(runner, stub, cache) -> None:
    stub.fail_next = "CUDA out of memory. Tried to allocate 2.00 GiB"
    with pytest.raises(RunnerError) as caught:
        _run(runner, _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="6" * 64))
    assert caught.value.reason is Reason.INSUFFICIENT_VRAM
    assert caught.value.retryable


def test_another_server_failure_carries_its_message(runner, stub, cache) -> None:
    stub.fail_next = "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(RunnerError) as caught:
        _run(runner, _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="7" * 64))
    assert caught.value.reason is Reason.BACKEND_FAILED
    assert "mat1 and mat2" in str(caught.value)


def test_an_unreachable_server_is_a_retryable_failure(tmp_path, cache) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = comfyui.ComfyUISettings(url=f"http://127.0.0.1:{port}", models_dir=tmp_path / "models")
    runner = comfyui.ComfyUIRunner(settings)
    with pytest.raises(RunnerError) as caught:
        _run(runner, _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="8" * 64))
    runner.close()
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE and caught.value.retryable


def test_an_unsupported_sampler_schedule_pair_is_refused_before_anything_is_placed(runner, stub, cache) -> None:
    request = GenerationRequest(prompt="x", width=64, height=64, sampler="ddim", scheduler="karras")
    with pytest.raises(RunnerError) as caught:
        _run(runner, _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="9" * 64), request=request)
    assert caught.value.reason is Reason.INVALID_PARAMETERS
    assert stub.prompts == {}
    assert list((stub.models_dir / "checkpoints").iterdir()) == []


def test_a_prompt_that_never_finishes_times_out(stub, cache) -> None:
    settings = comfyui.ComfyUISettings(url=stub.url, models_dir=stub.models_dir, poll_interval_s=0.01,
                                       timeout_s=0.2)
    runner = comfyui.ComfyUIRunner(settings)
    stub.hold()
    with pytest.raises(RunnerError) as caught:
        _run(runner, _artifact(cache, "base", ArtifactKind.CHECKPOINT, sha="0" * 64))
    runner.close()
    assert caught.value.reason is Reason.BACKEND_FAILED and caught.value.retryable
    assert "within" in str(caught.value)
    assert len(stub.interrupts) == 1


def test_the_agent_settings_configure_the_comfyui_runner(tmp_path) -> None:
    import torch

    from stoker.agent.main import RunSettings, build_runner

    settings = RunSettings.from_args([
        "--cache-dir", str(tmp_path / "cache"), "--runner", "comfyui", "--comfyui-url", "http://127.0.0.1:9999",
        "--comfyui-models-dir", str(tmp_path / "models"), "--comfyui-link", "copy", "--comfyui-timeout-s", "5",
        "--comfyui-poll-interval-s", "0.5"])
    runner = build_runner(settings, torch.device("cpu"))
    try:
        assert isinstance(runner, comfyui.ComfyUIRunner)
        assert runner.settings == comfyui.ComfyUISettings(url="http://127.0.0.1:9999", models_dir=tmp_path / "models",
                                                          link="copy", poll_interval_s=0.5, timeout_s=5.0)
    finally:
        runner.close()


def test_an_unknown_link_mode_is_refused_naming_the_setting(tmp_path) -> None:
    from stoker.agent.main import RunSettings
    from stoker.agent.settings import SettingsError

    with pytest.raises(SettingsError, match="comfyui_link"):
        RunSettings.from_args(["--cache-dir", str(tmp_path / "cache"), "--comfyui-link", "hardlink"])


def test_a_comfyui_agent_on_cpu_reports_the_gpu_from_its_settings_or_an_unknown_vram_never_its_host_budget(
        tmp_path) -> None:
    from stoker.agent.main import RunSettings, reported_gpu

    settings = RunSettings.from_args(["--cache-dir", str(tmp_path / "cache"), "--runner", "comfyui",
                                      "--gpu-model", "NVIDIA L40S", "--gpu-vram-bytes", "48GiB"])
    seen = {"seen_model": "cpu", "seen_vram_bytes": 0, "vram_budget_bytes": 8 * 2**30}  # the sidecar has the GPU
    assert reported_gpu(uses_loaded_weights=False, model_setting=settings.gpu_model,
                        vram_setting=settings.gpu_vram_bytes, **seen) == ("NVIDIA L40S", 48 * 2**30, 48 * 2**30)
    assert reported_gpu(uses_loaded_weights=False, **seen) == ("unknown", 0, 0)  # 0: placement is not limited
    on_gpu = {"seen_model": "NVIDIA H200", "seen_vram_bytes": 141 * 10**9, "vram_budget_bytes": 100 * 10**9}
    assert reported_gpu(uses_loaded_weights=False, **on_gpu) == ("NVIDIA H200", 141 * 10**9, 141 * 10**9)
    assert reported_gpu(uses_loaded_weights=True, **on_gpu, vram_setting=1) == ("NVIDIA H200", 141 * 10**9, 100 * 10**9)
