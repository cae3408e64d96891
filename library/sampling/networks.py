"""LoRA files on the sampling model: merged (fast, multiplier fixed) or patched (multiplier changeable).

    loaded = load_sampling_networks(["style.safetensors:0.75", "mine.safetensors"])
    modes = choose_network_modes(len(loaded), sweep_index=1, mode="auto")   # ["merge", "patch"]
    attach_networks(loaded, modes, unet, text_encoder)
    loaded[1].set_multiplier(0.5)                                           # patched ones only

"auto" merges every network whose multiplier is fixed for the run and patches the one being swept.
Merging changes the loaded model's weights in place; sample.py owns that model, so nothing is undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from library.errors import ConfigError
from library.sampling.infotext import lora_short_hash
from library.sampling.pipeline import NetworkLabel

NETWORK_MODES = ("auto", "merge", "patch")


@dataclass
class LoadedNetwork:
    path: Path
    multiplier: float
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    short_hash: str
    patched: object | None = field(default=None, repr=False)  # a networks.LoConNetwork when patched

    @property
    def name(self) -> str:
        """The name WebUI uses in `<lora:name:m>`: the file's base name."""
        return self.path.stem

    def label(self) -> NetworkLabel:
        return NetworkLabel(self.name, self.multiplier, self.short_hash)

    def set_multiplier(self, multiplier: float) -> None:
        if self.patched is None:
            raise RuntimeError(f"{self.path.name} is merged into the model; its multiplier is fixed")
        self.patched.set_multiplier(multiplier)
        self.multiplier = float(multiplier)


def load_sampling_networks(entries: Sequence[str]) -> list[LoadedNetwork]:
    """Read "file.safetensors[:multiplier]" entries (errors name the file and the fix)."""
    from networks import load_network_file, parse_network_arg

    loaded = []
    for entry in entries:
        arg = parse_network_arg(entry)
        tensors, metadata = load_network_file(arg.path)
        loaded.append(LoadedNetwork(arg.path, arg.multiplier, tensors, metadata,
                                    lora_short_hash(arg.path, metadata)))
    return loaded


def find_network(loaded: Sequence[LoadedNetwork], name: str | None) -> int:
    """Index of the network named by `name` (as listed, its file name or its base name); None → 0."""
    if not loaded:
        raise ConfigError("sweep_multipliers needs a network to sweep: add one to 'networks'.")
    if name is None:
        return 0
    for index, network in enumerate(loaded):
        if name in (str(network.path), network.path.name, network.name):
            return index
    raise ConfigError(f"sweep_network '{name}' is not one of the networks: "
                      f"{', '.join(n.path.name for n in loaded)}.")


def choose_network_modes(count: int, sweep_index: int | None, mode: str = "auto") -> list[str]:
    """Per network: "merge" or "patch". A swept network must be patched (its multiplier changes)."""
    if mode not in NETWORK_MODES:
        raise ConfigError(f"network_mode '{mode}' must be one of {', '.join(NETWORK_MODES)}.")
    if mode == "merge" and sweep_index is not None:
        raise ConfigError("network_mode = \"merge\" fixes every multiplier, so sweep_multipliers cannot change "
                          "one; use network_mode = \"auto\" (merges the others, patches the swept one).")
    if mode == "patch":
        return ["patch"] * count
    return ["patch" if i == sweep_index else "merge" for i in range(count)]


def attach_networks(loaded: Sequence[LoadedNetwork], modes: Sequence[str], unet, text_encoder) -> None:
    """Merge or patch each network into the U-Net / text encoder with its multiplier."""
    from networks import merge_weights, network_from_weights

    for network, mode in zip(loaded, modes):
        if mode == "merge":
            merge_weights(network.tensors, unet, text_encoder, network.multiplier, str(network.path))
        else:
            patched = network_from_weights(network.tensors, unet, text_encoder, network.multiplier, str(network.path))
            patched.eval()
            patched.apply_to()
            network.patched = patched


def detach_networks(loaded: Sequence[LoadedNetwork]) -> None:
    """Un-patch the patched networks (merged ones stay in the weights)."""
    for network in reversed(loaded):
        if network.patched is not None:
            network.patched.restore()
            network.patched = None
