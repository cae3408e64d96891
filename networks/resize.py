"""Lower the rank of a LoRA / LoCon file: each module's full update, cut to a smaller rank by SVD.

    python networks/resize.py --model in.safetensors --save_to out.safetensors --new_rank 8
    python networks/resize.py --model in.safetensors --save_to out.safetensors --new_rank 32 \\
        --new_conv_rank 8 --dynamic_method sv_fro --dynamic_param 0.95 --save_precision fp16 --verbose

Per module the update is dW = (alpha / r) * up @ down (LoCon k x k convs flattened to [out, in*k*k],
LyCORIS Tucker cores expanded first). Its SVD dW = sum_i s_i u_i v_i^T gives the best rank-k update
(Eckart-Young): the dropped error is ||dW - dW_k||_F^2 = sum_{i>k} s_i^2, and the "kept energy" printed
is sum_{i<=k} s_i^2 / sum_i s_i^2. The new file writes up = U_k sqrt(S_k), down = sqrt(S_k) V_k^T and
alpha_new = alpha * k / r, so alpha/rank (the scale every consumer applies) is unchanged.

Rank per module: --new_rank (k x k convs: --new_conv_rank, default --new_rank), or with
--dynamic_method the smallest rank meeting the target (see `choose_rank`), never above --new_rank /
--new_conv_rank, the module's current rank, or the number of singular values.

Also used by networks/extract.py: `choose_rank`, `low_rank_factors`, `kept_energy`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: make the repository root importable so `networks` and `library` resolve
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import re
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from library.errors import ConfigError, NetworkFileError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
ZERO_SV = 1e-12  # a largest singular value at or below this: a zero update (rank 1 is kept)


# --- the rank rules -----------------------------------------------------------------------------------
def check_dynamic(method: str | None, param: float | None) -> None:
    """ConfigError unless (method, param) is a usable pair (or both are None)."""
    if method is None:
        if param is not None:
            raise ConfigError("--dynamic_param needs --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
        return
    if method not in DYNAMIC_METHODS:
        raise ConfigError(f"--dynamic_method {method!r} is unknown; use one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        example = "4" if method == "sv_ratio" else "0.9"
        raise ConfigError(f"--dynamic_method {method} needs --dynamic_param (e.g. {example})")
    if method == "sv_ratio" and not param > 0:
        raise ConfigError(f"--dynamic_param {param:g}: sv_ratio needs a ratio above 0 (e.g. 4: keep singular "
                          "values above a quarter of the largest)")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ConfigError(f"--dynamic_param {param:g}: {method} needs a share in (0, 1], e.g. 0.9")


def choose_rank(singular_values: torch.Tensor, max_rank: int, method: str | None = None,
                param: float | None = None) -> int:
    """The rank to keep of a module whose update has these singular values (descending).

    - no method: `max_rank`.
    - sv_ratio X: the number of singular values above s_1 / X (the largest divided by X).
    - sv_cumulative t: the smallest k with (s_1 + ... + s_k) / sum(s) >= t.
    - sv_fro t: the smallest k with sqrt(s_1^2 + ... + s_k^2) / sqrt(sum(s^2)) >= t, i.e. the rank-k
      update keeps at least the share t of the Frobenius norm (t^2 of the energy).
    The result is clamped to 1 .. min(max_rank, number of singular values); a zero update gets rank 1.
    """
    s = singular_values.detach().double().cpu()
    limit = max(1, min(int(max_rank), int(s.numel())))
    if s.numel() == 0 or float(s[0]) <= ZERO_SV:
        return 1
    if method is None:
        rank = limit
    elif method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        rank = _first_reaching(torch.cumsum(s, 0) / s.sum(), param)
    elif method == "sv_fro":
        squares = s.square()
        rank = _first_reaching(torch.cumsum(squares, 0) / squares.sum(), param * param)
    else:
        raise ConfigError(f"--dynamic_method {method!r} is unknown; use one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(rank, limit))


def _first_reaching(shares: torch.Tensor, target: float) -> int:
    """1-based index of the first share >= target (the last one when rounding keeps every share below)."""
    reached = torch.nonzero(shares >= target - 1e-12)
    return int(reached[0]) + 1 if reached.numel() else int(shares.numel())


def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """sum_{i<=rank} s_i^2 / sum_i s_i^2: the share of ||dW||_F^2 the rank-`rank` update keeps (1 for zero)."""
    squares = singular_values.detach().double().square()
    total = float(squares.sum())
    return 1.0 if total <= 0.0 else float(squares[:rank].sum()) / total


def low_rank_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                     down_tail: Sequence[int], up_is_conv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down = U_k diag(S_k) V_k^T, the singular values split as sqrt on both sides
    (balanced magnitudes, which keeps fp16/bf16 files accurate). `down_tail`: the base layer's input
    dims ([in] for a Linear, [in, kh, kw] for a conv); conv modules get a 1x1 conv `up`."""
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    down = down.reshape(rank, *down_tail)
    if up_is_conv:
        up = up.reshape(up.shape[0], rank, 1, 1)
    return down.contiguous(), up.contiguous()


