"""Using LoRA files on a model: build a patching network from any supported file, or merge files in.

`merge_weights` adds a file's update into the weights (fastest per step); `network_from_weights` builds a
patching network (reversible, multiplier changeable). library/sampling/networks.py chooses between them
for sample.py and the tests. Plain LoRA/LoCon modules patch with their low-rank branch; LyCORIS' LoHa,
LoKr, (IA)^3 and DoRA modules (networks/algorithms.py) with their full weight change, recomputed in each
forward from the file's tensors (nothing the size of a weight is kept per module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import ConfigError, NetworkFileError
from networks.algorithms import LORA, algorithm_of, alpha_of, effective_delta, fit_problem, rank_of
from networks.files import group_by_module, normalize_names
from networks.locon import ForwardPatch, LoConModule, LoConNetwork, add_delta_
from networks.names import DORA_SCALE, MID, unet_block_index
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
    weight_shape = tuple(layer.module.weight.shape)
    problem = fit_problem(parts, weight_shape)
    if problem is not None:
        raise NetworkFileError(
            f"{source}: {name} {problem}, which does not fit the model layer "
            f"{layer.path} of shape {list(weight_shape)}; the LoRA was made for another base model "
            "(SD2.x / SDXL?)"
        )


class WeightChangePatch(ForwardPatch):
    """A file module applied through its whole weight change D = W' − W: base(x) + multiplier · op(x, D).

    For the LyCORIS algorithms whose update is no low-rank branch (LoHa, LoKr, (IA)^3) and for DoRA, whose
    update depends on the base weight. D is recomputed from the file's tensors in every forward, in float32,
    so nothing the size of the weight is kept."""

    def __init__(self, target: Target, base: nn.Linear | nn.Conv2d, parts: Mapping[str, torch.Tensor],
                 source: str) -> None:
        super().__init__(target, base)
        self.source = source
        self.part_names = list(parts)
        for index, (part, value) in enumerate(parts.items()):
            self.register_buffer(f"part{index}", value.detach().to(base.weight.device), persistent=False)

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        return {part: getattr(self, f"part{i}") for i, part in enumerate(self.part_names)}

    def weight_change(self) -> torch.Tensor:
        return effective_delta(self.parts, self.base.weight.detach(), self.source)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        change = self.weight_change().to(x.dtype)
        if isinstance(base, nn.Conv2d):
            out = F.conv2d(x, change, None, base.stride, base.padding, base.dilation, base.groups)
        else:
            out = F.linear(x, change)
        return out * self.multiplier

    @torch.no_grad()
    def merge_into_base(self, multiplier: float) -> None:
        add_delta_(self.base.weight, self.weight_change(), multiplier)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return self.parts


def network_from_weights(
    tensors: Mapping[str, torch.Tensor],
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    multiplier: float = 1.0,
    source: str = "the LoRA file",
) -> LoConNetwork:
    """A patching network that reproduces any supported file (ranks, alphas and algorithm per module)."""
    renamed = normalize_names(tensors)
    modules = group_by_module(renamed)
    matched = match_modules(modules, unet, text_encoder, source)
    patches: dict[str, ForwardPatch] = {}
    for name, layer in matched.items():
        parts = modules[name]
        block = unet_block_index(layer.path) if layer.model == "unet" else None
        rank, alpha = rank_of(parts) or 0, alpha_of(parts)
        target = Target(name, layer.path, layer.model, part_of(layer.model, layer.path), layer.kind, block,
                        rank, float(rank) if alpha is None else alpha)
        if algorithm_of(parts) == LORA and DORA_SCALE not in parts:
            patches[name] = LoConModule(target, layer.module, tucker=MID in parts)
        else:
            patches[name] = WeightChangePatch(target, layer.module, parts, source)
    network = LoConNetwork(patches)
    # modules of a model that was not given (e.g. no text encoder) are left out
    lora = {n for n, m in patches.items() if isinstance(m, LoConModule)}
    network.load_kohya_state_dict({k: v for k, v in renamed.items() if k.split(".", 1)[0] in lora},
                                  strict=False, source=source)
    network.set_multiplier(multiplier)
    return network


@torch.no_grad()
def merge_weights(
    tensors: Mapping[str, torch.Tensor],
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    multiplier: float = 1.0,
    source: str = "the LoRA file",
) -> int:
    """Fold a file (LoRA/LoCon incl. lora_mid, LoHa, LoKr, (IA)^3, DoRA) into the model weights; returns
    the number of modules merged."""
    modules = group_by_module(normalize_names(tensors))
    matched = match_modules(modules, unet, text_encoder, source)
    for name, layer in matched.items():
        weight = layer.module.weight
        add_delta_(weight, effective_delta(modules[name], weight, source), multiplier)
    return len(matched)
