"""The built-in runner: diffusers pipelines built on weights the loader has already placed.

A single-file checkpoint (the LDM/SGM layout model sites distribute) is recognised from
its keys (SD 1.x or SDXL base), its architecture is read from tensor shapes, and the
modules are constructed on the meta device and then given the loader's tensors with
`load_state_dict(assign=True)`: key conversion is a rename, the few reshapes are views,
so no weight is copied. Family constants that shapes cannot tell (head counts, VAE
scaling, scheduler) ship in ``configs/<family>.json``; the CLIP BPE vocabulary comes from
the open_clip_torch package. Nothing is fetched from a network.

Built modules are cached per checkpoint (and per VAE) while the loader's tensors stay the
same objects, so a hot model starts its next job without a rebuild. LoRAs are applied as
forward hooks (output + scale * up(down(x))) that are removed after the job: the cached
modules and the loader's tensors are never modified, even when a job fails.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import gzip
import importlib.util
import inspect
import io
import json
import logging
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from stoker.agent.runner import base
from stoker.agent.runner.base import GeneratedImage, GenerationRequest, LoadedArtifact, Reason, RunnerError

log = logging.getLogger(__name__)

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."


class Family(enum.StrEnum):
    SD15 = "sd15"
    SDXL = "sdxl"


# ---------------------------------------------------------------------------------------
# Pure: recognising a checkpoint and reading its architecture from tensor shapes.
# ---------------------------------------------------------------------------------------

Shapes = Mapping[str, tuple[int, ...]]


def detect_family(keys: Sequence[str] | Mapping[str, Any]) -> Family:
    """Which supported family a single-file checkpoint belongs to, from its key names. Pure."""
    names = list(keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in names)
    if has_unet and any(k.startswith(SD15_TEXT_PREFIX) for k in names):
        return Family.SD15
    if (has_unet and any(k.startswith(SDXL_TEXT_PREFIX) for k in names)
            and any(k.startswith(SDXL_TEXT2_PREFIX) for k in names)):
        return Family.SDXL
    if any(k.startswith("cond_stage_model.model.") for k in names):
        what = "an SD 2.x checkpoint (OpenCLIP text encoder)"
    elif any(k.startswith(SDXL_TEXT2_PREFIX) for k in names):
        what = "an SDXL refiner checkpoint"
    elif any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.", "joint_blocks.")) for k in names):
        what = "an SD3/FLUX transformer checkpoint"
    elif not has_unet:
        what = "not a full checkpoint (no UNet under 'model.diffusion_model.'; a LoRA, VAE or diffusers folder?)"
    else:
        what = "a checkpoint without a recognised text encoder"
    raise RunnerError(
        Reason.UNSUPPORTED_CHECKPOINT,
        f"this is {what}; the built-in runner supports SD 1.x and SDXL base single-file checkpoints",
    )


@functools.cache
def family_defaults(family: Family) -> Mapping[str, Any]:
    """The shipped constants of a family (``configs/<family>.json``)."""
    return json.loads((CONFIGS / f"{family.value}.json").read_text())


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in shapes if (m := regex.match(k))})


def unet_config(shapes: Shapes, family: Family) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config read from LDM UNet tensor shapes. Pure."""
    p = UNET_PREFIX
    try:
        conv_in = shapes[p + "input_blocks.0.0.weight"]
        inputs = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
        levels = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
        layers = inputs // levels - 1
        channels, down_types, up_types, depths = [], [], [], []
        for level in range(levels):
            first = f"{p}input_blocks.{1 + level * (layers + 1)}."
            channels.append(shapes[first + "0.out_layers.3.weight"][0])
            depth = _count(shapes, re.escape(first) + r"1\.transformer_blocks\.(\d+)\.")
            down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
            depths.append(max(depth, 1))
        for level in range(levels):
            has_attention = any(k.startswith(f"{p}output_blocks.{level * (layers + 1)}.1.transformer_blocks.")
                                for k in shapes)
            up_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")
        mid_depth = _count(shapes, re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
        attn_key = next(k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight"))
        proj_in = next(k for k in shapes if k.startswith(p) and k.endswith(".proj_in.weight"))
    except (KeyError, StopIteration, ZeroDivisionError) as error:
        raise RunnerError(Reason.UNSUPPORTED_CHECKPOINT,
                          f"the UNet is missing expected tensors ({error}); the checkpoint may be truncated") from None
    defaults = family_defaults(family)["unet"]
    if "num_heads" in defaults:
        heads: Any = defaults["num_heads"]
    else:
        heads = [max(1, c // defaults["head_dim"]) for c in channels]
    config: dict[str, Any] = {
        "sample_size": family_defaults(family)["vae"]["sample_size"] // 8,
        "in_channels": conv_in[1],
        "out_channels": shapes[p + "out.2.weight"][0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": shapes[attn_key][1],
        "attention_head_dim": heads,
        "transformer_layers_per_block": depths if family is Family.SDXL else 1,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "upcast_attention": defaults["upcast_attention"],
    }
    if mid_depth and mid_depth != depths[-1]:
        raise RunnerError(Reason.UNSUPPORTED_CHECKPOINT,
                          f"the middle block has {mid_depth} transformer layers but the deepest level {depths[-1]}")
    if p + "label_emb.0.0.weight" in shapes:
        adm_in = shapes[p + "label_emb.0.0.weight"][1]
        pooled = shapes[SDXL_TEXT2_PREFIX + "text_projection"][1]
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled) // 6,
                      projection_class_embeddings_input_dim=adm_in)
    return config


def vae_config(shapes: Shapes, *, prefix: str, family: Family) -> dict[str, Any]:
    """A diffusers AutoencoderKL config read from LDM VAE tensor shapes. Pure."""
    try:
        levels = _count(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
        channels = [shapes[f"{prefix}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
        layers = _count(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
        conv_in = shapes[prefix + "encoder.conv_in.weight"]
        latent = shapes[prefix + "decoder.conv_in.weight"][1]
        out = shapes[prefix + "decoder.conv_out.weight"][0]
    except KeyError as error:
        raise RunnerError(Reason.UNSUPPORTED_VAE,
                          f"the VAE is missing expected tensor {error}; it may be truncated or not an SD VAE") from None
    if not levels:
        raise RunnerError(Reason.UNSUPPORTED_VAE, "no VAE encoder blocks found; is this an SD VAE in LDM layout?")
    defaults = family_defaults(family)["vae"]
    return {
        "in_channels": conv_in[1], "out_channels": out, "latent_channels": latent,
        "block_out_channels": channels, "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "sample_size": defaults["sample_size"], "scaling_factor": defaults["scaling_factor"],
        # The pipeline's own upcast would replace the loader's tensors in the cached module;
        # the runner decodes with a separate fp32 copy where fp16 overflows (SDXL).
        "force_upcast": False,
    }


def clip_config(shapes: Shapes, *, prefix: str, family: Family, section: str) -> dict[str, Any]:
    """A transformers CLIPTextConfig (as kwargs) read from HF-layout CLIP tensor shapes. Pure."""
    defaults = family_defaults(family)[section]
    try:
        vocab, hidden = shapes[prefix + "text_model.embeddings.token_embedding.weight"]
        positions = shapes[prefix + "text_model.embeddings.position_embedding.weight"][0]
        inner = shapes[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as error:
        raise RunnerError(Reason.UNSUPPORTED_CHECKPOINT,
                          f"the text encoder is missing tensor {error}; the checkpoint may be truncated") from None
    projection = shapes.get(prefix + "text_projection.weight", (hidden, hidden))[0]
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inner, "projection_dim": projection,
        "num_hidden_layers": _count(shapes, re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // defaults["head_dim"]), "max_position_embeddings": positions,
        "hidden_act": defaults["hidden_act"], "layer_norm_eps": defaults["layer_norm_eps"],
    }


def open_clip_to_hf(tensors: Mapping[str, torch.Tensor], *, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text-encoder tensors under HF CLIPTextModelWithProjection names, as views (no copies)."""
    out: dict[str, torch.Tensor] = {}
    renames = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
               "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = tensor
        elif name == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = tensor
        elif name.startswith("ln_final."):
            out["text_model.final_layer_norm." + name[len("ln_final."):]] = tensor
        elif name == "text_projection":
            out["text_projection.weight"] = tensor.T  # OpenCLIP computes x @ P; Linear computes x @ W.T
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)", name):
            layer, rest = f"text_model.encoder.layers.{m[1]}.", m[2]
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for part, chunk in zip(("q", "k", "v"), tensor.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk
            else:
                for old, new in renames.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                out[layer + rest] = tensor
        # logit_scale and attention masks have no counterpart and are not needed
    return out


# ---------------------------------------------------------------------------------------
# LoRA: parse the common formats into (component, module path, down, up, scale).
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraPatch:
    component: str  # unet | text_encoder | text_encoder_2
    module: str  # the key in the component's lookup table (underscored path)
    down: torch.Tensor
    up: torch.Tensor
    scale: float


_KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                     "lora_te2_": "text_encoder_2"}
_DIFFUSERS_COMPONENTS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                         "lora_unet.": "unet"}
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
}


def parse_lora(tensors: Mapping[str, torch.Tensor], *, weight: float, name: str) -> list[LoraPatch]:
    """Kohya (``lora_unet_*.lora_down``) and diffusers/PEFT (``unet.*.lora_A``) LoRAs as patches."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        for prefix, component in _KOHYA_COMPONENTS.items():
            if key.startswith(prefix):
                module, _, part = key[len(prefix):].partition(".")
                role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
                if role:
                    groups[(component, module)][role] = tensor
                else:
                    unknown.append(key)
                break
        else:
            suffix = next((s for s in _DIFFUSERS_SUFFIXES if key.endswith(s)), None)
            is_alpha = key.endswith(".alpha")
            path = key[: -len(suffix)] if suffix else key[: -len(".alpha")] if is_alpha else None
            if path is None:
                unknown.append(key)
                continue
            component = "unet"
            for prefix, candidate in _DIFFUSERS_COMPONENTS.items():
                if path.startswith(prefix):
                    component, path = candidate, path[len(prefix):]
                    break
            # The old attention-processor layout names the projection inside the processor.
            path = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", path)
            path = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", path)
            role = _DIFFUSERS_SUFFIXES[suffix] if suffix else "alpha"
            groups[(component, path.replace(".", "_"))][role] = tensor
    if unknown:
        raise RunnerError(Reason.UNSUPPORTED_LORA,
                          f"LoRA {name!r} has {len(unknown)} tensors in no supported format (kohya LoRA/LoCon or "
                          f"diffusers/PEFT), for example {sorted(unknown)[:3]}; LoHa/LoKr are not supported")
    patches = []
    for (component, module), parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            raise RunnerError(Reason.UNSUPPORTED_LORA,
                              f"LoRA {name!r} has an incomplete pair for {module}: found only {sorted(parts)}")
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        patches.append(LoraPatch(component, module, parts["down"], parts["up"], weight * alpha / rank))
    return patches


def _lora_hook(patch: LoraPatch, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """A forward hook adding scale * up(down(x)) for a Linear or Conv2d `module`."""
    param = module.weight
    down = patch.down.to(device=param.device, dtype=param.dtype)
    up = patch.up.to(device=param.device, dtype=param.dtype)
    if isinstance(module, torch.nn.Conv2d):
        down = down if down.ndim == 4 else down[:, :, None, None]
        up = up if up.ndim == 4 else up[:, :, None, None]
        stride, padding, dilation = module.stride, module.padding, module.dilation

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            hidden = F.conv2d(args[0], down, stride=stride, padding=padding, dilation=dilation)
            return output + patch.scale * F.conv2d(hidden, up)
    else:
        down = down.flatten(1) if down.ndim == 4 else down
        up = up.flatten(1) if up.ndim == 4 else up

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return output + patch.scale * F.linear(F.linear(args[0], down), up)
    expected_in = param.shape[1]
    if down.shape[1] != expected_in or up.shape[0] != param.shape[0]:
        raise RunnerError(Reason.UNSUPPORTED_LORA,
                          f"LoRA shapes for {patch.module} ({tuple(up.shape)} x {tuple(down.shape)}) do not fit the "
                          f"model's {tuple(param.shape)}; the LoRA was trained for a different base model")
    return hook


# ---------------------------------------------------------------------------------------
# Building modules from loaded tensors without copying them.
# ---------------------------------------------------------------------------------------

def _assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str, reason: Reason,
            device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Give meta-built `module` the tensors in `state` (one dtype, on `device`) without copying.

    Without `dtype` the dominant dtype of `state` is kept, so nothing is converted; with it,
    tensors of another dtype are converted (copies)."""
    floats = [t for t in state.values() if t.is_floating_point()]
    counts = collections.Counter(t.dtype for t in floats)
    if dtype is None:
        dtype = max(counts, key=lambda d: sum(t.numel() for t in floats if t.dtype == d)) if counts else torch.float32
    # .to() returns the same tensor when nothing changes; only odd-dtype or misplaced tensors are copied.
    placed = {k: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for k, t in state.items()}
    try:
        result = module.load_state_dict(placed, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise RunnerError(reason, f"{what} does not match the architecture read from its shapes: "
                                  f"{str(error).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise RunnerError(reason, f"{what} does not match the architecture read from its shapes: "
                                  f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers are not in any state dict
            if not name.endswith("position_ids"):
                raise RunnerError(reason, f"{what}: buffer {name} has no value after loading")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1], device=device).expand(buffer.shape),
                                  persistent=False)
    return module.eval().requires_grad_(False)


def _subset(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def build_unet(tensors: Mapping[str, torch.Tensor], family: Family, device: torch.device):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = unet_config(_shapes(tensors), family)
    state = convert_ldm_unet_checkpoint(tensors, config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return _assign(unet, state, what="the UNet", reason=Reason.UNSUPPORTED_CHECKPOINT, device=device)


def build_vae(tensors: Mapping[str, torch.Tensor], family: Family, device: torch.device, *, prefix: str,
              reason: Reason = Reason.UNSUPPORTED_CHECKPOINT):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    subset = _subset(tensors, prefix) if prefix else dict(tensors)
    if any(".down_blocks." in k for k in subset):  # already in diffusers layout: used as is
        state = subset
        shapes = _shapes(state)
        levels = _count(shapes, r"encoder\.down_blocks\.(\d+)\.")
        try:
            config = {
                "in_channels": shapes["encoder.conv_in.weight"][1],
                "out_channels": shapes["decoder.conv_out.weight"][0],
                "latent_channels": shapes["decoder.conv_in.weight"][1],
                "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0]
                                       for i in range(levels)],
                "layers_per_block": _count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
                "scaling_factor": family_defaults(family)["vae"]["scaling_factor"], "force_upcast": False,
            }
        except KeyError as error:
            raise RunnerError(reason, f"the VAE is missing tensor {error}; it may be truncated") from None
    else:
        config = vae_config(_shapes(subset), prefix="", family=family)
        state = convert_ldm_vae_checkpoint(subset, config)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return _assign(vae, state, what="the VAE", reason=reason, device=device)


def build_text_encoder(tensors: Mapping[str, torch.Tensor], family: Family, device: torch.device, *,
                       prefix: str, section: str, open_clip: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    state = open_clip_to_hf(tensors, prefix=prefix) if open_clip else {
        k: v for k, v in _subset(tensors, prefix).items() if not k.endswith("position_ids")}
    config = CLIPTextConfig(**clip_config(_shapes(state), prefix="", family=family, section=section))
    cls = CLIPTextModelWithProjection if open_clip else _text_model_class()
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict().keys()
    if "text_model.embeddings.token_embedding.weight" not in expected:
        # Newer transformers releases drop the "text_model." level that checkpoints use.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _assign(model, state, what=f"the {section.replace('_', ' ')}", reason=Reason.UNSUPPORTED_CHECKPOINT,
                   device=device)


@functools.cache
def _text_model_class() -> type:
    """CLIPTextModel, with the ``.text_model`` attribute pipelines use for clip skip where it is missing."""
    from transformers import CLIPTextModel

    if "text_model" in CLIPTextModel.__init__.__code__.co_names:
        return CLIPTextModel

    class FlatCLIPTextModel(CLIPTextModel):
        @property
        def text_model(self) -> CLIPTextModel:
            return self

    return FlatCLIPTextModel


@functools.cache
def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE vocabulary and merges, rebuilt from open_clip_torch's packaged merges file."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RunnerError(Reason.BACKEND_UNAVAILABLE, "the CLIP vocabulary ships in open_clip_torch; install it")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [line.replace(" ", "") for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, lines


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    codes = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = codes[:]
    extra = 0
    for byte in range(256):
        if byte not in codes:
            codes.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(codes, (chr(c) for c in chars), strict=True))


@functools.cache
def clip_tokenizer(pad_token: str, model_max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token,
                         model_max_length=model_max_length)


# ---------------------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------------------

_SAMPLERS: Mapping[base.Sampler, tuple[str, Mapping[str, Any]]] = {
    base.Sampler.EULER: ("EulerDiscreteScheduler", {}),
    base.Sampler.EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    base.Sampler.HEUN: ("HeunDiscreteScheduler", {}),
    base.Sampler.DPM_2: ("KDPM2DiscreteScheduler", {}),
    base.Sampler.DPM_2_A: ("KDPM2AncestralDiscreteScheduler", {}),
    base.Sampler.DPMPP_2M: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    base.Sampler.DPMPP_2M_SDE: ("DPMSolverMultistepScheduler",
                                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    base.Sampler.LMS: ("LMSDiscreteScheduler", {}),
    base.Sampler.DDIM: ("DDIMScheduler", {}),
    base.Sampler.UNIPC: ("UniPCMultistepScheduler", {}),
    base.Sampler.DEIS: ("DEISMultistepScheduler", {}),
    base.Sampler.LCM: ("LCMScheduler", {}),
}
_SCHEDULES: Mapping[base.Schedule, Mapping[str, Any]] = {
    base.Schedule.NORMAL: {},
    base.Schedule.KARRAS: {"use_karras_sigmas": True},
    base.Schedule.EXPONENTIAL: {"use_exponential_sigmas": True},
    base.Schedule.SGM_UNIFORM: {"timestep_spacing": "trailing"},
}


def build_scheduler(sampler: base.Sampler, schedule: base.Schedule, family: Family):
    """A fresh diffusers scheduler for one job; every pair in `base.SCHEDULES_BY_SAMPLER` builds."""
    import diffusers

    class_name, options = _SAMPLERS[sampler]
    cls = getattr(diffusers, class_name)
    extra = dict(_SCHEDULES[schedule])
    accepted = set(inspect.signature(cls.__init__).parameters)
    if schedule not in base.SCHEDULES_BY_SAMPLER[sampler] or not set(extra) <= accepted:
        allowed = " or ".join(sorted(base.SCHEDULES_BY_SAMPLER[sampler]))
        raise RunnerError(Reason.INVALID_PARAMETERS,
                          f"sampler {sampler} does not support the {schedule} scheduler; use {allowed}")
    config = {k: v for k, v in family_defaults(family)["scheduler"].items() if k in accepted}
    try:
        return cls(**{**config, **options, **extra})
    except ImportError as error:  # e.g. LMS needs scipy
        raise RunnerError(Reason.INVALID_PARAMETERS,
                          f"sampler {sampler} is not available in this agent image ({error}); choose another") from None


# ---------------------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Model:
    family: Family
    tensors: Mapping[str, torch.Tensor]  # the loader's mapping the modules were built from
    modules: dict[str, Any]
    lora_targets: dict[str, dict[str, torch.nn.Module]]


class _Cancelled(Exception):
    pass


class DiffusersRunner:
    """The built-in runner. One generation at a time per instance; built modules are cached.

    `max_cached_models` bounds how many checkpoints (and VAEs) keep built modules; cached
    modules hold references to the loader's tensors, so the VRAM tier should call
    `forget(sha256)` when it evicts a model.
    """

    def __init__(self, *, device: torch.device | str = "cpu", max_cached_models: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device(device)
        self._clock = clock  # times the module builds (`GeneratedImage.build_seconds`)
        self.max_cached_models = max_cached_models
        self._models: collections.OrderedDict[str, _Model] = collections.OrderedDict()
        self._vaes: collections.OrderedDict[tuple[str, str], tuple[Mapping[str, torch.Tensor], Any]] = (
            collections.OrderedDict())
        self._lock = threading.Lock()  # one generation at a time
        self._cache_lock = threading.Lock()  # the module caches; forget() never waits for a generation
        self.builds = 0  # modules built since start (cache misses), for metrics and tests

    uses_loaded_weights = True

    def prepare(self) -> None:
        """Import the pipeline code and build the CLIP tokenizers now (seconds of work), so the
        first job does not wait for them. Blocking: the agent runs it in a thread at start."""
        from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
        from diffusers import UNet2DConditionModel  # noqa: F401
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: F401
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

        for family in Family:
            defaults = family_defaults(family)
            for key in ("tokenizer", "tokenizer_2"):
                if key in defaults:
                    clip_tokenizer(**defaults[key])

    def forget(self, sha256: str) -> None:
        """Drop cached modules built from the artifact with `sha256` (checkpoint or VAE)."""
        with self._cache_lock:
            self._models.pop(sha256, None)
            for key in [k for k in self._vaes if k[0] == sha256]:
                del self._vaes[key]

    def generate(
        self,
        *,
        checkpoint: LoadedArtifact,
        loras: Sequence[LoadedArtifact],
        vae: LoadedArtifact | None,
        request: GenerationRequest,
        on_step: Callable[[int, int], None],
        should_cancel: Callable[[], bool],
    ) -> GeneratedImage:
        sampler, schedule = base.check_request(request)
        with self._lock:
            try:
                return self._generate(checkpoint, loras, vae, request, sampler, schedule, on_step, should_cancel)
            except torch.OutOfMemoryError:
                raise RunnerError(
                    Reason.INSUFFICIENT_VRAM,
                    f"out of GPU memory generating {request.width}x{request.height} x{request.batch_size} with "
                    f"{checkpoint.name!r}; retry on a larger GPU or with a smaller size or batch",
                    retryable=True,
                ) from None
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------------------

    def _model(self, checkpoint: LoadedArtifact) -> _Model:
        with self._cache_lock:
            cached = self._models.get(checkpoint.sha256)
            if cached is not None and cached.tensors is checkpoint.tensors:
                self._models.move_to_end(checkpoint.sha256)
                return cached
        family = detect_family(checkpoint.tensors)
        started = time.perf_counter()
        tensors = checkpoint.tensors
        modules: dict[str, Any] = {"unet": build_unet(tensors, family, self.device)}
        if any(k.startswith(VAE_PREFIX) for k in tensors):
            modules["vae"] = build_vae(tensors, family, self.device, prefix=VAE_PREFIX)
        defaults = family_defaults(family)
        if family is Family.SD15:
            modules["text_encoder"] = build_text_encoder(tensors, family, self.device, prefix=SD15_TEXT_PREFIX,
                                                         section="text_encoder")
        else:
            modules["text_encoder"] = build_text_encoder(tensors, family, self.device, prefix=SDXL_TEXT_PREFIX,
                                                         section="text_encoder")
            modules["text_encoder_2"] = build_text_encoder(tensors, family, self.device, prefix=SDXL_TEXT2_PREFIX,
                                                           section="text_encoder_2", open_clip=True)
            modules["tokenizer_2"] = clip_tokenizer(**defaults["tokenizer_2"])
        modules["tokenizer"] = clip_tokenizer(**defaults["tokenizer"])
        model = _Model(family, tensors, modules, self._lora_targets(modules, tensors))
        with self._cache_lock:
            self._models[checkpoint.sha256] = model
            while len(self._models) > self.max_cached_models:
                self._models.popitem(last=False)
            self.builds += 1
        log.info("built %s pipeline modules for %s in %.2fs", family, checkpoint.name, time.perf_counter() - started)
        return model

    @staticmethod
    def _lora_targets(modules: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Per component: underscored module path (diffusers and LDM spellings) → Linear/Conv2d."""
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        targets: dict[str, dict[str, Any]] = {}
        for component in ("unet", "text_encoder", "text_encoder_2"):
            if component not in modules:
                continue
            table = {name.replace(".", "_"): module for name, module in modules[component].named_modules()
                     if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
            if component != "unet":  # kohya and PEFT spell text-encoder layers with the "text_model" level
                table.update({"text_model_" + k: m for k, m in table.items() if not k.startswith("text_model_")})
            targets[component] = table
        # Kohya names SDXL (and some SD 1.5) UNet layers by their LDM paths: map them too.
        unet_keys = {k[len(UNET_PREFIX):]: k[len(UNET_PREFIX):] for k in tensors if k.startswith(UNET_PREFIX)}
        config = dict(modules["unet"].config)
        renamed = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet_keys.items()}, config)
        unet_table = targets["unet"]
        for diffusers_key, ldm_key in renamed.items():
            if diffusers_key.endswith(".weight") and isinstance(ldm_key, str):
                module = unet_table.get(diffusers_key[: -len(".weight")].replace(".", "_"))
                if module is not None:
                    unet_table.setdefault(ldm_key[: -len(".weight")].replace(".", "_"), module)
        return targets

    def _vae(self, vae: LoadedArtifact, family: Family) -> Any:
        key = (vae.sha256, family.value)
        with self._cache_lock:
            cached = self._vaes.get(key)
            if cached is not None and cached[0] is vae.tensors:
                self._vaes.move_to_end(key)
                return cached[1]
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in vae.tensors) else ""
        module = build_vae(vae.tensors, family, self.device, prefix=prefix, reason=Reason.UNSUPPORTED_VAE)
        self._cache_vae(key, vae.tensors, module)
        return module

    def _cache_vae(self, key: tuple[str, str], tensors: Mapping[str, torch.Tensor], module: Any) -> None:
        with self._cache_lock:
            self._vaes[key] = (tensors, module)
            while len(self._vaes) > 2 * self.max_cached_models:  # room for fp32 decoders beside
                self._vaes.popitem(last=False)
            self.builds += 1

    def _decoder(self, family: Family, source: LoadedArtifact, vae_module: Any) -> Any | None:
        """An fp32 copy of the VAE for decoding, when decoding in fp16 would overflow; else None.

        SDXL's original VAE produces inf/NaN (black images) in fp16. This copy is the one
        documented exception to using the loader's tensors in place: it is made once per VAE
        and cached. VAEs named like ``sdxl-vae-fp16-fix`` are made for fp16 and used as is.
        """
        if family is not Family.SDXL or vae_module.dtype != torch.float16 or is_fp16_fix(source.name):
            return None
        key = (source.sha256, family.value + "/fp32")
        with self._cache_lock:
            cached = self._vaes.get(key)
            if cached is not None and cached[0] is source.tensors:
                self._vaes.move_to_end(key)
                return cached[1]
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            upcast = AutoencoderKL.from_config(vae_module.config)
        state = {k: v for k, v in vae_module.state_dict().items()}
        module = _assign(upcast, state, what="the fp32 VAE", reason=Reason.UNSUPPORTED_VAE, device=self.device,
                         dtype=torch.float32)
        log.info("made an fp32 copy of %s's VAE for decoding (SDXL's VAE overflows in fp16)", source.name)
        self._cache_vae(key, source.tensors, module)
        return module

    @contextlib.contextmanager
    def _loras_applied(self, model: _Model, loras: Sequence[LoadedArtifact]) -> Iterator[None]:
        """Hook every LoRA into the cached modules for the duration of one job."""
        handles = []
        try:
            for lora in loras:
                patches = parse_lora(lora.tensors, weight=lora.weight, name=lora.name)
                missing = [p.module for p in patches if p.module not in model.lora_targets.get(p.component, {})]
                if missing:
                    raise RunnerError(
                        Reason.UNSUPPORTED_LORA,
                        f"LoRA {lora.name!r} targets {len(missing)} layers that {model.family} checkpoints do not "
                        f"have, for example {missing[:3]}; it was probably trained for another base model",
                    )
                for patch in patches:
                    module = model.lora_targets[patch.component][patch.module]
                    handles.append(module.register_forward_hook(_lora_hook(patch, module)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _pipeline(self, model: _Model, vae_module: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        modules = dict(model.modules, vae=vae_module, scheduler=scheduler)
        if model.family is Family.SD15:
            pipe = StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        else:
            pipe = StableDiffusionXLPipeline(**modules, force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _generate(self, checkpoint: LoadedArtifact, loras: Sequence[LoadedArtifact], vae: LoadedArtifact | None,
                  request: GenerationRequest, sampler: base.Sampler, schedule: base.Schedule,
                  on_step: Callable[[int, int], None], should_cancel: Callable[[], bool]) -> GeneratedImage:
        if should_cancel():
            raise RunnerError(Reason.CANCELLED, "cancelled before generation started")
        t_build = self._clock()
        model = self._model(checkpoint)
        scheduler = build_scheduler(sampler, schedule, model.family)
        if vae is not None:
            vae_module = self._vae(vae, model.family)
        elif "vae" in model.modules:
            vae_module = model.modules["vae"]
        else:
            raise RunnerError(Reason.UNSUPPORTED_CHECKPOINT,
                              f"checkpoint {checkpoint.name!r} has no VAE; give the job a VAE")
        decoder = self._decoder(model.family, vae if vae is not None else checkpoint, vae_module)
        pipe = self._pipeline(model, vae_module, scheduler)
        build_s = self._clock() - t_build
        reported = [0]

        def step_end(pipeline: Any, step: int, _timestep: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
            # Report in the job's steps: Heun and DPM2 evaluate the model twice per step.
            done = min(request.steps, (step + 1) * request.steps // max(1, pipeline.num_timesteps))
            if done > reported[0]:
                reported[0] = done
                on_step(done, request.steps)
            if should_cancel():
                raise _Cancelled
            return {}

        # CPU generators make the same seed give the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed((request.seed + i) % 2**64)
                      for i in range(request.batch_size)]
        started = time.perf_counter()
        try:
            with self._loras_applied(model, loras), torch.inference_mode():
                output = pipe(
                    prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                    num_inference_steps=request.steps, guidance_scale=request.cfg_scale,
                    width=request.width, height=request.height, num_images_per_prompt=request.batch_size,
                    generator=generators, clip_skip=(request.clip_skip - 1) or None,
                    callback_on_step_end=step_end, output_type="pil" if decoder is None else "latent",
                ).images
                images = output if decoder is None else _decode(pipe, decoder, output)
        except _Cancelled:
            raise RunnerError(Reason.CANCELLED, "cancelled between denoising steps") from None
        except RunnerError:
            raise
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as error:
            raise RunnerError(Reason.GENERATION_FAILED,
                              f"generation with {checkpoint.name!r} failed: {error}") from error
        if reported[0] < request.steps:
            on_step(request.steps, request.steps)
        log.info("generated %dx%d x%d with %s in %.2fs", request.width, request.height, request.batch_size,
                 checkpoint.name, time.perf_counter() - started)
        parameters = base.format_parameters(request, model=checkpoint.name, loras=loras,
                                            vae=vae.name if vae else None, model_hash=checkpoint.sha256)
        return dataclasses.replace(encode_png(images, parameters=parameters), build_seconds=build_s)


def is_fp16_fix(name: str) -> bool:
    """Whether a VAE's name says it was fixed to decode in fp16 (``sdxl-vae-fp16-fix``). Pure."""
    return re.search(r"fp16[-_.]?fix", name, re.IGNORECASE) is not None


def _decode(pipe: Any, decoder: Any, latents: torch.Tensor) -> list[Any]:
    """Scaled latents to PIL images through `decoder` (the fp32 VAE), as the pipeline would."""
    latents = latents.to(device=decoder.device, dtype=torch.float32) / decoder.config.scaling_factor
    image = decoder.decode(latents, return_dict=False)[0]
    return list(pipe.image_processor.postprocess(image, output_type="pil"))


encode_png = base.encode_png
