"""SD1.x architecture: reference configs, the tiny test model, and inference from tensor shapes.

The real SD1.5 and the tiny model go through the same code: every width, depth and block type is read
from the checkpoint's tensor shapes. What shapes cannot tell (attention head counts) follows the SD1
convention: 8 U-Net heads per attention layer, CLIP heads of width 64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from library.errors import ModelLoadError

# diffusers configs of SD1.5 (runwayml/stable-diffusion-v1-5), written out so nothing is fetched.
SD15_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": False,
}

SD15_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# DDPM training schedule of SD1.x (also the base of every sampler's config).
SD1_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# The tiny model: SD1.5's block types, names and layouts, tiny widths. Four VAE levels keep SD's
# latent factor of 8, so bucket steps and latent sizes behave as with the real model.
TINY_UNET_CONFIG: dict = {
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 64,
}

TINY_VAE_CONFIG: dict = {
    **SD15_VAE_CONFIG,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "sample_size": 64,
}

TINY_TEXT_CONFIG: dict = {
    **SD15_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 1,
    "projection_dim": 64,
}

CLIP_HEAD_WIDTH = 64

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."


@dataclass(frozen=True)
class SD1Configs:
    unet: dict
    vae: dict
    text: dict


# Key patterns of families we do not train, checked before anything else so that the user gets
# "this is SDXL" rather than a wall of missing keys.
_OTHER_FAMILIES: list[tuple[str, re.Pattern]] = [
    ("SDXL", re.compile(r"^(conditioner\.embedders\.|model\.diffusion_model\.label_emb\.)")),
    ("SD3", re.compile(r"^(model\.diffusion_model\.)?joint_blocks\.")),
    ("Flux", re.compile(r"^(model\.diffusion_model\.)?(double_blocks|single_blocks)\.")),
    ("SD2.x", re.compile(r"^cond_stage_model\.model\.")),
    ("Stable Cascade", re.compile(r"^(down_levels|up_levels)\.")),
]


def detect_family(keys: list[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """Name the model family of an LDM-layout state dict: 'SD1.x' or another family's name.

    Raises ModelLoadError when the keys belong to no Stable Diffusion checkpoint we recognise.
    """
    for family, pattern in _OTHER_FAMILIES:
        if any(pattern.match(k) for k in keys):
            return family
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if not has_unet:
        if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for k in keys):
            return "a diffusers component file (one model of a diffusers folder)"
        if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_down." in k for k in keys):
            return "a LoRA network"
        if any(k in ("emb_params", "string_to_param") for k in keys):
            return "a textual-inversion embedding"
        return "unknown"
    if shapes is not None:
        context = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if context is not None and context[1] == 1024:
            return "SD2.x"
    return "SD1.x"


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise ModelLoadError(f"the checkpoint has no tensor '{key}', which every SD1.x checkpoint has; "
                             "the file is incomplete or not an SD1.x model") from None


def _indices(keys, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """diffusers UNet2DConditionModel config from an LDM state dict's shapes."""
    p = UNET_PREFIX
    keys = list(shapes)
    in_ch = _shape(shapes, p + "input_blocks.0.0.weight")
    out_ch = _shape(shapes, p + "out.2.weight")
    n_input = len(_indices(keys, p + "input_blocks."))
    # channels of every input block's first resnet, in order; downsamplers mark level ends
    widths, has_attn, down_after = [], [], []
    for i in range(1, n_input):
        if p + f"input_blocks.{i}.0.op.weight" in shapes:
            down_after.append(i)
            continue
        widths.append(_shape(shapes, p + f"input_blocks.{i}.0.out_layers.3.weight")[0])
        has_attn.append(p + f"input_blocks.{i}.1.proj_in.weight" in shapes)
    n_levels = len(down_after) + 1
    if n_levels < 1 or len(widths) % n_levels:
        raise ModelLoadError("the U-Net's input blocks do not form equal levels; this is not an SD1.x U-Net")
    layers = len(widths) // n_levels
    block_out = [widths[l * layers] for l in range(n_levels)]
    down_types = ["CrossAttnDownBlock2D" if has_attn[l * layers] else "DownBlock2D" for l in range(n_levels)]
    up_types = []
    for l in range(n_levels):
        first = l * (layers + 1)
        up_types.append("CrossAttnUpBlock2D" if p + f"output_blocks.{first}.1.proj_in.weight" in shapes else "UpBlock2D")
    attn_key = next((k for k in keys if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelLoadError("the U-Net has no cross-attention layers; this is not an SD1.x text-to-image U-Net")
    proj_in = next(k for k in keys if k.startswith(p) and k.endswith("proj_in.weight"))
    return {
        **SD15_UNET_CONFIG,
        "in_channels": in_ch[1],
        "out_channels": out_ch[0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "cross_attention_dim": _shape(shapes, attn_key)[1],
        "use_linear_projection": len(_shape(shapes, proj_in)) == 2,
    }


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    p = VAE_PREFIX
    keys = list(shapes)
    levels = _indices(keys, p + "encoder.down.")
    if not levels:
        raise ModelLoadError("the checkpoint has no VAE encoder (first_stage_model.encoder.down.*); "
                             "SD1.x single files carry their VAE")
    block_out = [_shape(shapes, p + f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels]
    layers = len(_indices(keys, p + "encoder.down.0.block."))
    latent2 = _shape(shapes, p + "encoder.conv_out.weight")[0]
    return {
        **SD15_VAE_CONFIG,
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": latent2 // 2,
    }


def infer_text_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    p = TEXT_PREFIX
    keys = list(shapes)
    vocab, width = _shape(shapes, p + "embeddings.token_embedding.weight")
    positions = _shape(shapes, p + "embeddings.position_embedding.weight")[0]
    layers = len(_indices(keys, p + "encoder.layers."))
    return {
        **SD15_TEXT_CONFIG,
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // CLIP_HEAD_WIDTH),
        "max_position_embeddings": positions,
        "projection_dim": width,
    }


def infer_configs(shapes: Mapping[str, tuple[int, ...]], source: str) -> SD1Configs:
    """All three configs of an LDM single-file checkpoint; a clear error for other families."""
    family = detect_family(list(shapes), shapes)
    if family != "SD1.x":
        raise ModelLoadError(
            f"{source}: this is {family}, not an SD1.x checkpoint; pentadactyl trains Stable Diffusion 1.x "
            "(SD1.4, SD1.5 and their fine-tunes). Point pretrained_model_name_or_path at an SD1.x "
            "single file or diffusers folder."
        )
    if not any(k.startswith(TEXT_PREFIX) for k in shapes):
        raise ModelLoadError(f"{source}: the checkpoint has no text encoder (cond_stage_model.transformer.*); "
                             "SD1.x single files carry CLIP ViT-L/14's text tower")
    return SD1Configs(unet=infer_unet_config(shapes), vae=infer_vae_config(shapes), text=infer_text_config(shapes))


def vae_scale_factor(vae_config: Mapping) -> int:
    """Pixels per latent cell: 8 for SD1.5's VAE."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def build_unet(config: Mapping, empty: bool = False) -> torch.nn.Module:
    """A diffusers UNet2DConditionModel; with `empty`, on the meta device (no init, no memory)."""
    from diffusers import UNet2DConditionModel

    return _build(lambda: UNet2DConditionModel(**config), empty)


def build_vae(config: Mapping, empty: bool = False) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return _build(lambda: AutoencoderKL(**config), empty)


def build_text_encoder(config: Mapping, empty: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return _build(lambda: CLIPTextModel(CLIPTextConfig(**config)), empty)


def _build(make, empty: bool) -> torch.nn.Module:
    if not empty:
        return make()
    from accelerate import init_empty_weights

    # parameters on meta; buffers (CLIP's position_ids) stay real because they are not in the file
    with init_empty_weights(include_buffers=False):
        return make()
