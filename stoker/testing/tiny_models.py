"""Tiny Stable Diffusion model files with random weights, for tests, the demo and benchmarks.

Each builder makes the real architecture (UNet, VAE, CLIP text encoder; SDXL adds the
OpenCLIP text encoder and the size/crop conditioning) with tiny widths, initialises it
from `seed`, and writes it as one safetensors file in the layout model sites distribute
(the original LDM "single-file" key names), so the runner's conversion path is the one
real checkpoints take. The same seed always gives the same bytes.

The LoRA is in kohya's format (``lora_unet_*``/``lora_te_*`` with ``lora_down``,
``lora_up`` and ``alpha``), the VAE file in the LDM layout of standalone VAE releases.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

# Widths are multiples of 32 because every GroupNorm uses 32 groups, as in the real models.
TINY_UNET_CHANNELS = (32, 64)
TINY_VAE_CHANNELS = (32, 32, 32, 32)  # four levels: the real 8x spatial compression
TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = 2
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_TOKENS = 77


def _unet_ldm_names(*, levels: int, layers: int, attention_up: list[bool]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for the UNet blocks, as the original converter lays them out."""
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(layers + 1) * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(layers + 1) * i + j + 1}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
        for j in range(layers + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(layers + 1) * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(layers + 1) * i + j}.1."))
        if i < levels - 1:
            slot = 2 if attention_up[i] else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(layers + 1) * i + layers}.{slot}."))
    return pairs


_RESNET_UNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in LDM key names (``model.diffusion_model.`` prefix)."""
    levels = len(config["block_out_channels"])  # type: ignore[arg-type]
    attention_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]  # type: ignore[union-attr]
    pairs = _unet_ldm_names(levels=levels, layers=int(config["layers_per_block"]), attention_up=attention_up)
    out = {}
    for key, tensor in state.items():
        for hf, ldm in pairs:
            if key.startswith(hf):
                rest = key[len(hf):]
                if ".resnets." in hf:
                    for a, b in _RESNET_UNET:
                        if rest.startswith(a):
                            rest = b + rest[len(a):]
                            break
                out["model.diffusion_model." + ldm + rest] = tensor
                break
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor], *, levels: int, prefix: str) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM key names (attention as 1x1 convolutions)."""
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out.", "norm_out.").replace("mid_block.attentions.0.", "mid.attn_1.")
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in new:
            new = (new.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                   .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[prefix + new] = tensor.contiguous()
    return out


def _text_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF CLIP text-model tensors under the ``text_model.`` names checkpoints use (any transformers version)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _clip_config(*, hidden: int = TINY_TEXT_HIDDEN, act: str = "quick_gelu", projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=TINY_TEXT_LAYERS, num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=CLIP_MAX_TOKENS, hidden_act=act, projection_dim=projection or hidden,
    )


def _randomise(module: torch.nn.Module, *, seed: int, std: float = 0.05) -> None:
    """Overwrite every parameter from one seeded generator (library inits differ across versions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                              "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")):
                parameter.fill_(1.0)
            elif name.endswith(".bias") and "norm" in name:
                parameter.zero_()
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=TINY_VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(TINY_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(TINY_VAE_CHANNELS),
    )
    _randomise(vae, seed=seed, std=0.1)
    return vae


def tiny_sd15_state(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tiny SD 1.5 checkpoint's tensors in LDM single-file layout."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=TINY_UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN, attention_head_dim=8,
    )
    _randomise(unet, seed=seed)
    text = CLIPTextModel(_clip_config())
    _randomise(text, seed=seed + 1, std=0.2)
    state = ldm_state(unet=unet, vae=_tiny_vae(seed + 2), text=text)
    return {k: v.detach().to(dtype).contiguous() for k, v in sorted(state.items())}


def tiny_sdxl_state(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tiny SDXL checkpoint's tensors in SGM single-file layout (two text encoders)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text1 = CLIPTextModel(_clip_config())
    _randomise(text1, seed=seed + 1, std=0.2)
    text2 = CLIPTextModelWithProjection(_clip_config(act="gelu"))
    _randomise(text2, seed=seed + 3, std=0.2)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=TINY_UNET_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 1), use_linear_projection=True,
        cross_attention_dim=2 * TINY_TEXT_HIDDEN, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=TINY_TEXT_HIDDEN + 6 * time_dim,
    )
    _randomise(unet, seed=seed)
    state = ldm_state(unet=unet, vae=_tiny_vae(seed + 2), text=text1, text2=text2)
    return {k: v.detach().to(dtype).contiguous() for k, v in sorted(state.items())}


def ldm_state(*, unet: torch.nn.Module, vae: torch.nn.Module, text: torch.nn.Module,
              text2: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The modules' tensors under single-file names: SD 1.x, or SDXL base when `text2` (OpenCLIP) is given.

    Renames, views and the fused q/k/v concatenation only, so modules built on the meta
    device give the checkpoint's names and shapes without any memory (real-size benchmarks).
    """
    state = unet_to_ldm(unet.state_dict(), unet.config)
    levels = len(vae.config.block_out_channels)
    state.update(vae_to_ldm(vae.state_dict(), levels=levels, prefix="first_stage_model."))
    if text2 is None:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in _text_state(text).items()})
    else:
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in _text_state(text).items()})
        state.update(_open_clip_layout(_text_state(text2), prefix="conditioner.embedders.1.model."))
    return state


