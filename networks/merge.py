"""Merge LoRA/LoCon files into an SD1.x checkpoint, or several LoRA files into one.

    python networks/merge.py --sd_model base.safetensors --models a.safetensors b.safetensors \
        --ratios 0.8 0.5 --save_to merged.safetensors [--save_precision fp16|bf16|float]
    python networks/merge.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors \
        [--new_rank 32 [--new_conv_rank 8]]

Into a checkpoint: every affected weight becomes W + sum_i ratio_i * (alpha_i / r_i) * up_i @ down_i, by the
sampler's own merge (`networks.merge_weights`: LoCon 3x3 convs, Tucker cores and DoRA included, and LyCORIS'
LoHa, LoKr and (IA)^3 with their own updates, see networks/algorithms.py), text encoder too; the result is
written by the single-file LDM writer DreamBooth's full mode uses. Merging into one LoRA takes LoRA/LoCon files
only (a LoHa / LoKr / (IA)^3 module has no up/down pair to concatenate or factorise).

Into one LoRA, per module:
- without --new_rank the inputs' ranks are concatenated: the result's rank is sum_i r_i, its alpha is
  sum_i alpha_i, and part i's lora_up is multiplied by ratio_i * (alpha_i / r_i) / (alpha / rank), so the
  result's update equals sum_i ratio_i * dW_i exactly (when every input has the same alpha/rank and ratio 1,
  the weights are copied unchanged);
- with --new_rank N the summed update is factorised by SVD and cut to N (3x3 convs: --new_conv_rank, default
  N); alpha = the module's new rank (scale 1), sqrt(S) on each side. The error left is exactly the dropped
  singular values; the kept energy is printed per module.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: make the repository root importable so `networks` and `library` resolve
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from tqdm import tqdm

from library.cli import run_main
from library.errors import ConfigError, ModelLoadError, NetworkFileError, PentadactylError
from networks.files import (
    group_by_module, load_network_file, module_alpha, module_rank, normalize_names, require_lora,
    safetensors_data_hash, save_network,
)
from networks.locon import lora_delta
from networks.names import ALPHA, DORA_SCALE, DOWN, MID, UP
from networks.targets import CONV, CONV1X1, LINEAR, LayerInfo, sd15_layer_table

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float32}
# a weight that every SD1 single file has; its dtype is taken as the checkpoint's precision
_UNET_PROBE_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# training facts carried over to a merged LoRA when every source agrees on them
_SHARED_KEYS = ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_resolution", "ss_clip_skip")


# --- inputs -------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One LoRA file and its ratio; `modules` holds the file's tensors by normalised module name."""

    path: Path
    ratio: float
    metadata: dict[str, str]
    modules: dict[str, dict[str, torch.Tensor]]

    def record(self) -> dict:
        """What the merged file keeps about this source (no folders: only the file's name)."""
        entry: dict = {"file": self.path.name, "ratio": self.ratio}
        if self.path.suffix.lower() == ".safetensors":
            entry["sshs_model_hash"] = safetensors_data_hash(self.path.read_bytes())
        for key in ("ss_output_name", "ss_network_dim", "ss_network_alpha"):
            if key in self.metadata:
                entry[key] = self.metadata[key]
        return entry


def _for_this_tool(message: str) -> str:
    """Library messages name the job key; here the option is --sd_model."""
    return message.replace("pretrained_model_name_or_path", "--sd_model")


def load_sources(paths: Sequence[Path], ratios: Sequence[float]) -> list[Source]:
    """Read and validate every LoRA file (missing, truncated, SDXL/SD2, other algorithms: one clear error)."""
    sources = []
    for path, ratio in zip(paths, ratios):
        try:
            tensors, metadata = load_network_file(path)
            modules = group_by_module(normalize_names(tensors))
        except NetworkFileError as error:
            text = _for_this_tool(str(error))
            raise NetworkFileError(text if text.startswith(str(path)) else f"{path}: {text}") from None
        sources.append(Source(Path(path), float(ratio), metadata, modules))
    return sources


def _ratios(models: Sequence[Path], ratios: Sequence[float] | None) -> list[float]:
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise ConfigError(f"--ratios has {len(ratios)} value(s) for {len(models)} file(s) in --models; give one "
                          "ratio per LoRA file, in the same order (or leave --ratios out for 1 each)")
    return [float(r) for r in ratios]


