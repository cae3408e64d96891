"""Using LoRA files on a model: build a patching network from any supported file, or merge files in.

`merge_weights` adds a file's update into the weights (fastest per step); `network_from_weights` builds a
patching network (reversible, multiplier changeable). library/sampling/networks.py chooses between them
for sample.py and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from library.errors import ConfigError, NetworkFileError
from networks.files import group_by_module, module_alpha, module_rank, normalize_names
from networks.locon import LoConModule, LoConNetwork, add_delta_, lora_delta
from networks.names import DORA_SCALE, DOWN, MID, UP, unet_block_index
from networks.targets import Target, iter_layers, kohya_name_for, part_of


@dataclass(frozen=True)
class NetworkFileArg:
    path: Path
    multiplier: float


def parse_network_arg(text: str) -> NetworkFileArg:
    """"file.safetensors:0.75" -> (file, 0.75); no ":number" suffix means multiplier 1.

    Only a trailing ":<number>" is a multiplier, so Windows drive letters ("C:\\x.safetensors") work.
    """
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return NetworkFileArg(Path(head), float(tail))
        except ValueError:
            pass
    if text.endswith(":"):
        raise ConfigError(f"network {text!r}: write the multiplier after the colon, e.g. {text}0.75")
    return NetworkFileArg(Path(text), 1.0)


@dataclass(frozen=True)
class _Layer:
    model: str
    path: str
    module: nn.Linear | nn.Conv2d
    kind: str


def _layers_by_name(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, _Layer]:
    layers: dict[str, _Layer] = {}
    for model_name, model in (("text_encoder", text_encoder), ("unet", unet)):
        if model is None:
            continue
        for path, module, kind in iter_layers(model):
            layers[kohya_name_for(model_name, path)] = _Layer(model_name, path, module, kind)  # type: ignore[arg-type]
    return layers


def match_modules(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    source: str,
) -> dict[str, _Layer]:
    """The model layer of every file module, with shape checks; modules of a model not given are skipped."""
    layers = _layers_by_name(unet, text_encoder)
    given = {"unet": unet is not None, "text_encoder": text_encoder is not None}
    matched: dict[str, _Layer] = {}
    unmapped: list[str] = []
    for name, parts in modules.items():
        layer = layers.get(name)
        if layer is None:
            model = "text_encoder" if name.startswith("lora_te_") else "unet"
            if given[model]:
                unmapped.append(name)
            continue
        _check_shapes(name, parts, layer, source)
        matched[name] = layer
    if unmapped:
        raise NetworkFileError(
            f"{source}: {len(unmapped)} module(s) match no layer of this SD1 model, e.g. {', '.join(unmapped[:3])}; "
            "the LoRA was made for another model family (SD2.x / SDXL?) or uses names we cannot map"
        )
    return matched


def _check_shapes(name: str, parts: Mapping[str, torch.Tensor], layer: _Layer, source: str) -> None:
    module = layer.module
    weight_shape = tuple(module.weight.shape)
    down, up = tuple(parts[DOWN].shape), tuple(parts[UP].shape)
    rank = down[0]
    expected_in, expected_out = weight_shape[1], weight_shape[0]
    ok = len(down) >= 2 and down[1] == expected_in and up[0] == expected_out and up[1] == rank
    if MID in parts:
        ok = ok and tuple(parts[MID].shape[:2]) == (rank, up[1])
    if not ok:
        raise NetworkFileError(
            f"{source}: {name} has down {list(down)} / up {list(up)}, which does not fit the model layer "
            f"{layer.path} of shape {list(weight_shape)}; the LoRA was made for another base model "
            "(SD2.x / SDXL?)"
        )


def network_from_weights(
    tensors: Mapping[str, torch.Tensor],
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    multiplier: float = 1.0,
    source: str = "the LoRA file",
) -> LoConNetwork:
    """A patching network that reproduces any LoRA/LoCon file (ranks and alphas per module from the file)."""
    renamed = normalize_names(tensors)
    modules = group_by_module(renamed)
    matched = match_modules(modules, unet, text_encoder, source)
    locon: dict[str, LoConModule] = {}
    for name, layer in matched.items():
        parts = modules[name]
        if DORA_SCALE in parts:
            raise NetworkFileError(f"{source}: {name} is a DoRA module (dora_scale); DoRA files can be merged "
                                   "into the model (the default for sampling) but not patched")
        block = unet_block_index(layer.path) if layer.model == "unet" else None
        target = Target(name, layer.path, layer.model, part_of(layer.model, layer.path), layer.kind, block,
                        module_rank(parts), module_alpha(parts))
        locon[name] = LoConModule(target, layer.module, tucker=MID in parts)
    network = LoConNetwork(locon)
    # modules of a model that was not given (e.g. no text encoder) are left out
    network.load_kohya_state_dict({k: v for k, v in renamed.items() if k.split(".", 1)[0] in locon},
                                  strict=False, source=source)
    network.set_multiplier(multiplier)
    return network


def dora_weight(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, source: str) -> torch.Tensor:
    """DoRA: magnitude * (W + dW) / ||W + dW||, the norm taken per output row or per input column
    as the shape of `dora_scale` says ([out, 1, ...] or [1, in, ...])."""
    combined = base + delta
    scale = dora_scale.float()
    if scale.shape[0] == combined.shape[0] and scale.numel() == combined.shape[0]:
        norm = combined.flatten(1).norm(dim=1).reshape(scale.shape)
    elif scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] == combined.shape[1]:
        dims = [0] + list(range(2, combined.dim()))
        norm = combined.norm(dim=dims, keepdim=True).reshape(scale.shape)
    else:
        raise NetworkFileError(f"{source}: dora_scale of shape {list(scale.shape)} fits neither the output "
                               f"nor the input size of a layer of shape {list(combined.shape)}")
    return combined * (scale / norm)


@torch.no_grad()
def merge_weights(
    tensors: Mapping[str, torch.Tensor],
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    multiplier: float = 1.0,
    source: str = "the LoRA file",
) -> int:
    """Fold a LoRA/LoCon file (incl. lora_mid and dora_scale) into the model weights; returns modules merged."""
    modules = group_by_module(normalize_names(tensors))
    matched = match_modules(modules, unet, text_encoder, source)
    for name, layer in matched.items():
        parts = modules[name]
        weight = layer.module.weight
        down = parts[DOWN].to(weight.device, torch.float32)
        up = parts[UP].to(weight.device, torch.float32)
        mid = parts[MID].to(weight.device, torch.float32) if MID in parts else None
        scale = module_alpha(parts) / module_rank(parts)
        delta = lora_delta(down, up, mid, scale, tuple(weight.shape))
        if DORA_SCALE in parts:
            base = weight.float()
            new = dora_weight(base, delta, parts[DORA_SCALE].to(weight.device), source)
            weight.copy_((base + multiplier * (new - base)).to(weight.dtype))
        else:
            add_delta_(weight, delta, multiplier)
    return len(matched)
