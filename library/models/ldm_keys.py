"""The mapping between SD1.x's single-file "LDM" key layout and diffusers/transformers module names.

One table per model, built from the config, used in both directions: loading renames LDM keys to
module keys, saving renames them back. Because the same table serves both, LDM → modules → LDM is
an exact round trip. diffusers' own converter is the independent check in the tests.
"""

from __future__ import annotations

from typing import Mapping

import torch

from library.models.architecture import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

_RESNET_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_prefix_pairs(config: Mapping) -> list[tuple[str, str]]:
    """(diffusers module prefix, LDM module prefix) for every U-Net block; LDM prefixes without 'model.diffusion_model.'."""
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    layers = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    n = len(down)

    def resnet(d: str, l: str) -> None:
        pairs.extend((f"{d}.{dn}", f"{l}.{ln}") for ln, dn in _RESNET_UNET.items())

    for i, kind in enumerate(down):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (layers + 1) + layers}.0.op"))
    resnet("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    resnet("mid_block.resnets.1", "middle_block.2")
    for i, kind in enumerate(up):
        attn = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            if attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
        if i < n - 1:
            k = i * (layers + 1) + layers
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attn else 1}.conv"))
    return pairs


def vae_prefix_pairs(config: Mapping) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for the VAE; LDM prefixes without 'first_stage_model.'."""
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]

    def resnet(d: str, l: str) -> None:
        pairs.extend((f"{d}.{dn}", f"{l}.{ln}") for ln, dn in _RESNET_VAE.items())

    def attention(d: str, l: str) -> None:
        pairs.extend((f"{d}.{dn}", f"{l}.{ln}") for ln, dn in _VAE_ATTN.items())

    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.conv_norm_out", f"{part}.norm_out")]
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        attention(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        ldm_level = n - 1 - i  # the decoder's LDM levels count upward from the bottom
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}")
        if i < n - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv"))
    return pairs


def _rename(keys, pairs: list[tuple[str, str]], src: int) -> dict[str, str]:
    """Map each key to its new name by the longest matching module prefix in column `src` of pairs."""
    table = {p[src]: p[1 - src] for p in pairs}
    out = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        head, rest = module, ""
        while head and head not in table:
            head, _, tail = head.rpartition(".")
            rest = f"{tail}.{rest}" if rest else tail
        if not head:
            out[key] = key  # names identical in both layouts (transformer blocks, quant convs)
            continue
        new = table[head] + (f".{rest}" if rest else "")
        out[key] = f"{new}.{leaf}"
    return out


def _is_vae_attention_projection(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith(".weight") and any(
        f".{n}.weight" in diffusers_key for n in ("to_q", "to_k", "to_v", "to_out.0"))


def unet_from_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    sub = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    names = _rename(sub, unet_prefix_pairs(config), src=1)
    return {names[k]: v for k, v in sub.items()}


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    names = _rename(state, unet_prefix_pairs(config), src=0)
    return {UNET_PREFIX + names[k]: v for k, v in state.items()}


def vae_from_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    sub = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    names = _rename(sub, vae_prefix_pairs(config), src=1)
    out = {}
    for k, v in sub.items():
        new = names[k]
        # LDM's VAE attention uses 1×1 convs where diffusers uses Linear layers
        out[new] = v[:, :, 0, 0] if _is_vae_attention_projection(new) and v.ndim == 4 else v
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    names = _rename(state, vae_prefix_pairs(config), src=0)
    return {VAE_PREFIX + names[k]: (v[:, :, None, None] if _is_vae_attention_projection(k) and v.ndim == 2 else v)
            for k, v in state.items()}


def text_module_prefix(text_encoder: torch.nn.Module) -> str:
    """'' under transformers ≥ 5 (no text_model submodule), 'text_model.' before."""
    return "text_model." if any(k.startswith("text_model.") for k in text_encoder.state_dict()) else ""


def text_from_ldm(state: Mapping[str, torch.Tensor], module_prefix: str = "") -> dict[str, torch.Tensor]:
    """CLIP text weights from an LDM dict; position_ids (a buffer, not a weight) is dropped."""
    return {module_prefix + k[len(TEXT_PREFIX):]: v for k, v in state.items()
            if k.startswith(TEXT_PREFIX) and not k.endswith("position_ids")}


def text_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        out[TEXT_PREFIX + k] = v
    return out
