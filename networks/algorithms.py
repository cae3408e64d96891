"""The weight update of one file module, for every algorithm the sampler reads: LoRA/LoCon and LyCORIS'
LoHa, LoKr and (IA)^3, each optionally with DoRA's magnitude (`dora_scale`).

Written here from the published definitions (and checked in tests/test_lycoris.py against the lycoris-lora
package's own forward pass, which is not used here). For a layer of weight W (out × in [× kh × kw]):

- LoRA:   ΔW = α/r · up @ down (with LyCORIS' Tucker core: up ×₁ mid ×₂ down), r = rows of down.
- LoHa:   ΔW = α/r · (w1a @ w1b) ⊙ (w2a @ w2b), r = rows of w1b; with Tucker cores t1/t2 each factor is
          the core contracted with its two matrices (a: r × out, b: r × in).
- LoKr:   ΔW = s · w1 ⊗ w2 (Kronecker product), where either factor may be stored as a low-rank pair
          (w_a @ w_b, w2 also as a Tucker core t2 with w2_a, w2_b); s = α/r when a factor is such a pair
          (r = rows of that factor's b matrix), else 1 (the file's alpha is then ignored, as LyCORIS,
          ComfyUI and A1111 do). A conv's w2 holds the kernel (or a flattened one).
- (IA)^3: W' = W ⊙ (1 + w): `weight` scales each output channel, or each input channel when the file's
          `on_input` is 1 (LyCORIS' ia3 preset does that for ff.net.2 / mlp.fc2). No alpha.
- DoRA:   W' = m · (W + ΔW) / ‖W + ΔW‖, the norm taken per output row when `dora_scale` is [out, 1, …]
          (LyCORIS' default, wd_on_output=True) or per input column when it is [1, in, …].

A missing alpha means scale 1. A multiplier m gives W + m · (W' − W), as ComfyUI applies a strength.
"""

from __future__ import annotations

import math

from typing import Mapping

import torch

from library.errors import NetworkFileError
from networks.locon import lora_delta
from networks.names import (
    ALPHA, DORA_SCALE, DOWN, IA3_ON_INPUT, IA3_PARTS, IA3_WEIGHT, LOHA_PARTS, LOKR_PARTS, MID, UP,
)

LORA = "LoRA"
LOHA = "LoHa"
LOKR = "LoKr"
IA3 = "(IA)^3"

_PARTS: dict[str, tuple[str, ...]] = {
    LORA: (DOWN, UP, MID),
    LOHA: LOHA_PARTS,
    LOKR: LOKR_PARTS,
    IA3: IA3_PARTS,
}
# what each algorithm cannot do without (LoKr: one way of storing each factor, checked in `missing_parts`)
_REQUIRED: dict[str, tuple[str, ...]] = {
    LORA: (DOWN, UP),
    LOHA: ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    LOKR: (),
    IA3: (IA3_WEIGHT,),
}

Parts = Mapping[str, torch.Tensor]


def algorithm_of(parts: Parts) -> str | None:
    """LoRA / LoHa / LoKr / (IA)^3 by the module's tensor names; None when none of them (or several) fit."""
    found = algorithms_in(parts)
    return found[0] if len(found) == 1 else None


def algorithms_in(parts: Parts) -> list[str]:
    return [name for name, names in _PARTS.items() if any(p in parts for p in names)]


def missing_parts(algorithm: str, parts: Parts) -> list[str]:
    """The tensors the module lacks to be a complete `algorithm` module."""
    missing = [p for p in _REQUIRED[algorithm] if p not in parts]
    if algorithm == LOHA and ("hada_t1" in parts) != ("hada_t2" in parts):
        missing.append("hada_t2" if "hada_t1" in parts else "hada_t1")
    if algorithm == LOKR:
        for factor in ("w1", "w2"):
            if f"lokr_{factor}" not in parts:
                missing += [p for p in (f"lokr_{factor}_a", f"lokr_{factor}_b") if p not in parts]
    return missing


def rank_of(parts: Parts) -> int | None:
    """The rank the file's alpha is divided by; None when the update has no rank (IA3, a full LoKr)."""
    algorithm = algorithm_of(parts)
    if algorithm == LORA:
        return int(parts[DOWN].shape[0])
    if algorithm == LOHA:
        return int(parts["hada_w1_b"].shape[0])
    if algorithm == LOKR:
        # the w2 pair decides when both factors are pairs (as ComfyUI reads it; LyCORIS gives both one rank)
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in parts:
                return int(parts[name].shape[0])
    return None


def alpha_of(parts: Parts) -> float | None:
    return float(parts[ALPHA]) if ALPHA in parts else None


def scale_of(parts: Parts) -> float:
    """alpha / rank, or 1 without a rank or without an alpha."""
    rank, alpha = rank_of(parts), alpha_of(parts)
    return 1.0 if rank is None or alpha is None else alpha / rank