def _check_output(save_to: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that cannot be written or would replace an input, before any work (nothing is created)."""
    if save_to.suffix.lower() != ".safetensors":
        raise ConfigError(f"--save_to {save_to}: the merged file is written as .safetensors; name it "
                          f"{save_to.with_suffix('.safetensors').name}")
    if save_to.is_dir():
        raise ConfigError(f"--save_to {save_to} is a folder; give a file name such as {save_to / 'merged.safetensors'}")
    for path in inputs:
        if save_to.exists() and path.exists() and os.path.samefile(save_to, path):
            raise ConfigError(f"--save_to {save_to} is one of the input files; write the merge to a new file")
    folder = save_to.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--save_to {save_to}: cannot write in {folder} (not a writable folder); choose another "
                          "place or fix its permissions")


def _write_failed(save_to: Path, error: BaseException) -> PentadactylError:
    from library.fileio import write_error_reason

    return PentadactylError(f"could not write {save_to}: {write_error_reason(error)}; nothing was written "
                            "(an earlier file of that name is kept)")


def _precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


# --- into a checkpoint --------------------------------------------------------------------------------
@dataclass
class CheckpointResult:
    path: Path
    modules: int  # module updates applied (over all LoRAs)
    precision: str
    metadata: dict[str, str]
    seconds: float


def checkpoint_precision(path: Path) -> torch.dtype:
    """The precision of the base model's U-Net weights (.safetensors); float32 for pickles and folders."""
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                if _UNET_PROBE_KEY in handle.keys():
                    return _SAFETENSORS_DTYPES.get(handle.get_slice(_UNET_PROBE_KEY).get_dtype(), torch.float32)
        except (SafetensorError, OSError, ValueError):
            pass  # the loader names the problem
    return torch.float32


def merge_into_checkpoint(sd_model: Path, sources: Sequence[Source], save_to: Path,
                          save_precision: str | None = None) -> CheckpointResult:
    """W <- W + sum ratio * alpha/r * up @ down for every module of every LoRA; written as one LDM single file."""
    from library.fileio import WRITE_ERRORS
    from library.models.loading import load_sd1, save_sd1_single_file
    from networks.apply import match_modules, merge_weights

    started = time.perf_counter()
    if not sd_model.exists():
        raise ConfigError(f"--sd_model {sd_model}: no such file or folder; give the SD1.x checkpoint "
                          "(.safetensors / .ckpt, or a diffusers folder) to merge the LoRAs into")
    dtype = PRECISIONS[save_precision] if save_precision else checkpoint_precision(sd_model)
    try:
        model = load_sd1(sd_model, dtype=torch.float32)  # merged in float32, cast once when saved
    except ModelLoadError as error:
        raise ModelLoadError(_for_this_tool(str(error))) from None
    # every file is matched against the model before any weight changes: a LoRA of another model is an error here
    matched = [match_modules(source.modules, model.unet, model.text_encoder, str(source.path)) for source in sources]
    total = sum(len(layers) for layers in matched)
    with tqdm(total=total, desc="merging", unit="module", disable=None) as bar:
        for source, layers in zip(sources, matched):
            for name, layer in layers.items():
                tensors = {f"{name}.{part}": value for part, value in source.modules[name].items()}
                # only the model that holds the layer: the lookup stays small
                unet = model.unet if layer.model == "unet" else None
                text_encoder = model.text_encoder if layer.model == "text_encoder" else None
                merge_weights(tensors, unet, text_encoder, source.ratio, str(source.path))
                bar.update()
    metadata = checkpoint_metadata(sd_model, sources, save_to)
    try:
        save_sd1_single_file(save_to, model, dtype, metadata)
    except WRITE_ERRORS as error:
        raise _write_failed(save_to, error) from None
    return CheckpointResult(save_to, total, _precision_name(dtype), metadata, time.perf_counter() - started)


def checkpoint_metadata(sd_model: Path, sources: Sequence[Source], save_to: Path) -> dict[str, str]:
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": save_to.stem,
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": now,
        "modelspec.merged_from": ", ".join([sd_model.name] + [s.path.name for s in sources]),
        "pentadactyl.merged_from": json.dumps({"sd_model": sd_model.name, "loras": [s.record() for s in sources]}),
    }


