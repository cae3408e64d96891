"""Make a LoRA / LoCon file from the difference of two SD1.x checkpoints (a fine-tune minus its base).

    python networks/extract.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to lora.safetensors --dim 16 [--conv_dim 8] [--dynamic_method sv_fro --dynamic_param 0.9] \\
        [--min_diff 0.01] [--text_encoder | --no_text_encoder] [--save_precision fp16|bf16|float]

For every layer train_network.py would train (U-Net attention and feed-forward; with --conv_dim also the
resnets' and samplers' convolutions; the text encoder's attention and MLP) the update dW = W_tuned - W_org
(k x k convs flattened to [out, in*k*k]) is cut to rank k by SVD: up = U_k sqrt(S_k),
down = sqrt(S_k) V_k^T and alpha = k, so the file's alpha/rank is 1 and it adds exactly U_k S_k V_k^T.
Ranks: --dim for Linear / 1x1 layers, --conv_dim for k x k convs, or per module by --dynamic_method
(networks/resize.py's rules) with those as the largest rank. Layers whose weights are identical in both
models are written as rank-1 zero updates, so the file has the layers a trained LoRA has. The text encoder is extracted when some targeted text-encoder weight differs by more than
--min_diff (sd-scripts' rule), or as --text_encoder / --no_text_encoder say.

Both models are read by the project's loader, from .safetensors single files or diffusers folders with
.safetensors weights (pickles are refused here: nothing is unpickled), and must have the same architecture.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: make the repository root importable so `networks` and `library` resolve
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from library.errors import ConfigError, ModelLoadError
from networks.resize import (
    _Parser, _number, check_dynamic, check_output_path, choose_rank, diffusers_alpha_note, kept_energy,
    low_rank_factors, parse_device,
)

# what decides whether two SD1 models can share a LoRA: every targeted layer's shape follows from these
UNET_ARCHITECTURE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                          "layers_per_block", "cross_attention_dim", "use_linear_projection")
TEXT_ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")


@dataclass
class ModuleExtract:
    name: str
    model: str  # "unet" or "text_encoder"
    kind: str  # "linear", "conv1x1" or "conv"
    max_rank: int
    rank: int
    kept: float  # share of ||W_tuned - W_org||_F^2 the rank-k update keeps
    max_change: float  # largest |W_tuned - W_org|
    singular_values: torch.Tensor  # descending, float64, CPU

    def line(self, verbose: bool) -> str:
        text = f"{self.name}  rank {self.rank}  alpha {self.rank}  kept {100 * self.kept:.4f} %"
        if verbose:
            s = self.singular_values
            first = float(s[0])
            text += f"  (largest change {self.max_change:.4g}, s1 {first:.4g}"
            if s.numel() > self.rank and float(s[self.rank]) > 0:
                dropped = float(s[self.rank])
                text += f", first dropped {dropped:.4g} = s1/{first / dropped:.3g})"
            else:
                text += ", nothing dropped)"
        return text


@dataclass
class Extraction:
    tensors: dict[str, torch.Tensor]
    modules: list[ModuleExtract]
    identical: int  # targeted layers with the same weights in both models (written as rank-1 zero updates)
    text_encoder_change: float  # largest |dW| over the targeted text-encoder layers
    text_encoder_used: bool


# --- loading ------------------------------------------------------------------------------------------
def check_model_path(path: Path, option: str) -> None:
    """Only .safetensors single files and diffusers folders with .safetensors weights: never a pickle."""
    if not path.exists():
        raise ModelLoadError(f"{option} {path}: no such file or folder; give an SD1.x .safetensors file or "
                             "diffusers folder")
    if path.is_dir():
        for part in ("unet", "vae", "text_encoder"):
            if (path / part).is_dir() and not any((path / part).glob("*.safetensors")):
                raise ModelLoadError(f"{option} {path}: {part}/ has no .safetensors weights; extract.py reads "
                                     "safetensors only (it never unpickles .bin files). Save the model with "
                                     "safe_serialization=True or convert it")
        return
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{option} {path}: extract.py reads .safetensors checkpoints only (a {path.suffix} "
                             "file is a pickle, which it never unpickles); convert it to .safetensors first")


def load_model(path: Path, option: str):
    from library.models.loading import load_sd1

    check_model_path(path, option)
    model = load_sd1(path, dtype=torch.float32)
    model.vae = None  # not part of a LoRA; frees its memory
    return model


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_same_architecture(org, tuned, org_name: str, tuned_name: str) -> None:
    """ModelLoadError naming the first difference when the two models cannot share a LoRA."""
    org_unet, tuned_unet = dict(org.unet.config), dict(tuned.unet.config)
    pairs = [("U-Net", key, _as_list(org_unet.get(key)), _as_list(tuned_unet.get(key))) for key in UNET_ARCHITECTURE_KEYS]
    pairs += [("text encoder", key, getattr(org.text_encoder.config, key), getattr(tuned.text_encoder.config, key))
              for key in TEXT_ARCHITECTURE_KEYS]
    for part, key, a, b in pairs:
        if a != b:
            raise ModelLoadError(
                f"{org_name} and {tuned_name} are not the same architecture ({part} {key}: {a} vs {b}); a LoRA "
                "can only be extracted from a fine-tune and the base model it was fine-tuned from")


# --- extraction ---------------------------------------------------------------------------------------
def extract_lora(
    org, tuned, dim: int, conv_dim: int | None = None, method: str | None = None, param: float | None = None,
    min_diff: float = 0.01, text_encoder: bool | None = None, device: str | torch.device = "cpu",
    report: Callable[[ModuleExtract], None] | None = None, names: tuple[str, str] = ("model_org", "model_tuned"),
) -> Extraction:
    """The kohya tensors of tuned - org (two loaded SD1Models of one architecture), with what was done."""
    from tqdm import tqdm

    from networks.names import ALPHA, DOWN, UP
    from networks.spec import NetworkSpec
    from networks.targets import CONV, select_targets

    check_same_architecture(org, tuned, *names)
    spec = NetworkSpec(network_dim=dim, network_alpha=dim, conv_dim=conv_dim, conv_alpha=conv_dim)
    targets = select_targets(spec, org.unet, org.text_encoder)
    tuned_layers = {"unet": dict(tuned.unet.named_modules()), "text_encoder": dict(tuned.text_encoder.named_modules())}
    device = torch.device(device)

    def difference(target, base) -> torch.Tensor:
        other = tuned_layers[target.model].get(target.path)
        if other is None or tuple(other.weight.shape) != tuple(base.weight.shape):
            raise ModelLoadError(f"{names[1]} has no layer {target.path} shaped like {names[0]}'s; the two models "
                                 "are not the same architecture")
        return other.weight.detach().to(device, torch.float32) - base.weight.detach().to(device, torch.float32)

    te_targets = [(t, m) for t, m in targets if t.model == "text_encoder"]
    te_change = max((float(difference(t, m).abs().max()) for t, m in te_targets), default=0.0)
    use_te = te_change > min_diff if text_encoder is None else bool(text_encoder)
    chosen = [(t, m) for t, m in targets if t.model == "unet" or use_te]

    tensors: dict[str, torch.Tensor] = {}
    modules: list[ModuleExtract] = []
    identical = 0
    with torch.no_grad():
        for target, base in tqdm(chosen, desc="extracting", unit="module", leave=False, disable=None):
            delta = difference(target, base)
            largest = float(delta.abs().max())
            name = target.kohya_name
            if largest == 0.0:
                # written as a rank-1 zero update: the file covers the layers a trained LoRA does (diffusers'
                # loader, for one, cannot read a text-encoder part that lacks the out_proj / mlp layers). Its
                # alpha is the rank limit, the alpha of the other modules, because diffusers gives the
                # attention layers the most common alpha of the file (the value is moot: the update is zero)
                identical += 1
                tensors[f"{name}.{DOWN}"] = torch.zeros(1, *delta.shape[1:])
                tensors[f"{name}.{UP}"] = torch.zeros(delta.shape[0], 1, *([1, 1] if delta.dim() == 4 else []))
                tensors[f"{name}.{ALPHA}"] = torch.tensor(float(target.rank))
                continue
            u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
            rank = choose_rank(s, target.rank, method, param)
            down, up = low_rank_factors(u, s, vh, rank, tuple(delta.shape[1:]), delta.dim() == 4)
            tensors[f"{name}.{DOWN}"] = down.cpu()
            tensors[f"{name}.{UP}"] = up.cpu()
            tensors[f"{name}.{ALPHA}"] = torch.tensor(float(rank), dtype=torch.float32)
            singular = s.double().cpu()
            kind = "conv" if target.kind == CONV else target.kind
            result = ModuleExtract(name, target.model, kind, target.rank, rank, kept_energy(singular, rank), largest,
                                   singular)
            modules.append(result)
            if report is not None:
                report(result)
    return Extraction(tensors, modules, identical, te_change, use_te)


# --- metadata -----------------------------------------------------------------------------------------
def extraction_metadata(args, extraction: Extraction) -> dict[str, str]:
    from networks.spec import NetworkSpec

    network_args = {} if args.conv_dim is None else {"conv_dim": args.conv_dim, "conv_alpha": args.conv_dim}
    meta = NetworkSpec.from_args(args.dim, args.dim, network_args).to_metadata()
    if args.dynamic_method:
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
        if args.conv_dim is not None:
            meta["ss_network_args"] = json.dumps({"conv_dim": "Dynamic", "conv_alpha": "Dynamic"})
    kept = [m.kept for m in extraction.modules]
    meta.update({
        "ss_output_name": args.save_to.stem,
        "ss_sd_model_name": args.model_org.name,
        "ss_training_comment": f"extracted by SVD from {args.model_tuned.name} minus {args.model_org.name} "
                               "(pentadactyl networks/extract.py)",
        "pentadactyl.extract": json.dumps({
            "model_org": args.model_org.name,
            "model_tuned": args.model_tuned.name,
            "dim": args.dim,
            "conv_dim": args.conv_dim,
            "dynamic_method": args.dynamic_method,
            "dynamic_param": args.dynamic_param,
            "min_diff": args.min_diff,
            "text_encoder": extraction.text_encoder_used,
            "text_encoder_largest_change": extraction.text_encoder_change,
            "alpha_rule": "alpha = rank (scale 1)",
            "identical_layers": extraction.identical,
            "kept_energy_mean": round(sum(kept) / len(kept), 6),
            "kept_energy_min": round(min(kept), 6),
        }, sort_keys=True),
    })
    return meta


# --- command line -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="networks/extract.py", description="Make a LoRA/LoCon from the difference of two SD1.x "
                     "checkpoints (a fine-tune and its base), by SVD per layer; alpha = rank.")
    parser.add_argument("--model_org", required=True, type=Path, help="the base model (.safetensors or diffusers folder)")
    parser.add_argument("--model_tuned", required=True, type=Path, help="the fine-tuned model, same architecture")
    parser.add_argument("--save_to", required=True, type=Path, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--dim", required=True, type=int,
                        help="rank of Linear / 1x1 layers (with --dynamic_method the largest rank)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="also extract the k x k convolutions (LoCon) at this rank; default: not extracted")
    parser.add_argument("--dynamic_method", default=None, help="sv_ratio, sv_fro or sv_cumulative: a rank per module")
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="the text encoder is extracted when a weight there changed by more than this (0.01)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--text_encoder", dest="text_encoder", action="store_const", const=True, default=None,
                       help="always extract the text encoder")
    group.add_argument("--no_text_encoder", dest="text_encoder", action="store_const", const=False,
                       help="never extract the text encoder (U-Net only)")
    parser.add_argument("--save_precision", default="fp16", help="fp16 (default), bf16 or float")
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    parser.add_argument("--verbose", action="store_true", help="also print singular-value details per module")
    return parser


def main(argv: list[str] | None = None) -> dict[str, str]:
    from tqdm import tqdm

    from networks.files import save_dtype_of, save_network

    args = build_parser().parse_args(argv)
    for option in ("dim", "conv_dim"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ConfigError(f"--{option} {value}: a rank must be at least 1 (e.g. 16)")
    if args.min_diff < 0:
        raise ConfigError(f"--min_diff {args.min_diff:g} must not be negative (e.g. 0.01)")
    check_dynamic(args.dynamic_method, args.dynamic_param)
    check_output_path(args.save_to)
    device = parse_device(args.device)
    save_dtype_of(args.save_precision)
    for path, option in ((args.model_org, "--model_org"), (args.model_tuned, "--model_tuned")):
        check_model_path(path, option)

    import diffusers  # noqa: F401  (seconds of imports: kept out of the times printed)
    import transformers  # noqa: F401

    started = time.perf_counter()
    org = load_model(args.model_org, "--model_org")
    tuned = load_model(args.model_tuned, "--model_tuned")
    print(f"loaded both models in {time.perf_counter() - started:.1f} s")
    extraction = extract_lora(org, tuned, args.dim, args.conv_dim, args.dynamic_method, args.dynamic_param,
                              args.min_diff, args.text_encoder, device,
                              report=lambda m: tqdm.write(m.line(args.verbose)),
                              names=(str(args.model_org), str(args.model_tuned)))
    if not extraction.modules:  # every layer identical
        raise ConfigError(f"{args.model_tuned} has the same weights as {args.model_org} in every layer a LoRA "
                          "covers; there is nothing to extract")
    metadata = save_network(args.save_to, extraction.tensors, extraction_metadata(args, extraction),
                            save_dtype=args.save_precision)
    print(summary(extraction, args, time.perf_counter() - started))
    note = diffusers_alpha_note(extraction.tensors)
    if note:
        print(note)
    return metadata


def summary(extraction: Extraction, args, seconds: float) -> str:
    from collections import Counter

    if args.text_encoder is None:
        verdict = ("extracted" if extraction.text_encoder_used else "left out (U-Net only)")
        compare = ">" if extraction.text_encoder_used else "<="
        lines = [f"text encoder: largest weight change {extraction.text_encoder_change:.4g} {compare} min_diff "
                 f"{_number(args.min_diff)}: {verdict}"]
    else:
        lines = [f"text encoder: {'extracted' if args.text_encoder else 'left out'} (as asked; largest weight "
                 f"change {extraction.text_encoder_change:.4g})"]
    for title, group in _groups(extraction.modules):
        ranks = Counter(m.rank for m in group)
        shown = ", ".join(f"{rank} x{count}" for rank, count in sorted(ranks.items(), reverse=True))
        kept = [m.kept for m in group]
        worst = min(group, key=lambda m: m.kept)
        lines.append(f"{title}: {len(group)} modules, ranks {shown}; kept energy mean "
                     f"{100 * sum(kept) / len(kept):.2f} %, min {100 * min(kept):.2f} % ({worst.name})")
    if extraction.identical:
        lines.append(f"{extraction.identical} layer(s) have the same weights in both models: written as rank-1 "
                     "zero updates")
    size = args.save_to.stat().st_size
    count = len(extraction.modules) + extraction.identical
    lines.append(f"wrote {args.save_to} ({count} modules, {size / 1e6:.2f} MB) in {seconds:.1f} s")
    return "\n".join(lines)


def _groups(modules: Sequence[ModuleExtract]):
    for title, keep in (("text encoder", lambda m: m.model == "text_encoder"),
                        ("U-Net Linear / 1x1", lambda m: m.model == "unet" and m.kind != "conv"),
                        ("U-Net k x k conv", lambda m: m.model == "unet" and m.kind == "conv")):
        group = [m for m in modules if keep(m)]
        if group:
            yield title, group


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