def product_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of up @ down ([out, r] @ [r, n]) without forming the product.

    up = Q1 R1 and down^T = Q2 R2 (QR), so up @ down = Q1 (R1 R2^T) Q2^T; the SVD of the small r x r core
    gives the exact SVD of the full update (its rank is at most r, every further singular value is 0).
    """
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    core_u, s, core_vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    return q1 @ core_u, s, core_vh @ q2.T


# --- resizing a file ----------------------------------------------------------------------------------
@dataclass
class ModuleResize:
    name: str
    kind: str  # "linear", "conv1x1" or "conv" (k x k)
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    kept: float  # share of ||dW||_F^2 kept
    singular_values: torch.Tensor  # of dW = (alpha / r) up @ down, descending (float64, CPU)

    def line(self, verbose: bool) -> str:
        text = (f"{self.name}  rank {self.old_rank} -> {self.new_rank}  alpha {_number(self.old_alpha)} -> "
                f"{_number(self.new_alpha)}  kept {100 * self.kept:.4f} %")
        if verbose:
            s = self.singular_values
            first = float(s[0]) if s.numel() else 0.0
            total = float(s.sum())
            mass = 1.0 if total <= 0 else float(s[:self.new_rank].sum()) / total
            if s.numel() > self.new_rank and float(s[self.new_rank]) > 0:
                dropped = float(s[self.new_rank])
                text += f"  (s1 {first:.4g}, first dropped {dropped:.4g} = s1/{first / dropped:.3g}"
            else:
                text += f"  (s1 {first:.4g}, nothing dropped"
            text += f", sum(s) kept {100 * mass:.2f} %)"
        return text


def module_kind(down: torch.Tensor) -> str:
    if down.dim() == 4:
        return "conv1x1" if tuple(down.shape[2:]) == (1, 1) else "conv"
    return "linear"


def resize_module(name: str, parts: Mapping[str, torch.Tensor], max_rank: int, method: str | None,
                  param: float | None, device: torch.device) -> tuple[ModuleResize, dict[str, torch.Tensor]]:
    """The resized tensors of one module (float32, CPU) and what was done to it."""
    from networks.files import module_alpha, module_rank, require_lora
    from networks.locon import lora_delta
    from networks.names import ALPHA, DORA_SCALE, DOWN, MID, UP

    require_lora(name, parts, "resize")
    if DORA_SCALE in parts:
        raise NetworkFileError(f"{name} is a DoRA module (dora_scale): its update depends on the base weights, "
                               "so it cannot be resized on its own. Merge it into a model and extract instead")
    down, up, mid = parts[DOWN], parts[UP], parts.get(MID)
    rank, alpha = module_rank(parts), module_alpha(parts)
    scale = alpha / rank
    up64 = up.to(device, torch.float64).flatten(1)
    if mid is None:
        down64 = down.to(device, torch.float64).flatten(1)
        u, s, vh = product_svd(up64, down64)
        down_tail = tuple(down.shape[1:])
    else:
        # LyCORIS Tucker (1x1 down, k x k core, 1x1 up): expand to the full k x k update first
        down_tail = (int(down.shape[1]), *mid.shape[2:])
        full = lora_delta(down.to(device, torch.float64), up64, mid.to(device, torch.float64), 1.0,
                          (int(up.shape[0]), *down_tail))
        u, s, vh = torch.linalg.svd(full.flatten(1), full_matrices=False)
    kind = module_kind(down) if mid is None else "conv"
    new_rank = choose_rank(s * abs(scale), min(max_rank, rank), method, param)
    new_alpha = alpha * new_rank / rank
    new_down, new_up = low_rank_factors(u, s, vh, new_rank, down_tail, up.dim() == 4 or mid is not None)
    singular = (s * abs(scale)).cpu()
    result = ModuleResize(name, kind, rank, new_rank, alpha, new_alpha, kept_energy(singular, new_rank), singular)
    tensors = {
        f"{name}.{DOWN}": new_down.float().cpu(),
        f"{name}.{UP}": new_up.float().cpu(),
        f"{name}.{ALPHA}": torch.tensor(new_alpha, dtype=torch.float32),
    }
    return result, tensors


def resize_tensors(
    tensors: Mapping[str, torch.Tensor], new_rank: int, new_conv_rank: int | None = None,
    method: str | None = None, param: float | None = None, device: str | torch.device = "cpu",
    report=None,
) -> tuple[dict[str, torch.Tensor], list[ModuleResize]]:
    """Resize every module of a (validated) LoRA state dict; names come out in our (diffusers-path) form.

    `report(result)` is called once per module (the command line prints a line there).
    """
    from tqdm import tqdm

    from networks.files import group_by_module, normalize_names, require_lora
    from networks.names import DOWN, MID

    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    modules = group_by_module(normalize_names(tensors))
    out: dict[str, torch.Tensor] = {}
    results: list[ModuleResize] = []
    device = torch.device(device)
    with torch.no_grad():
        # disable=None: no bar when stderr is not a terminal (logs, pipes)
        for name, parts in tqdm(modules.items(), desc="resizing", unit="module", leave=False,
                                disable=True if len(modules) < 2 else None):
            require_lora(name, parts, "resize")
            kind = "conv" if MID in parts else module_kind(parts[DOWN])
            limit = conv_rank if kind == "conv" else new_rank
            result, module_tensors = resize_module(name, parts, limit, method, param, device)
            out.update(module_tensors)
            results.append(result)
            if report is not None:
                report(result)
    return out, results


# --- metadata -----------------------------------------------------------------------------------------
def _number(value: float) -> str:
    """4.0 -> "4", 0.25 -> "0.25" (how sd-scripts' readers show ranks and alphas)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _uniform(values: Sequence[float]) -> str | None:
    unique = {float(v) for v in values}
    return _number(unique.pop()) if len(unique) == 1 else ("Dynamic" if unique else None)


BLOCK_WISE_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def resized_metadata(source: Mapping[str, str], results: Sequence[ModuleResize], record: dict) -> dict[str, str]:
    """The source's ss_* keys with the network's new rank / alpha, and the resize recorded.

    ss_network_dim / ss_network_alpha: the rank / alpha of the U-Net's Linear and 1x1 modules (the text
    encoder's when the file has no U-Net), or "Dynamic" when they differ or a dynamic method chose them.
    ss_network_args: conv_dim / conv_alpha and text_encoder_dim / text_encoder_alpha follow the same
    rule; block-wise lists no longer describe the file and are dropped.
    """
    meta = {k: v for k, v in source.items() if k.startswith("ss_")}
    dynamic = record.get("dynamic_method") is not None

    def value(group: list[ModuleResize], attribute: str) -> str | None:
        if not group:
            return None
        return "Dynamic" if dynamic else _uniform([getattr(r, attribute) for r in group])

    unet = [r for r in results if r.name.startswith("lora_unet_")]
    linear = [r for r in unet if r.kind != "conv"] or [r for r in results if r.kind != "conv"]
    conv = [r for r in unet if r.kind == "conv"]
    te = [r for r in results if r.name.startswith("lora_te_")]
    for key, group, attribute in (("ss_network_dim", linear, "new_rank"), ("ss_network_alpha", linear, "new_alpha")):
        text = value(group, attribute)
        if text is not None:
            meta[key] = text
    try:
        args = json.loads(meta.get("ss_network_args", "{}"))
    except ValueError:
        args = None
    if isinstance(args, dict):
        updates = {"conv_dim": value(conv, "new_rank"), "conv_alpha": value(conv, "new_alpha")}
        if "text_encoder_dim" in args or "text_encoder_alpha" in args:
            updates.update(text_encoder_dim=value(te, "new_rank"), text_encoder_alpha=value(te, "new_alpha"))
        for key, text in updates.items():
            if text is not None and (key in args or key.startswith("conv_")):
                args[key] = text
        dropped = [k for k in BLOCK_WISE_ARGS if args.pop(k, None) is not None]
        if dropped:
            record["dropped_network_args"] = dropped
        meta["ss_network_args"] = json.dumps(args)
    if dynamic:
        what = f"dynamic resize ({record['dynamic_method']} {record['dynamic_param']:g}, at most rank {record['new_rank']})"
    else:
        what = f"resized to rank {record['new_rank']}"
        if record.get("new_conv_rank") is not None:
            what += f" (conv {record['new_conv_rank']})"
    previous = meta.get("ss_training_comment", "")
    old = _uniform([r.old_rank for r in results]) or "?"
    meta["ss_training_comment"] = f"{what} from rank {old} by pentadactyl networks/resize.py" + (
        f"; {previous}" if previous and previous != "None" else "")
    meta["pentadactyl.resize"] = json.dumps(record, sort_keys=True)
    return meta


# --- a known limit of one consumer ---------------------------------------------------------------------
_ATTENTION_PROJECTION = re.compile(r"(?:_attn[12]_to_(?:q|k|v|out_0)|_self_attn_(?:q|k|v|out)_proj)$")


def diffusers_alpha_note(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """A warning when the file's attention projections do not all share their part's most common alpha.

    diffusers' load_lora_weights (checked with 0.42) gives every module the most common alpha of its part
    (U-Net or text encoder) plus per-module exceptions, but the exceptions' names it builds for the
    attention to_q/to_k/to_v/to_out (and q/k/v/out_proj) layers match nothing, so those layers get the
    common alpha. A1111 and ComfyUI read every module's own alpha.
    """
    from collections import Counter

    from networks.names import ALPHA

    odd = 0
    for prefix in ("lora_unet_", "lora_te_"):
        alphas = {k.split(".")[0]: float(v) for k, v in tensors.items()
                  if k.startswith(prefix) and k.endswith("." + ALPHA)}
        if not alphas:
            continue
        common = Counter(alphas.values()).most_common(1)[0][0]
        odd += sum(1 for name, alpha in alphas.items() if _ATTENTION_PROJECTION.search(name) and alpha != common)
    if not odd:
        return None
    return (f"note: {odd} attention projection module(s) have an alpha other than the file's most common one "
            "(ranks chosen per module). A1111 and ComfyUI apply each module's own alpha; diffusers' "
            "load_lora_weights applies the most common alpha to those layers, so in diffusers they come out "
            "scaled wrongly. Use a fixed rank (no --dynamic_method) for files meant for diffusers")


# --- command line -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one `error: ...` line and exit status 2 through run_main."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {text!r} is not a device; use cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {text}: use cpu or cuda")
    return device


def check_output_path(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"--save_to {path}: write a .safetensors file (the name must end in .safetensors)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="networks/resize.py", description="Lower the rank of a LoRA/LoCon file by SVD of each "
                     "module's full update (alpha is rescaled so alpha/rank stays the same).")
    parser.add_argument("--model", required=True, type=Path, help="the LoRA file to resize (.safetensors)")
    parser.add_argument("--save_to", required=True, type=Path, help="the resized file (.safetensors)")
    parser.add_argument("--new_rank", required=True, type=int,
                        help="rank of Linear / 1x1 modules; with --dynamic_method the largest rank allowed")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of k x k conv (LoCon) modules (default: --new_rank)")
    parser.add_argument("--dynamic_method", default=None, help="sv_ratio, sv_fro or sv_cumulative: a rank per module")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="sv_ratio: keep singular values above the largest / X; sv_fro: share of the "
                             "Frobenius norm to keep (0..1); sv_cumulative: share of the sum of singular values")
    parser.add_argument("--save_precision", default=None,
                        help="fp16, bf16 or float (default: the precision of the input file's weights)")
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    parser.add_argument("--verbose", action="store_true", help="also print singular-value details per module")
    return parser


def main(argv: list[str] | None = None) -> dict[str, str]:
    from tqdm import tqdm

    from networks.files import load_network_file, save_dtype_of, save_network
    from networks.names import ALPHA

    args = build_parser().parse_args(argv)
    for option in ("new_rank", "new_conv_rank"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ConfigError(f"--{option} {value}: a rank must be at least 1 (e.g. 8)")
    check_dynamic(args.dynamic_method, args.dynamic_param)
    check_output_path(args.save_to)
    device = parse_device(args.device)
    if args.save_precision is not None:
        save_dtype_of(args.save_precision)  # an unknown precision fails before any work

    started = time.perf_counter()
    tensors, source_meta = load_network_file(args.model)
    weights = [v for k, v in tensors.items() if not k.endswith("." + ALPHA)]
    save_dtype = args.save_precision or str(weights[0].dtype).removeprefix("torch.")
    if args.dynamic_method:
        print(f"{args.model}: choosing a rank per module by {args.dynamic_method} {args.dynamic_param:g}, at most "
              f"{args.new_rank}" + (f" (conv {args.new_conv_rank})" if args.new_conv_rank is not None else ""))
    new, results = resize_tensors(tensors, args.new_rank, args.new_conv_rank, args.dynamic_method,
                                  args.dynamic_param, device, report=lambda r: tqdm.write(r.line(args.verbose)))
    kept = [r.kept for r in results]
    record = {
        "source": args.model.name,
        "source_sshs_model_hash": source_meta.get("sshs_model_hash"),
        "new_rank": args.new_rank,
        "new_conv_rank": args.new_conv_rank,
        "dynamic_method": args.dynamic_method,
        "dynamic_param": args.dynamic_param,
        "alpha_rule": "alpha_new = alpha_old * rank_new / rank_old (alpha/rank unchanged)",
        "kept_energy_mean": round(sum(kept) / len(kept), 6),
        "kept_energy_min": round(min(kept), 6),
    }
    metadata = save_network(args.save_to, new, resized_metadata(source_meta, results, record), save_dtype=save_dtype)
    print(summary(results, args.model, args.save_to, time.perf_counter() - started))
    note = diffusers_alpha_note(new)
    if note:
        print(note)
    return metadata


def summary(results: Sequence[ModuleResize], source: Path, target: Path, seconds: float) -> str:
    from collections import Counter

    lines = []
    for title, group in (("Linear / 1x1", [r for r in results if r.kind != "conv"]),
                         ("k x k conv", [r for r in results if r.kind == "conv"])):
        if not group:
            continue
        ranks = Counter(r.new_rank for r in group)
        shown = ", ".join(f"{rank} x{count}" for rank, count in sorted(ranks.items(), reverse=True))
        kept = sorted(r.kept for r in group)
        worst = min(group, key=lambda r: r.kept)
        lines.append(f"{title}: {len(group)} modules, new ranks {shown}; kept energy mean "
                     f"{100 * sum(kept) / len(kept):.2f} %, min {100 * kept[0]:.2f} % ({worst.name})")
    old_size, new_size = source.stat().st_size, target.stat().st_size
    lines.append(f"wrote {target} ({new_size / 1e6:.2f} MB, was {old_size / 1e6:.2f} MB) in {seconds:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