# --- into one LoRA ------------------------------------------------------------------------------------
@dataclass
class Part:
    """One source's factors of one module, in the layer's canonical layout."""

    source: Source
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    alpha: float
    rank: int

    @property
    def factor(self) -> float:
        """ratio * alpha / rank: what multiplies up @ down in the merged update."""
        return self.source.ratio * self.alpha / self.rank


@dataclass
class ModuleMerge:
    name: str
    kind: str
    ranks_in: list[int]
    rank: int
    alpha: float
    method: str  # "concat" or "svd"
    kept_energy: float | None = None  # svd: sum of kept sigma^2 / sum of all sigma^2
    dropped: list[float] = field(default_factory=list)  # svd: the singular values cut off


@dataclass
class LoraResult:
    path: Path
    modules: list[ModuleMerge]
    precision: str
    metadata: dict[str, str]
    seconds: float


def _canonical(name: str, info: LayerInfo, parts: Mapping[str, torch.Tensor], source: Source) -> Part:
    """Down / up (/ mid) reshaped to the layer's layout (a 1x1 conv stored as a Linear and back is accepted)."""
    try:
        require_lora(name, parts, "merge into another LoRA")
    except NetworkFileError as error:
        raise NetworkFileError(f"{source.path}: {error}") from None
    if DORA_SCALE in parts:
        raise NetworkFileError(f"{source.path}: {name} is a DoRA module (dora_scale); its update depends on the "
                               "base weights, so it cannot be merged into another LoRA. Merge it into a "
                               "checkpoint instead (--sd_model)")
    down, up, mid = parts[DOWN], parts[UP], parts.get(MID)
    rank = module_rank(parts)
    bad = down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != rank or (
        up.dim() == 4 and tuple(up.shape[2:]) != (1, 1))
    if info.kind == CONV and mid is None:
        bad = bad or down.dim() != 4 or tuple(down.shape[2:]) != info.kernel
    elif mid is not None:
        bad = bad or info.kind != CONV or mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, rank) or (
            down.dim() == 4 and tuple(down.shape[2:]) != (1, 1))
    else:
        bad = bad or (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1))
    if bad:
        raise NetworkFileError(
            f"{source.path}: {name} has down {list(down.shape)} / up {list(up.shape)}, which is no LoRA of a "
            f"{info.kind} layer of SD1.x; the file was made for another model or is damaged")
    if info.kind == LINEAR:
        down, up = down.reshape(rank, -1), up.reshape(up.shape[0], rank)
    else:
        if down.dim() == 2:
            down = down.reshape(*down.shape, 1, 1)
        up = up.reshape(up.shape[0], rank, 1, 1)
    return Part(source, down, up, mid, module_alpha(parts), rank)


def _weight_shape(part: Part) -> tuple[int, ...]:
    kernel = tuple(part.mid.shape[2:]) if part.mid is not None else tuple(part.down.shape[2:])
    return (int(part.up.shape[0]), int(part.down.shape[1]), *kernel)


def collect_parts(sources: Sequence[Source]) -> dict[str, list[Part]]:
    """Module name -> the parts of every source that has it (first appearance order), checked against SD1."""
    table = sd15_layer_table()
    by_module: dict[str, list[Part]] = {}
    for source in sources:
        unknown = [name for name in source.modules if name not in table]
        if unknown:
            raise NetworkFileError(
                f"{source.path}: {len(unknown)} module(s) match no layer of SD1.x, e.g. {', '.join(unknown[:3])}; "
                "the LoRA was made for another model family (SD2.x / SDXL?) or uses names we cannot map")
        for name, parts in source.modules.items():
            by_module.setdefault(name, []).append(_canonical(name, table[name], parts, source))
    for name, parts in by_module.items():
        shapes = {_weight_shape(p) for p in parts}
        if len(shapes) > 1:
            seen = ", ".join(f"{p.source.path.name}: {list(_weight_shape(p))}" for p in parts)
            raise NetworkFileError(f"{name} fits layers of different shapes in the inputs ({seen}); the LoRAs were "
                                   "made for different base models and cannot be merged")
    return by_module


