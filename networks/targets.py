"""Which modules a network patches, as data: module-path patterns per part, and rank/alpha rules.

Selection is by module path (the role a module plays), never by class name: transformers and diffusers
rename classes between versions, while the paths are what the file format is written in.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from networks.names import te_kohya_name, unet_block_index, unet_kohya_name
from networks.spec import NetworkSpec

# Parts of a network, in the order files and tables list them.
TE = "te"
UNET_ATTENTION = "unet_attention"
UNET_CONV = "unet_conv"
UNET_OTHER = "unet_other"
TE_OTHER = "te_other"
PART_TITLES: dict[str, str] = {
    TE: "text encoder",
    UNET_ATTENTION: "U-Net attention",
    UNET_CONV: "U-Net conv (LoCon)",
    UNET_OTHER: "U-Net, outside the kohya sets",
    TE_OTHER: "text encoder, outside the kohya set",
}

_BLOCK = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)"
_TRANSFORMER = rf"{_BLOCK}\.attentions\.\d+"
_QKVO = r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"

# sd-scripts' attention set: every Linear / 1x1 conv of a Transformer2DModel (16 blocks x 12 = 192).
UNET_ATTENTION_ALL = re.compile(
    rf"^{_TRANSFORMER}\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:{_QKVO}|ff\.net\.0\.proj|ff\.net\.2))$"
)
# PEFT / diffusers-script style: the attention projections only (16 x 8 = 128).
UNET_ATTENTION_QKVO = re.compile(rf"^{_TRANSFORMER}\.transformer_blocks\.\d+\.{_QKVO}$")
# LoCon: the convolutions and time projection of resnets, and the samplers' convs (86 on SD1.5).
UNET_CONV_ALL = re.compile(
    rf"^{_BLOCK}\.(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$"
)
# Text encoder: CLIPAttention and CLIPMLP linears (12 layers x 6 = 72); `text_model.` is optional
# because transformers >= 5 dropped that level.
TE_ALL = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
TE_QKVO = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj$")


@dataclass(frozen=True)
class TargetSet:
    part: str
    pattern: re.Pattern
    model: str  # "unet" or "text_encoder"


PRESET_SETS: dict[str, dict[str, TargetSet]] = {
    "attention": {
        UNET_ATTENTION: TargetSet(UNET_ATTENTION, UNET_ATTENTION_ALL, "unet"),
        TE: TargetSet(TE, TE_ALL, "text_encoder"),
    },
    "attention_qkvo": {
        UNET_ATTENTION: TargetSet(UNET_ATTENTION, UNET_ATTENTION_QKVO, "unet"),
        TE: TargetSet(TE, TE_QKVO, "text_encoder"),
    },
}
CONV_SET = TargetSet(UNET_CONV, UNET_CONV_ALL, "unet")


def target_sets(spec: NetworkSpec) -> list[TargetSet]:
    """The sets a spec trains: text encoder first, then U-Net attention, then U-Net conv."""
    sets = PRESET_SETS[spec.preset]
    chosen: list[TargetSet] = []
    if spec.train_text_encoder:
        chosen.append(sets[TE])
    if spec.train_unet:
        chosen.append(sets[UNET_ATTENTION])
        if spec.trains_conv:
            chosen.append(CONV_SET)
    return chosen


# --- module kinds and the rank each gets ------------------------------------------------------------
LINEAR = "linear"
CONV1X1 = "conv1x1"
CONV = "conv"  # k x k, k > 1: the LoCon case


def module_kind(module: nn.Module) -> str | None:
    """linear / conv1x1 / conv for the layers a LoRA can wrap; None for anything else."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV1X1 if tuple(module.kernel_size) == (1, 1) else CONV
    return None


