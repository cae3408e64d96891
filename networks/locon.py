"""The LoRA / LoCon module and the network that patches a U-Net and text encoder with it.

A `LoConModule` wraps one Linear or Conv2d of the base model by replacing that module's `forward`
(the base weights are neither copied nor changed):

    y = base(x) + multiplier * (alpha / rank) * up(down(x))

- Linear and 1x1 conv: down and up are Linear / 1x1 convs (rank r).
- k x k conv (LoCon): down is a k x k conv with the base conv's stride/padding/dilation, up is 1x1.
- `up` starts at zero, so a fresh network is exactly the identity.
- Files from LyCORIS may add a Tucker core (`lora_mid`: 1x1 down, k x k mid, 1x1 up); it is supported
  for loading and sampling.

The patching itself (`ForwardPatch`) is shared with the modules networks/apply.py builds for LyCORIS' other
algorithms when it samples with their files.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import ConfigError, NetworkFileError
from networks.names import ALPHA, DORA_SCALE, DOWN, MID, UP, to_diffusers_name
from networks.spec import NetworkSpec
from networks.targets import CONV, TE, Target, select_targets


class ForwardPatch(nn.Module):
    """Routes one base layer's `forward` through `patched_forward` (the base weights are neither copied nor
    changed): base(x) + `branch(x)`, with `multiplier` 0 meaning off. Stackable: several networks may patch
    one layer, and are restored in the reverse order."""

    def __init__(self, target: Target, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.target = target
        self.multiplier = 1.0
        # Held outside the module tree (plain __dict__ entry) so that the network's parameters and
        # state_dict never include, move or duplicate the frozen base layer.
        self.__dict__["base"] = base
        self.__dict__["_previous_forward"] = None
        self.__dict__["_patched"] = False

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (stackable: several networks at once)."""
        if self._patched:
            return
        base = self.base
        self.__dict__["_previous_forward"] = base.__dict__.get("forward")
        self.__dict__["_inner_forward"] = base.forward  # the class forward or an earlier network's patch
        base.forward = self.patched_forward
        self.__dict__["_patched"] = True

    def restore(self) -> None:
        if not self._patched:
            return
        base = self.base
        if base.__dict__.get("forward") != self.patched_forward:
            raise RuntimeError(
                f"{self.target.kohya_name}: another network patched this layer after this one; "
                "restore networks in the reverse order of apply_to()"
            )
        if self._previous_forward is None:
            del base.forward
        else:
            base.forward = self._previous_forward
        self.__dict__["_patched"] = False

    def patched_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._inner_forward(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return out
        return self.add_branch(out, x)

    def add_branch(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output `out` plus what this module adds for input x."""
        branch = self.branch(x)
        return out if branch is None else out + branch.to(out.dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor | None:
        """What this module adds to the base layer's output for input x (None: nothing this time)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_into_base(self, multiplier: float) -> None:
        raise NotImplementedError

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """This module's tensors as a kohya file names them after `<name>.`."""
        raise NotImplementedError


class LoConModule(ForwardPatch):
    """Low-rank update of one base layer. Its parameters are the file's lora_down / lora_up (/ lora_mid);
    alpha is kept as a float and written as the file's float32 `alpha`."""

    def __init__(
        self,
        target: Target,
        base: nn.Linear | nn.Conv2d,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        tucker: bool = False,
    ) -> None:
        super().__init__(target, base)
        self.rank = target.rank
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

        device = base.weight.device
        r = target.rank
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"{target.kohya_name}: grouped convolutions cannot take a LoCon module")
            kernel = tuple(base.kernel_size)
            if tucker and kernel != (1, 1):
                # LyCORIS Tucker: 1x1 down, k x k core, 1x1 up
                self.lora_down = nn.Conv2d(base.in_channels, r, 1, bias=False, device=device)
                self.lora_mid = nn.Conv2d(r, r, kernel, base.stride, base.padding, base.dilation,
                                          bias=False, device=device)
            else:
                self.lora_down = nn.Conv2d(base.in_channels, r, kernel, base.stride, base.padding,
                                           base.dilation, bias=False, device=device)
                self.lora_mid = None
            self.lora_up = nn.Conv2d(r, base.out_channels, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(base.in_features, r, bias=False, device=device)
            self.lora_mid = None
            self.lora_up = nn.Linear(r, base.out_features, bias=False, device=device)
        # alpha is a setting, not trained state: a Python float (no device sync when scaling each step);
        # kohya_state_dict() writes it out as the file's float32 `alpha` tensor
        self.alpha = float(target.alpha)
        # down: kaiming-uniform(a=sqrt(5)) like nn.Linear's default; up: zeros -> identity at start
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return isinstance(self.lora_down, nn.Conv2d)

    def branch(self, x: torch.Tensor) -> torch.Tensor | None:
        # CPU RNG on purpose: gradient checkpointing restores it on recompute, and it needs no GPU sync
        if self.training and self.module_dropout > 0.0 and float(torch.rand(())) < self.module_dropout:
            return None
        return self.lora_output(x)

    def add_branch(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dropping = self.training and max(self.dropout, self.rank_dropout, self.module_dropout) > 0.0
        if dropping or self.lora_mid is not None:
            return super().add_branch(out, x)  # through branch(): the dropouts and the Tucker core
        return self._fused_add(out, x)

    def _fused_add(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + multiplier * scale * up(down(x)) with the up-projection and the sum as one matrix product
        (addmm / baddbmm) on the base output: no separate up output, scaling or addition pass over a tensor
        the size of the layer's output, and no convolution for the 1x1 up of a LoCon module."""
        dtype, rank = out.dtype, self.rank
        weight = self.multiplier * self.scale
        down, up = self.lora_down.weight.to(dtype), self.lora_up.weight.to(dtype)
        if not self.is_conv:
            h = F.linear(x.to(dtype), down)
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, rank), up.t(),
                               alpha=weight).view(out.shape)
        h = F.conv2d(x.to(dtype), down, None, self.lora_down.stride, self.lora_down.padding, self.lora_down.dilation)
        n, channels, height, width = out.shape
        up = up.view(channels, rank)
        last = torch.channels_last
        if out.is_contiguous(memory_format=last) and h.is_contiguous(memory_format=last):
            # channels-last: (N·H·W, C) views of both, one addmm, viewed back as a channels-last NCHW tensor
            summed = torch.addmm(out.permute(0, 2, 3, 1).reshape(-1, channels),
                                 h.permute(0, 2, 3, 1).reshape(-1, rank), up.t(), alpha=weight)
            return summed.view(n, height, width, channels).permute(0, 3, 1, 2)
        return torch.baddbmm(out.reshape(n, channels, -1), up.expand(n, channels, rank), h.reshape(n, rank, -1),
                             alpha=weight).view(out.shape)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {DOWN: self.lora_down.weight.detach(), UP: self.lora_up.weight.detach()}
        if self.lora_mid is not None:
            tensors[MID] = self.lora_mid.weight.detach()
        tensors[ALPHA] = torch.tensor(self.alpha, dtype=torch.float32)
        return tensors

    # --- the low-rank branch ------------------------------------------------------------------------
    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * up(mid(down(x))), computed in x's dtype (frozen fp16/bf16 bases, fp32 LoRA)."""
        dtype = x.dtype
        h = self._layer(self.lora_down, x, dtype)
        if self.training and self.dropout > 0.0:
            h = F.dropout(h, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout > 0.0:
            # drop whole rank channels per sample; rescale so the expected update is unchanged
            shape = [h.shape[0]] + [1] * (h.dim() - 1)
            rank_dim = 1 if self.is_conv else h.dim() - 1
            shape[rank_dim] = self.rank
            mask = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
            h = h * mask
            scale = scale / (1.0 - self.rank_dropout)
        if self.lora_mid is not None:
            h = self._layer(self.lora_mid, h, dtype)
        h = self._layer(self.lora_up, h, dtype)
        return h * (self.multiplier * scale)

    @staticmethod
    def _layer(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight = layer.weight.to(dtype)
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x.to(dtype), weight, None, layer.stride, layer.padding, layer.dilation)
        return F.linear(x.to(dtype), weight)

    # --- merging ------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scale * up @ (mid) @ down in float32, shaped like the base weight."""
        return lora_delta(
            self.lora_down.weight.float(), self.lora_up.weight.float(),
            None if self.lora_mid is None else self.lora_mid.weight.float(),
            self.scale, tuple(self.base.weight.shape),
        )

    @torch.no_grad()
    def merge_into_base(self, multiplier: float) -> None:
        add_delta_(self.base.weight, self.delta_weight().to(self.base.weight.device), multiplier)


def lora_delta(
    down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """The weight change scale * up @ down (with an optional Tucker core), reshaped to `shape`."""
    if mid is None:
        delta = up.flatten(1) @ down.flatten(1)
    else:
        # W[o, i, kh, kw] = sum_ab up[o, a] * mid[a, b, kh, kw] * down[b, i]
        delta = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1))
    return delta.mul_(scale).reshape(shape)


@torch.no_grad()
def add_delta_(weight: torch.Tensor, delta: torch.Tensor, multiplier: float) -> None:
    """weight += multiplier * delta, in place; low-precision weights are summed in float32 first.

    In place on purpose: merging a whole SD1.5 network touches ~0.8 G numbers, and temporaries the size
    of each weight dominate the time.
    """
    if weight.dtype == delta.dtype:
        weight.add_(delta, alpha=multiplier)
    else:
        weight.copy_(weight.float().add_(delta, alpha=multiplier).to(weight.dtype))


class LoConNetwork(nn.Module):
    """All LoCon modules of one network, keyed by kohya name (dict order = file order)."""

    def __init__(self, modules: Mapping[str, LoConModule], spec: NetworkSpec | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.locon = nn.ModuleDict()
        for name, module in modules.items():
            self.locon[name] = module
        self.multiplier = 1.0
        self.merged_multiplier: float | None = None

    # ModuleDict keys cannot hold "." but kohya names never do, so the names are used as-is.
    def __getitem__(self, name: str) -> LoConModule:
        return self.locon[name]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.locon)

    def names(self) -> list[str]:
        return list(self.locon.keys())

    def modules_of(self, *parts: str) -> list[LoConModule]:
        return [m for m in self.locon.values() if not parts or m.target.part in parts]  # type: ignore[union-attr]

    # --- patching -----------------------------------------------------------------------------------
    def apply_to(self) -> None:
        """Patch every targeted layer's forward. The base models are not modified otherwise."""
        if self.merged_multiplier is not None:
            raise RuntimeError("this network is already merged into the base weights; applying it again "
                               "would count it twice")
        for module in self.locon.values():
            module.apply_to()

    def restore(self) -> None:
        for module in reversed(list(self.locon.values())):
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        """Takes effect on the next forward; 0 turns the network off without un-patching."""
        self.multiplier = float(multiplier)
        for module in self.locon.values():
            module.multiplier = self.multiplier

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """Fold the network into the base weights: W += multiplier * alpha/r * up @ down.

        Un-patches first (a patched and merged network would count twice). Afterwards the base models
        behave like the patched ones without the per-step cost of the extra branch.
        """
        if self.merged_multiplier is not None:
            raise RuntimeError("this network is already merged into the base weights")
        m = self.multiplier if multiplier is None else float(multiplier)
        self.restore()
        for module in self.locon.values():
            module.merge_into_base(m)
        self.merged_multiplier = m

    # --- training -----------------------------------------------------------------------------------
    def param_groups(self, unet_lr: float | None, text_encoder_lr: float | None) -> list[dict[str, Any]]:
        """Optimizer groups per part; a part with lr None or 0 is frozen (requires_grad off) and left out."""
        groups: list[dict[str, Any]] = []
        for model, lr in (("text_encoder", text_encoder_lr), ("unet", unet_lr)):
            params = [p for m in self.locon.values() if m.target.model == model for p in m.parameters()]
            if not params:
                continue
            trainable = bool(lr)
            for p in params:
                p.requires_grad_(trainable)
            if trainable:
                groups.append({"params": params, "lr": float(lr), "name": model})
        return groups

    def parameter_count(self, *parts: str) -> int:
        return sum(p.numel() for m in self.modules_of(*parts) for p in m.parameters())

    # --- kohya files --------------------------------------------------------------------------------
    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (+ lora_mid) per module."""
        return {f"{name}.{part}": value for name, module in self.locon.items()
                for part, value in module.kohya_tensors().items()}

    @torch.no_grad()
    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True,
                              source: str = "the network file") -> None:
        """Copy a kohya state dict (our names) into this network.

        A shape mismatch is always an error (it means a different rank or a different base model).
        With `strict`, modules missing on either side and a different alpha are errors too.
        """
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, _, part = key.partition(".")
            # files from other tools may use LDM-style or transformers-5-style names
            by_module.setdefault(to_diffusers_name(module), {})[part] = value
        unknown = [n for n in by_module if n not in self.locon]
        missing = [n for n in self.locon if n not in by_module]
        if strict and unknown:
            raise NetworkFileError(
                f"{source}: {len(unknown)} module(s) are not part of this network, e.g. {unknown[0]}; "
                "it was trained with other target settings (preset, conv_dim, text encoder on/off). "
                "Match the job's network settings to the file."
            )
        if strict and missing:
            raise NetworkFileError(
                f"{source}: {len(missing)} module(s) of this network are missing from the file, e.g. {missing[0]}; "
                "it was trained with other target settings (preset, conv_dim, block_dims, text encoder on/off)."
            )
        for name, parts in by_module.items():
            if name not in self.locon:
                continue
            module: LoConModule = self.locon[name]  # type: ignore[assignment]
            if DORA_SCALE in parts:
                raise NetworkFileError(f"{source}: {name} is a DoRA module (dora_scale); DoRA cannot be "
                                       "patched or resumed, only merged (sampling merges it)")
            if (MID in parts) != (module.lora_mid is not None):
                raise NetworkFileError(f"{source}: {name} {'has' if MID in parts else 'lacks'} a Tucker core "
                                       "(lora_mid) that this network does not expect")
            for part, layer in ((DOWN, module.lora_down), (UP, module.lora_up), (MID, module.lora_mid)):
                if layer is None:
                    continue
                if part not in parts:
                    raise NetworkFileError(f"{source}: {name}.{part} is missing")
                value = parts[part]
                if tuple(value.shape) != tuple(layer.weight.shape):
                    raise NetworkFileError(_shape_message(source, name, part, tuple(value.shape), module))
                layer.weight.copy_(value.to(layer.weight.dtype))
            if ALPHA in parts:
                alpha = float(parts[ALPHA])
                if strict and not math.isclose(alpha, module.alpha, rel_tol=1e-6, abs_tol=1e-6):
                    raise NetworkFileError(
                        f"{source}: {name} has alpha {alpha:g} but this network uses {module.alpha:g}; "
                        "set network_alpha (or conv_alpha) to the file's value to continue training it"
                    )
                module.alpha = alpha
            else:
                module.alpha = float(module.rank)  # no alpha in the file means alpha = rank


def _shape_message(source: str, name: str, part: str, shape: tuple[int, ...], module: LoConModule) -> str:
    file_rank = shape[1] if part == UP else shape[0]
    if file_rank != module.rank:
        setting = "conv_dim" if module.target.kind == CONV else (
            "text_encoder_dim (or network_dim)" if module.target.part == TE else "network_dim")
        return (f"{source}: {name} has rank {file_rank} in the file but this network was created with rank "
                f"{module.rank}; set {setting} = {file_rank} (or block_dims) to continue from this file, "
                "or start without it")
    return (f"{source}: {name}.{part} has shape {list(shape)} but the model layer needs "
            f"{list(getattr(module, part.split('.')[0]).weight.shape)}; the file was made for another base "
            "model (SD2.x / SDXL?)")


def create_network(spec: NetworkSpec, unet: nn.Module | None, text_encoder: nn.Module | None) -> LoConNetwork:
    """A fresh network (identity until trained) for the spec's targets on these models.

    Modules are created on each base layer's device in float32; nothing is patched until `apply_to()`.
    """
    selected = select_targets(spec, unet if spec.train_unet else None,
                              text_encoder if spec.train_text_encoder else None)
    if not selected:
        raise ConfigError("the network settings select no layer of the model (all block_dims 0, or the "
                          "part to train is switched off); give at least one block a rank")
    modules = {
        target.kohya_name: LoConModule(target, base, dropout=spec.dropout, rank_dropout=spec.rank_dropout,
                                       module_dropout=spec.module_dropout)  # type: ignore[arg-type]
        for target, base in selected
    }
    return LoConNetwork(modules, spec)