def concat_module(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) whose update alpha/R * up @ down equals sum_i ratio_i * alpha_i/r_i * up_i @ down_i.

    R = sum r_i and alpha = sum alpha_i; part i's up is multiplied by ratio_i * (alpha_i/r_i) / (alpha/R),
    which is exactly 1 (a plain copy) when the part has ratio 1 and the common alpha/rank.
    """
    if any(p.mid is not None for p in parts):
        name = parts[0].source.path
        raise NetworkFileError(f"{name}: a module has a Tucker core (lora_mid, LyCORIS), whose ranks cannot be "
                               "concatenated with other files'; give --new_rank (and --new_conv_rank) to merge by SVD")
    rank = sum(p.rank for p in parts)
    alpha = sum(p.alpha for p in parts)
    if alpha <= 0:
        alpha = float(rank)  # zero or negative alphas: scale 1, everything folded into up
    scale = alpha / rank
    down = torch.cat([p.down.float() for p in parts], dim=0)
    ups = []
    for p in parts:
        factor = p.factor / scale
        ups.append(p.up.float() if factor == 1.0 else p.up.float() * factor)
    return down, torch.cat(ups, dim=1), alpha


def svd_module(parts: Sequence[Part], rank: int) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(down, up, alpha, singular values) of the best rank-`rank` approximation of the summed update.

    Without Tucker cores the update is A @ B with A = [ratio_i alpha_i/r_i up_i], B = [down_i] (the concatenated
    factors), so its SVD comes from two thin QRs and the SVD of an R x R matrix (R = sum r_i): exact, and no
    weight-sized matrix is built. alpha = the new rank (scale 1); sqrt(S) goes to each side.
    """
    shape = _weight_shape(parts[0])
    if any(p.mid is not None for p in parts):
        full = sum(lora_delta(p.down.double(), p.up.double(), None if p.mid is None else p.mid.double(), p.factor,
                              shape) for p in parts)
        u, s, vh = torch.linalg.svd(full.flatten(1), full_matrices=False)
    else:
        a = torch.cat([p.up.double().flatten(1) * p.factor for p in parts], dim=1)
        b = torch.cat([p.down.double().flatten(1) for p in parts], dim=0)
        qa, ra = torch.linalg.qr(a)
        qb, rb = torch.linalg.qr(b.T)
        um, s, vmh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
        u, vh = qa @ um, vmh @ qb.T
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up = u[:, :k] * root
    down = root[:, None] * vh[:k]
    if len(shape) == 4:
        up = up.reshape(shape[0], k, 1, 1)
        down = down.reshape(k, *shape[1:])
    return down.float(), up.float(), float(k), s


def merge_into_lora(sources: Sequence[Source], save_to: Path, new_rank: int | None = None,
                    new_conv_rank: int | None = None, save_precision: str | None = None) -> LoraResult:
    """Several LoRAs (with ratios) into one: concatenated exactly, or by SVD where a new rank is given."""
    started = time.perf_counter()
    if new_conv_rank is None:
        new_conv_rank = new_rank
    by_module = collect_parts(sources)
    table = sd15_layer_table()
    tensors: dict[str, torch.Tensor] = {}
    merges: list[ModuleMerge] = []
    threads = torch.get_num_threads()
    # thin QRs / SVDs of R columns gain nothing from threads, and lose 10x when another process holds a core
    torch.set_num_threads(1)
    try:
        for name, parts in tqdm(by_module.items(), desc="merging", unit="module", disable=None):
            merges.append(_merge_module(name, parts, table[name].kind, new_rank, new_conv_rank, tensors))
    finally:
        torch.set_num_threads(threads)
    dtype = PRECISIONS[save_precision] if save_precision else lora_precision(sources)
    metadata = lora_metadata(sources, merges, save_to, new_rank, new_conv_rank)
    from library.fileio import WRITE_ERRORS

    try:
        written = save_network(save_to, tensors, metadata, save_dtype=dtype)
    except WRITE_ERRORS as error:
        raise _write_failed(save_to, error) from None
    return LoraResult(save_to, merges, _precision_name(dtype), written, time.perf_counter() - started)