def rank_and_alpha(spec: NetworkSpec, part: str, kind: str, block: int | None) -> tuple[int, float]:
    """Rank and alpha of one module; rank 0 means "skip it". Alpha None in the spec means alpha = rank.

    In the U-Net, k x k convs take the conv numbers; Linears and 1x1 convs (also those of the conv set,
    as sd-scripts does) take the linear numbers. Block-wise values replace the global ones per block.
    """
    if part == TE:
        rank, alpha = spec.te_dim, spec.te_alpha
    elif kind == CONV:
        rank, alpha = spec.conv_dim or 0, spec.conv_alpha
        if spec.conv_block_dims is not None and block is not None:
            rank = spec.conv_block_dims[block]
        if spec.conv_block_alphas is not None and block is not None:
            alpha = spec.conv_block_alphas[block]
    else:
        rank, alpha = spec.network_dim, spec.network_alpha
        if spec.block_dims is not None and block is not None:
            rank = spec.block_dims[block]
        if spec.block_alphas is not None and block is not None:
            alpha = spec.block_alphas[block]
    return rank, float(rank if alpha is None else alpha)


@dataclass(frozen=True)
class Target:
    """One module a network patches."""

    kohya_name: str
    path: str  # dotted path inside its model
    model: str  # "unet" or "text_encoder"
    part: str
    kind: str
    block: int | None  # SD1 block slot 0..24 for U-Net modules
    rank: int
    alpha: float


def kohya_name_for(model: str, path: str) -> str:
    return unet_kohya_name(path) if model == "unet" else te_kohya_name(path)


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(path, module, kind) of every Linear / Conv2d in a model."""
    for path, module in model.named_modules():
        kind = module_kind(module)
        if kind is not None:
            yield path, module, kind


def select_targets(
    spec: NetworkSpec, unet: nn.Module | None, text_encoder: nn.Module | None
) -> list[tuple[Target, nn.Module]]:
    """Every (target, module) the spec trains, in a stable order (text encoder, then U-Net)."""
    models = {"unet": unet, "text_encoder": text_encoder}
    selected: list[tuple[Target, nn.Module]] = []
    seen: set[str] = set()
    for target_set in target_sets(spec):
        model = models[target_set.model]
        if model is None:
            continue
        for path, module, kind in iter_layers(model):
            if not target_set.pattern.match(path):
                continue
            block = unet_block_index(path) if target_set.model == "unet" else None
            rank, alpha = rank_and_alpha(spec, target_set.part, kind, block)
            name = kohya_name_for(target_set.model, path)
            if rank <= 0 or name in seen:
                continue
            seen.add(name)
            selected.append((Target(name, path, target_set.model, target_set.part, kind, block, rank, alpha), module))
    return selected


def part_of(model: str, path: str) -> str:
    """The part a module belongs to whatever the preset (for reports on third-party files)."""
    if model == "text_encoder":
        return TE if TE_ALL.match(path) else TE_OTHER
    if UNET_ATTENTION_ALL.match(path):
        return UNET_ATTENTION
    if UNET_CONV_ALL.match(path):
        return UNET_CONV
    return UNET_OTHER


# --- the SD1.5 module table (names and shapes), for checking files against the real layout -----------
@dataclass(frozen=True)
class LayerInfo:
    kohya_name: str
    path: str
    model: str
    part: str
    kind: str
    block: int | None
    in_features: int
    out_features: int
    kernel: tuple[int, int] | None


def layer_table(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, LayerInfo]:
    """kohya name -> layer facts for every Linear / Conv2d of the given models (meta models work)."""
    table: dict[str, LayerInfo] = {}
    for model_name, model in (("text_encoder", text_encoder), ("unet", unet)):
        if model is None:
            continue
        for path, module, kind in iter_layers(model):
            if isinstance(module, nn.Conv2d):
                dims = (module.in_channels, module.out_channels, tuple(module.kernel_size))
            else:
                dims = (module.in_features, module.out_features, None)
            name = kohya_name_for(model_name, path)
            block = unet_block_index(path) if model_name == "unet" else None
            table[name] = LayerInfo(name, path, model_name, part_of(model_name, path), kind, block, *dims)
    return table


@functools.lru_cache(maxsize=1)
def sd15_layer_table() -> dict[str, LayerInfo]:
    """The table of SD1.5 itself, built on the meta device (no weights, no memory)."""
    from library.models.architecture import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, build_text_encoder, build_unet

    unet = build_unet(SD15_UNET_CONFIG, empty=True)
    text_encoder = build_text_encoder(SD15_TEXT_CONFIG, empty=True)
    return layer_table(unet, text_encoder)
