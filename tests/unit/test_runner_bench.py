"""The runner benchmark's real-size architectures are the real models, and its checkpoint files load."""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest
import torch

from stoker.agent import loader as stoker_loader
from stoker.agent.runner import diffusers_runner as runner
from stoker.agent.runner.diffusers_runner import Family
from stoker.testing import tiny_models

REPO = pathlib.Path(__file__).resolve().parents[2]
META = torch.device("meta")


@pytest.fixture(scope="module")
def bench():
    # Appended, not prepended: the repository's operator/ must not shadow the standard library.
    sys.path.append(str(REPO))
    try:
        yield importlib.import_module("bench.runner_bench")
    finally:
        sys.path.remove(str(REPO))


def params(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("family", "expected"), [
    (Family.SD15, {"unet": 859.5, "vae": 83.7, "text": 123.1}),
    (Family.SDXL, {"unet": 2567.5, "vae": 83.7, "text": 123.1, "text2": 694.7}),
])  # fmt: skip
def test_real_size_architectures_have_the_published_sizes_and_read_back_through_the_runner(bench, family, expected):
    # The published parameter counts of SD 1.5 and SDXL base; shapes only, on the meta device.
    modules = bench.real_size_modules(family)
    assert {name: params(m) for name, m in modules.items()} == expected
    state = tiny_models.ldm_state(unet=modules["unet"], vae=modules["vae"], text=modules["text"],
                                  text2=modules.get("text2"))  # fmt: skip
    assert runner.detect_family(state) is family
    # The runner reads the same architecture back from the single-file names and shapes.
    unet = runner.build_unet(state, family, META)
    assert params(unet) == expected["unet"]
    depths = runner.unet_config({k: tuple(v.shape) for k, v in state.items()}, family)["transformer_layers_per_block"]
    assert depths == (1 if family is Family.SD15 else [1, 2, 10])
    assert params(runner.build_vae(state, family, META, prefix=runner.VAE_PREFIX)) == expected["vae"]
    prefix = runner.SD15_TEXT_PREFIX if family is Family.SD15 else runner.SDXL_TEXT_PREFIX
    assert params(runner.build_text_encoder(state, family, META, prefix=prefix, section="text_encoder")) == expected["text"]
    if family is Family.SDXL:
        text2 = runner.build_text_encoder(state, family, META, prefix=runner.SDXL_TEXT2_PREFIX, section="text_encoder_2",
                                          open_clip=True)  # fmt: skip
        assert params(text2) == expected["text2"]


def test_random_weights_keep_norm_scales_at_one(bench):
    shapes = tiny_models.tiny_sd15_state()
    state = bench.random_state({k: v.to(META) for k, v in shapes.items()}, device=torch.device("cpu"), dtype=torch.float16)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in shapes.items()}
    assert all(v.dtype == torch.float16 for v in state.values())
    norm = "model.diffusion_model.out.0.weight"  # the UNet's final GroupNorm
    assert torch.equal(state[norm], torch.ones_like(state[norm]))
    conv = state["model.diffusion_model.input_blocks.0.0.weight"].float()
    assert 0.01 < conv.std().item() < 0.03


def test_streamed_checkpoints_are_valid_safetensors_files_the_loader_reads(bench, tmp_path):
    tensors = {"w16": torch.randn(3, 5).half(), "wbf": torch.randn(7, dtype=torch.bfloat16), "w32": torch.randn(2, 2, 2),
               "scalar": torch.tensor(1.5), "strided": torch.randn(4, 4)[:, ::2]}  # fmt: skip
    path = tmp_path / "m.safetensors"
    bench.write_safetensors(path, tensors)
    loaded = stoker_loader.load_file(path)
    assert sorted(loaded.tensors) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t), name
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["strided"], tensors["strided"])
    assert not list(tmp_path.glob("*.partial"))