def _merge_module(name: str, parts: Sequence[Part], kind: str, new_rank: int | None, new_conv_rank: int | None,
                  tensors: dict[str, torch.Tensor]) -> ModuleMerge:
    """Merge one module's parts into `tensors` (concatenated, or by SVD where a rank is given for its kind)."""
    target = new_conv_rank if kind == CONV else new_rank
    ranks_in = [p.rank for p in parts]
    if target is None:
        down, up, alpha = concat_module(parts)
        merge = ModuleMerge(name, kind, ranks_in, int(down.shape[0]), alpha, "concat")
    else:
        down, up, alpha, s = svd_module(parts, target)
        k = int(down.shape[0])
        energy = s.square()
        total = float(energy.sum())
        kept = float(energy[:k].sum()) / total if total > 0 else 1.0
        merge = ModuleMerge(name, kind, ranks_in, k, alpha, "svd", kept, [float(v) for v in s[k:]])
    tensors[f"{name}.{DOWN}"] = down
    tensors[f"{name}.{UP}"] = up
    tensors[f"{name}.{ALPHA}"] = torch.tensor(alpha, dtype=torch.float32)
    return merge


def lora_precision(sources: Sequence[Source]) -> torch.dtype:
    """The inputs' precision: fp16 or bf16 when every input weight is, float32 otherwise."""
    dtypes = {t.dtype for s in sources for parts in s.modules.values() for k, t in parts.items() if k != ALPHA}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16) else torch.float32


def _uniform(values: Sequence[float]) -> str:
    unique = set(values)
    if len(unique) != 1:
        return "Dynamic"  # what sd-scripts writes when modules differ
    value = unique.pop()
    return str(int(value)) if float(value).is_integer() else str(value)


def lora_metadata(sources: Sequence[Source], merges: Sequence[ModuleMerge], save_to: Path,
                  new_rank: int | None, new_conv_rank: int | None) -> dict[str, str]:
    """ss_* keys of the merged network: its dims and alphas, and where it came from."""
    te = [m for m in merges if m.name.startswith("lora_te_")]
    conv = [m for m in merges if not m.name.startswith("lora_te_") and m.kind == CONV]
    linear = [m for m in merges if not m.name.startswith("lora_te_") and m.kind in (LINEAR, CONV1X1)]
    main = linear or te or conv
    dim, alpha = _uniform([m.rank for m in main]), _uniform([m.alpha for m in main])
    args: dict[str, str] = {}
    if conv and main is not conv:
        args.update(conv_dim=_uniform([m.rank for m in conv]), conv_alpha=_uniform([m.alpha for m in conv]))
    if te and main is not te:
        te_dim, te_alpha = _uniform([m.rank for m in te]), _uniform([m.alpha for m in te])
        if (te_dim, te_alpha) != (dim, alpha):
            args.update(text_encoder_dim=te_dim, text_encoder_alpha=te_alpha)
    if new_rank is None and new_conv_rank is None:
        method = "concat"
    else:
        method = "svd" + (f" new_rank={new_rank}" if new_rank is not None else "") + (
            f" new_conv_rank={new_conv_rank}" if new_conv_rank is not None else "")
    listed = ", ".join(f"{s.path.name} x {s.ratio:g}" for s in sources)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": save_to.stem,
        "ss_merge_method": method,
        "ss_merged_from": json.dumps([s.record() for s in sources]),
        "ss_training_comment": f"merged by pentadactyl networks/merge.py ({method}): {listed}",
        "modelspec.merged_from": ", ".join(s.path.name for s in sources),
    }
    for key in _SHARED_KEYS:
        values = {s.metadata.get(key) for s in sources}
        if len(values) == 1 and (value := values.pop()) is not None:
            metadata[key] = value
    return metadata


# --- reports ------------------------------------------------------------------------------------------
def format_svd_report(merges: Sequence[ModuleMerge]) -> str:
    """One line per SVD-merged module (ranks, kept energy) and a summary."""
    rows = [m for m in merges if m.method == "svd"]
    if not rows:
        return ""
    width = max(len(m.name) for m in rows)
    lines = [f"{'module'.ljust(width)}  ranks in -> out  kept energy"]
    for m in rows:
        ranks = "+".join(str(r) for r in m.ranks_in)
        lines.append(f"{m.name.ljust(width)}  {ranks + ' -> ' + str(m.rank):>15}  {100 * m.kept_energy:.4f} %")
    energies = [m.kept_energy for m in rows]
    worst = min(rows, key=lambda m: m.kept_energy)
    lines.append(f"kept energy over {len(rows)} module(s): median {100 * statistics.median(energies):.4f} %, "
                 f"lowest {100 * worst.kept_energy:.4f} % ({worst.name})")
    return "\n".join(lines)


