"""Show what a LoRA file contains: algorithm, parts, module counts, ranks and alphas, metadata, SD1.5 fit.

LoRA/LoCon files and LyCORIS' LoHa, LoKr, (IA)^3 and DoRA files are read (see networks/algorithms.py).

    python networks/check_lora.py my_lora.safetensors [more.safetensors ...]
    python -m networks.check_lora my_lora.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: make the repository root importable so `networks` and `library` resolve
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field

import torch

from library.errors import NetworkFileError, PentadactylError
from networks.algorithms import IA3, LORA, algorithm_of, alpha_of, fit_problem, rank_of
from networks.files import (
    group_by_module, normalize_names, not_an_sd1_lora, read_network_file, safetensors_data_hash, sshs_hashes,
    unknown_keys, unsupported_algorithm,
)
from networks.names import ALPHA, DORA_SCALE, MID, SD1_BLOCK_NAMES, is_ldm_style, split_key
from networks.targets import CONV, PART_TITLES, TE, UNET_ATTENTION, UNET_CONV, UNET_OTHER, LayerInfo, sd15_layer_table

PART_ORDER = (TE, UNET_ATTENTION, UNET_CONV, UNET_OTHER, "te_other", "unmapped")
# the extras a module may carry, as the report names them
EXTRAS = {MID: "lora_mid (Tucker)", "hada_t1": "hada_t1/t2 (Tucker)", "lokr_t2": "lokr_t2 (Tucker)",
          DORA_SCALE: "dora_scale (DoRA)"}


@dataclass
class ModuleFacts:
    name: str  # normalised name
    part: str
    kind: str  # linear / conv1x1 / conv / ?
    block: int | None
    rank: int | None  # None: the algorithm has no rank ((IA)^3, a LoKr of two full factors)
    alpha: float | None  # None: no alpha in the file (or none that applies)
    params: int
    fits: bool  # maps onto an SD1.5 layer with matching shapes
    algorithm: str = LORA  # LoRA / LoHa / LoKr / (IA)^3, with " + DoRA" when the module has a dora_scale


@dataclass
class FileReport:
    path: Path
    size: int
    tensor_count: int
    dtypes: Counter
    metadata: dict[str, str]
    modules: list[ModuleFacts] = field(default_factory=list)
    unsupported: tuple[str, list[str]] | None = None
    unknown: list[str] = field(default_factory=list)
    ldm_named: int = 0
    without_alpha: int = 0
    extras: Counter = field(default_factory=Counter)
    hash_check: dict[str, tuple[str | None, str]] = field(default_factory=dict)


def _kind_from_shape(parts: dict[str, torch.Tensor]) -> str:
    """The layer kind a module was made for, as far as its tensors say (for modules SD1.5 lacks)."""
    tensor = parts.get("lora_down.weight", parts.get("hada_w1_b", parts.get("lokr_w2", parts.get("weight"))))
    if tensor is None or tensor.dim() != 4:
        return "linear" if tensor is not None and tensor.dim() == 2 else "?"
    return "conv1x1" if tuple(tensor.shape[2:]) == (1, 1) else CONV


def _fits(info: LayerInfo, parts: dict[str, torch.Tensor]) -> bool:
    shape = (info.out_features, info.in_features, *(info.kernel or ()))
    return fit_problem(parts, shape) is None


def _algorithm_title(parts: dict[str, torch.Tensor]) -> str:
    algorithm = algorithm_of(parts) or "?"
    return algorithm + (" + DoRA" if DORA_SCALE in parts else "")


def inspect_file(path: str | Path) -> FileReport:
    """Everything `check_lora` prints, as data.

    Raises NetworkFileError for unreadable files and for files that are no SD1.x LoRA at all (a full
    checkpoint, an SDXL LoRA): a table of their keys would only bury that verdict.
    """
    path = Path(path)
    tensors, metadata = read_network_file(path)
    reason = not_an_sd1_lora(tensors)
    if reason:
        raise NetworkFileError(f"{path}: {reason}")
    report = FileReport(path, path.stat().st_size, len(tensors), Counter(str(t.dtype).removeprefix("torch.")
                                                                          for t in tensors.values()), metadata)
    keys = list(tensors)
    report.unsupported = unsupported_algorithm(keys)
    report.unknown = [k for k in unknown_keys(keys) if report.unsupported is None
                      or k not in report.unsupported[1]]
    lora_tensors = {k: v for k, v in tensors.items() if k not in set(report.unknown)}
    report.ldm_named = len({split_key(k)[0] for k in lora_tensors if is_ldm_style(split_key(k)[0])})
    try:
        modules = group_by_module(normalize_names(lora_tensors))
    except PentadactylError:
        modules = group_by_module(lora_tensors)
    table = sd15_layer_table()
    for name, parts in modules.items():
        algorithm = algorithm_of(parts)
        if algorithm is None:
            continue
        report.extras.update(EXTRAS[p] for p in EXTRAS if p in parts)
        rank = rank_of(parts)
        alpha = alpha_of(parts)
        if rank is not None and alpha is None:
            report.without_alpha += 1
            alpha = float(rank)
        if rank is None:
            alpha = None  # (IA)^3 and a LoKr of two full factors have no scale to read
        info = table.get(name)
        params = sum(v.numel() for p, v in parts.items() if p not in (ALPHA, "on_input"))
        title = _algorithm_title(parts)
        if info is None:
            report.modules.append(ModuleFacts(name, "unmapped", _kind_from_shape(parts), None, rank, alpha, params,
                                              False, title))
        else:
            report.modules.append(ModuleFacts(name, info.part, info.kind, info.block, rank, alpha, params,
                                              _fits(info, parts), title))
    if metadata.get("sshs_model_hash") or metadata.get("sshs_legacy_hash"):
        data_hash = safetensors_data_hash(path.read_bytes())
        legacy = sshs_hashes(tensors, metadata)[1]
        report.hash_check = {
            "sshs_model_hash": (metadata.get("sshs_model_hash"), data_hash),
            "sshs_legacy_hash": (metadata.get("sshs_legacy_hash"), legacy),
        }
    return report


# --- formatting ---------------------------------------------------------------------------------------
def _range(values: list[float | None]) -> str:
    unique = sorted({v for v in values if v is not None})
    text = [f"{v:g}" for v in unique]
    if not text:
        return "-"
    text = text if len(text) == 1 else [f"{text[0]}..{text[-1]} (varies)"]
    return text[0] + (" (and none)" if None in values else "")


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _metadata_value(key: str, value: str, width: int = 100) -> str:
    if key == "ss_tag_frequency":
        try:
            folders = json.loads(value)
            tags: Counter = Counter()
            for counts in folders.values():
                tags.update(counts)
            top = ", ".join(f"{t} ({n})" for t, n in tags.most_common(5))
            return f"{len(folders)} folder(s), {len(tags)} tags; most frequent: {top}"
        except (ValueError, AttributeError):
            pass
    value = value.replace("\n", " ")
    return value if len(value) <= width else value[: width - 3] + "..."


def format_report(report: FileReport) -> str:
    out: list[str] = []
    dtypes = ", ".join(f"{d} x{n}" for d, n in report.dtypes.most_common())
    out.append(f"{report.path}  ({report.size / 1e6:.1f} MB, {report.tensor_count} tensors: {dtypes})")
    if report.unsupported:
        algorithm, examples = report.unsupported
        out.append(f"algorithm: {algorithm} - NOT SUPPORTED by pentadactyl yet (keys such as "
                   f"{', '.join(examples[:3])})")
    else:
        extras = ", ".join(f"{p} x{n}" for p, n in report.extras.items())
        algorithms = Counter(m.algorithm.removesuffix(" + DoRA") for m in report.modules)
        if set(algorithms) <= {LORA}:
            title = "LoRA/LoCon (lora_down/lora_up/alpha)"
        else:
            title = "LyCORIS " + ", ".join(f"{a} x{n}" for a, n in algorithms.most_common())
            if IA3 in algorithms:
                title += " ((IA)^3: A1111 applies it, ComfyUI skips its keys)"
        out.append(f"algorithm: {title}" + (f", extras: {extras}" if extras else ""))
    if report.ldm_named:
        out.append(f"names: {report.ldm_named} module(s) use LDM-style names (input_blocks/...): "
                   "A1111 and ComfyUI load them, diffusers does not")
    if report.without_alpha:
        out.append(f"alpha: missing on {report.without_alpha} module(s) - read as alpha = rank "
                   "(A1111/ComfyUI use scale 1 too)")
    if report.unknown:
        out.append(f"unknown keys ({len(report.unknown)}): {', '.join(report.unknown[:5])}"
                   + (" ..." if len(report.unknown) > 5 else ""))

    by_part: dict[str, list[ModuleFacts]] = {}
    for facts in report.modules:
        by_part.setdefault(facts.part, []).append(facts)
    if by_part:
        rows = []
        for part in PART_ORDER:
            modules = by_part.get(part)
            if not modules:
                continue
            algorithms = Counter(m.algorithm for m in modules)
            rows.append([PART_TITLES.get(part, "not an SD1.5 layer"), str(len(modules)),
                         ", ".join(a if len(algorithms) == 1 else f"{a} x{n}" for a, n in algorithms.most_common()),
                         _range([m.rank for m in modules]), _range([m.alpha for m in modules]),
                         f"{sum(m.params for m in modules):,}"])
        rows.append(["total", str(len(report.modules)), "", "", "", f"{sum(m.params for m in report.modules):,}"])
        out.append("")
        out.extend(_table(rows, ["part", "modules", "algorithm", "rank", "alpha", "parameters"]))
        out.extend(_block_table(report.modules))
        fitting = sum(m.fits for m in report.modules)
        out.append("")
        if fitting == len(report.modules):
            out.append(f"SD1.5: all {fitting} modules map onto SD1.5 layers with matching shapes")
        else:
            bad = [m.name for m in report.modules if not m.fits]
            out.append(f"SD1.5: {len(bad)} of {len(report.modules)} modules do not fit SD1.5's layers (a name SD1.5 "
                       "lacks, or a shape of another base model, e.g. a tiny or SD2 model): "
                       f"{', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
    if report.hash_check:
        out.append("")
        for key, (stored, computed) in report.hash_check.items():
            verdict = "matches the file" if stored == computed else f"DIFFERS from the file's {computed}"
            out.append(f"{key}: {stored} - {verdict}")
    out.append("")
    if report.metadata:
        rows = [[k, _metadata_value(k, v)] for k, v in sorted(report.metadata.items())]
        out.extend(_table(rows, ["metadata", "value"]))
    else:
        out.append("metadata: none")
    return "\n".join(out)


def _block_table(modules: list[ModuleFacts]) -> list[str]:
    """Per-block rank/alpha of the U-Net, shown only when they vary between blocks."""
    unet = [m for m in modules if m.block is not None]
    linear = [m for m in unet if m.kind != CONV]
    conv = [m for m in unet if m.kind == CONV]
    varies = any(len({(m.rank, m.alpha) for m in group}) > 1 for group in (linear, conv))
    if not varies:
        return []
    rows = []
    for block, title in enumerate(SD1_BLOCK_NAMES):
        cells = []
        for group in (linear, conv):
            here = [m for m in group if m.block == block]
            cells.append(f"{_range([m.rank for m in here])} / {_range([m.alpha for m in here])}" if here else "-")
        if cells != ["-", "-"]:
            rows.append([title, str(sum(m.block == block for m in unet)), *cells])
    return ["", "per block (U-Net):"] + _table(rows, ["block", "modules", "linear rank / alpha",
                                                      "conv rank / alpha"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show what a LoRA/LoCon or LyCORIS (LoHa, LoKr, (IA)^3, DoRA) "
                                                 "file (.safetensors, or a .pt pickle read without running code) "
                                                 "contains.")
    parser.add_argument("files", nargs="+", type=Path, help="LoRA files")
    args = parser.parse_args(argv)
    status = 0
    for index, path in enumerate(args.files):
        if index:
            print("\n" + "=" * 80 + "\n")
        try:
            print(format_report(inspect_file(path)))
        except PentadactylError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