def _open_clip_layout(state: Mapping[str, torch.Tensor], *, prefix: str) -> dict[str, torch.Tensor]:
    """A HF CLIPTextModelWithProjection state dict in OpenCLIP names (fused q/k/v, x @ projection)."""
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T,
    }
    layer = 0
    while f"text_model.encoder.layers.{layer}.self_attn.q_proj.weight" in state:
        hf, oc = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            out[f"{oc}attn.out_proj.{kind}"] = state[f"{hf}self_attn.out_proj.{kind}"]
            out[f"{oc}ln_1.{kind}"] = state[f"{hf}layer_norm1.{kind}"]
            out[f"{oc}ln_2.{kind}"] = state[f"{hf}layer_norm2.{kind}"]
            out[f"{oc}mlp.c_fc.{kind}"] = state[f"{hf}mlp.fc1.{kind}"]
            out[f"{oc}mlp.c_proj.{kind}"] = state[f"{hf}mlp.fc2.{kind}"]
        layer += 1
    return out


def tiny_lora_state(checkpoint: Mapping[str, torch.Tensor], *, seed: int = 0, rank: int = 4,
                    alpha: float = 4.0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA for `checkpoint` on every UNet attention projection and text-encoder q/v.

    UNet modules use LDM names (``lora_unet_input_blocks_1_1_...``) as kohya's SDXL
    trainer writes them, text-encoder modules HF names (``lora_te_text_model_...``).
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    sdxl = any(k.startswith("conditioner.") for k in checkpoint)

    def add(name: str, weight: torch.Tensor) -> None:
        out_features, in_features = weight.shape[:2]
        out[f"{name}.lora_down.weight"] = torch.randn((rank, in_features), generator=generator) * scale
        out[f"{name}.lora_up.weight"] = torch.randn((out_features, rank), generator=generator) * scale
        out[f"{name}.alpha"] = torch.tensor(alpha)

    unet_pattern = re.compile(r"model\.diffusion_model\.(.+\.attn[12]\.to_[qkv])\.weight$")
    text_prefixes = ({"conditioner.embedders.0.transformer.": "lora_te1_"} if sdxl
                     else {"cond_stage_model.transformer.": "lora_te_"})
    for key, weight in sorted(checkpoint.items()):
        if match := unet_pattern.match(key):
            add("lora_unet_" + match[1].replace(".", "_"), weight)
        for prefix, lora_prefix in text_prefixes.items():
            if key.startswith(prefix) and key.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
                add(lora_prefix + key[len(prefix):-len(".weight")].replace(".", "_"), weight)
    return out


def tiny_vae_state(*, seed: int = 0, dtype: torch.dtype = torch.float32,
                   layout: str = "ldm") -> dict[str, torch.Tensor]:
    """A standalone tiny VAE matching the tiny checkpoints, in ``ldm`` (no prefix) or ``diffusers`` layout."""
    state = _tiny_vae(seed).state_dict()
    if layout == "ldm":
        state = vae_to_ldm(state, levels=len(TINY_VAE_CHANNELS), prefix="")
    return {k: v.detach().to(dtype).contiguous() for k, v in sorted(state.items())}


def _write(path: pathlib.Path | str, state: Mapping[str, torch.Tensor]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry only: safetensors writes metadata from a hash map, in no fixed order.
    save_file(dict(state), str(path), metadata={"format": "pt"})
    return path


def write_tiny_sd15(path: pathlib.Path | str, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny SD 1.5 single-file checkpoint (about 8 MB) to `path`."""
    return _write(path, tiny_sd15_state(seed=seed))


def write_tiny_sdxl(path: pathlib.Path | str, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny SDXL single-file checkpoint (about 15 MB) to `path`."""
    return _write(path, tiny_sdxl_state(seed=seed))


def write_tiny_lora(path: pathlib.Path | str, *, base: str = "sd15", seed: int = 0) -> pathlib.Path:
    """Write a kohya-format LoRA for the tiny `base` ("sd15" or "sdxl") checkpoint to `path`."""
    checkpoint = tiny_sd15_state() if base == "sd15" else tiny_sdxl_state()
    return _write(path, tiny_lora_state(checkpoint, seed=seed))


def write_tiny_vae(path: pathlib.Path | str, *, seed: int = 0) -> pathlib.Path:
    """Write a standalone tiny VAE (LDM layout) to `path`; it fits both tiny checkpoints."""
    return _write(path, tiny_vae_state(seed=seed + 100))


def write_tiny_vae_diffusers(path: pathlib.Path | str, *, seed: int = 0) -> pathlib.Path:
    """The same VAE as `write_tiny_vae(seed=seed)`, in diffusers layout (``encoder.down_blocks.*``)."""
    return _write(path, tiny_vae_state(seed=seed + 100, layout="diffusers"))