def _part_counts(names: Sequence[str]) -> str:
    te = sum(n.startswith("lora_te_") for n in names)
    return f"text encoder {te}, U-Net {len(names) - te}"


# --- command line -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line (exit status 2, via run_main)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}; see python networks/merge.py --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="networks/merge.py",
        description="Merge LoRA/LoCon files into an SD1.x checkpoint (--sd_model), or several LoRAs into one "
                    "(exactly by concatenating ranks, or by SVD to --new_rank).")
    parser.add_argument("--sd_model", type=Path, help="SD1.x checkpoint to merge into (.safetensors/.ckpt or a "
                        "diffusers folder); leave out to merge the LoRAs into one LoRA")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="LoRA/LoCon files")
    parser.add_argument("--ratios", type=float, nargs="+", help="one multiplier per file (default 1 each)")
    parser.add_argument("--save_to", type=Path, required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--save_precision", choices=list(PRECISIONS), help="fp16, bf16 or float (fp32); default: "
                        "the inputs' precision (the checkpoint's U-Net, or the LoRAs' weights)")
    parser.add_argument("--new_rank", type=int, help="LoRA merge: factorise each summed update by SVD to this rank "
                        "(default: concatenate the ranks, exact)")
    parser.add_argument("--new_conv_rank", type=int, help="LoRA merge: SVD rank of 3x3 conv (LoCon) modules "
                        "(default: --new_rank)")
    parser.add_argument("--concat", action="store_true", help="LoRA merge: concatenate ranks (the default; "
                        "accepted for sd-scripts command lines)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    ratios = _ratios(args.models, args.ratios)
    for option in ("new_rank", "new_conv_rank"):
        value = getattr(args, option)
        if value is not None and args.sd_model is not None:
            raise ConfigError(f"--{option} applies when LoRAs are merged into one LoRA; leave out --sd_model, "
                              f"or leave out --{option} to merge into the checkpoint")
        if value is not None and value < 1:
            raise ConfigError(f"--{option} {value} must be a rank of at least 1, e.g. 32")
    if args.concat and (args.new_rank is not None or args.new_conv_rank is not None):
        raise ConfigError("--concat merges exactly by concatenating ranks; it cannot be combined with --new_rank "
                          "or --new_conv_rank (SVD); choose one")
    _check_output(args.save_to, [*args.models, *([args.sd_model] if args.sd_model else [])])
    sources = load_sources(args.models, ratios)
    listed = ", ".join(f"{s.path.name} x {s.ratio:g}" for s in sources)
    if args.sd_model is not None:
        result = merge_into_checkpoint(args.sd_model, sources, args.save_to, args.save_precision)
        print(f"wrote {result.path}: {args.sd_model.name} + {listed}; {result.modules} module update(s), "
              f"{result.precision}, single-file SD1 checkpoint ({result.seconds:.1f} s)")
        return
    result = merge_into_lora(sources, args.save_to, args.new_rank, args.new_conv_rank, args.save_precision)
    report = format_svd_report(result.modules)
    if report:
        print(report)
    meta = result.metadata
    conv = json.loads(meta["ss_network_args"])
    ranks = f"rank {meta['ss_network_dim']} / alpha {meta['ss_network_alpha']}" + (
        f", conv rank {conv['conv_dim']} / alpha {conv['conv_alpha']}" if "conv_dim" in conv else "")
    print(f"wrote {result.path}: {listed}, {meta['ss_merge_method']}; {len(result.modules)} module(s) "
          f"({_part_counts([m.name for m in result.modules])}), {ranks}, {result.precision}, "
          f"sshs_model_hash {meta['sshs_model_hash'][:12]} ({result.seconds:.1f} s)")


if __name__ == "__main__":
    run_main(main)