def _f32(parts: Parts, name: str, device: torch.device) -> torch.Tensor:
    return parts[name].to(device, torch.float32)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker core [r, r, kh, kw] with a: [r, out] and b: [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("ijhw,ip,jq->pqhw", core, a.flatten(1), b.flatten(1))


def _pair(parts: Parts, a: str, b: str, core: str | None, device: torch.device) -> torch.Tensor:
    if core is not None and core in parts:
        return _tucker(_f32(parts, core, device), _f32(parts, a, device), _f32(parts, b, device))
    return _f32(parts, a, device).flatten(1) @ _f32(parts, b, device).flatten(1)


def _lokr_factor(parts: Parts, factor: str, device: torch.device) -> torch.Tensor:
    full = f"lokr_{factor}"
    if full in parts:
        return _f32(parts, full, device)
    core = "lokr_t2" if factor == "w2" else None
    return _pair(parts, f"{full}_a", f"{full}_b", core, device)


def raw_delta(parts: Parts, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """ΔW of an additive algorithm (LoRA, LoHa, LoKr) at multiplier 1, scale included, float32, in `shape`.

    Raises NetworkFileError (via `fit_problem`'s wording) when the factors do not make that shape.
    """
    device = torch.device(device)
    algorithm = algorithm_of(parts)
    scale = scale_of(parts)
    if algorithm == LORA:
        mid = _f32(parts, MID, device) if MID in parts else None
        delta = lora_delta(_f32(parts, DOWN, device), _f32(parts, UP, device), mid, 1.0, shape)
    elif algorithm == LOHA:
        first = _pair(parts, "hada_w1_a", "hada_w1_b", "hada_t1", device)
        second = _pair(parts, "hada_w2_a", "hada_w2_b", "hada_t2", device)
        if first.shape != second.shape:
            raise NetworkFileError(f"gives Hadamard factors of shapes {list(first.shape)} and {list(second.shape)}")
        delta = first * second
    elif algorithm == LOKR:
        w1, w2 = _lokr_factor(parts, "w1", device), _lokr_factor(parts, "w2", device)
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape[:2], 1, 1)
        delta = torch.kron(w1.contiguous(), w2.contiguous())
    else:
        raise ValueError(f"raw_delta: {algorithm} is not additive")
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise NetworkFileError(f"gives an update of shape {list(delta.shape)}")
    return delta.reshape(shape) * scale


def fit_problem(parts: Parts, shape: tuple[int, ...]) -> str | None:
    """Why the module's tensors do not make an update of a layer of weight shape `shape`; None when they do."""
    algorithm = algorithm_of(parts)
    if algorithm == LORA:
        down, up = tuple(parts[DOWN].shape), tuple(parts[UP].shape)
        rank = down[0]
        ok = len(down) >= 2 and down[1] == shape[1] and up[0] == shape[0] and up[1] == rank
        if MID in parts:
            ok = ok and tuple(parts[MID].shape[:2]) == (rank, up[1])
        return None if ok else f"has down {list(down)} / up {list(up)}"
    if algorithm == IA3:
        length = parts[IA3_WEIGHT].numel()
        axis = 1 if _on_input(parts) else 0
        if length != shape[axis]:
            return (f"has a (IA)^3 weight of {length} values for the layer's {'input' if axis else 'output'} "
                    "channels")
        return None
    stored = ", ".join(f"{p} {list(parts[p].shape)}" for p in _PARTS[algorithm] if p in parts)
    try:  # the shapes only: on the meta device nothing is computed
        raw_delta({k: v.to("meta") for k, v in parts.items() if k not in (ALPHA, DORA_SCALE)}, shape, "meta")
    except NetworkFileError as error:
        return f"has {stored}, which {error}"
    except RuntimeError:
        return f"has {stored}, which do not multiply together"
    return None


def _on_input(parts: Parts) -> bool:
    return bool(parts[IA3_ON_INPUT].item()) if IA3_ON_INPUT in parts else False


def _ia3_delta(parts: Parts, base: torch.Tensor) -> torch.Tensor:
    w = parts[IA3_WEIGHT].to(base.device, torch.float32).flatten()
    view = [1] * base.dim()
    view[1 if _on_input(parts) else 0] = w.numel()
    return base * w.reshape(view)


def dora_weight(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, source: str) -> torch.Tensor:
    """DoRA: magnitude * (W + dW) / ||W + dW||, the norm taken per output row or per input column
    as the shape of `dora_scale` says ([out, 1, ...] or [1, in, ...])."""
    combined = base + delta
    scale = dora_scale.to(combined.device, torch.float32)
    ones = [1] * (combined.dim() - 2)
    if scale.shape[0] == combined.shape[0] and scale.numel() == combined.shape[0]:
        norm = combined.flatten(1).norm(dim=1)
        factor = (scale.flatten() / norm).reshape(-1, 1, *ones)
    elif scale.dim() >= 2 and scale.shape[0] == 1 and scale.numel() == combined.shape[1]:
        norm = combined.transpose(0, 1).flatten(1).norm(dim=1)
        factor = (scale.flatten() / norm).reshape(1, -1, *ones)
    else:
        raise NetworkFileError(f"{source}: dora_scale of shape {list(scale.shape)} fits neither the output "
                               f"nor the input size of a layer of shape {list(combined.shape)}")
    return combined * factor


def effective_delta(parts: Parts, weight: torch.Tensor, source: str = "the LoRA file") -> torch.Tensor:
    """W' − W at multiplier 1 for the layer weight `weight`: float32, on its device, shaped like it."""
    if algorithm_of(parts) == IA3:
        return _ia3_delta(parts, weight.float())
    delta = raw_delta(parts, tuple(weight.shape), weight.device)
    if DORA_SCALE in parts:
        base = weight.float()
        return dora_weight(base, delta, parts[DORA_SCALE], source) - base
    return delta
