"""kohya-format LoRA files: save (atomic, hashed, with metadata), load (with clear errors), key checks."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import struct
from pathlib import Path
from typing import Mapping

import torch

from library.errors import NetworkFileError
from library.fileio import save_safetensors_atomic
from library.safe_pickle import PICKLE_SUFFIXES, load_pickle
from networks.algorithms import IA3, LORA, algorithm_of, algorithms_in, missing_parts
from networks.names import (
    ALPHA, DORA_SCALE, DOWN, OTHER_ALGORITHMS, READABLE_PARTS, TE_PREFIX, UNET_PREFIX, split_key, to_diffusers_name,
)

# ss_* keys that reveal what the training images were (folder names, captions' tags, bucket sizes).
DATASET_METADATA_KEYS: frozenset[str] = frozenset({
    "ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_datasets", "ss_bucket_info",
})

SAVE_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

# Key prefixes of whole checkpoints (LDM single files, SD1 to SDXL), which users sometimes pass as a LoRA.
FULL_MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
SDXL_TE_PREFIXES = ("lora_te1_", "lora_te2_")

LEGACY_HASH_OFFSET = 0x100000  # 1 MiB
LEGACY_HASH_LENGTH = 0x10000  # 64 KiB


# --- hashes (A1111 shows sshs_model_hash as the LoRA's hash) -------------------------------------------
def safetensors_data_hash(serialized: bytes) -> str:
    """sha256 of a safetensors serialization after its header: the tensor data only."""
    (header_size,) = struct.unpack("<Q", serialized[:8])
    return hashlib.sha256(serialized[8 + header_size:]).hexdigest()


def safetensors_legacy_hash(serialized: bytes) -> str:
    """First 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of the serialization."""
    chunk = serialized[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return hashlib.sha256(chunk).hexdigest()[:8]


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the file as it would be with only its `ss_*` metadata."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialized = save({k: v.contiguous() for k, v in tensors.items()}, metadata=ss_only)
    return safetensors_data_hash(serialized), safetensors_legacy_hash(serialized)


# --- metadata -----------------------------------------------------------------------------------------
def without_dataset_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in DATASET_METADATA_KEYS}


def modelspec_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    """SAI model-spec keys, derived from the ss_* keys where those exist; explicit values win."""
    title = metadata.get("ss_output_name") or path.stem
    resolution = _resolution_text(metadata.get("ss_resolution", ""))
    date = _iso_date(metadata.get("ss_training_finished_at"))
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
    }
    return {k: metadata.get(k, v) for k, v in spec.items()}


def _resolution_text(value: str) -> str:
    """sd-scripts writes "(512, 512)" or "512"; model spec wants "512x512"."""
    numbers = [int(n) for n in value.replace("(", " ").replace(")", " ").replace(",", " ").split() if n.isdigit()]
    if len(numbers) == 1:
        numbers *= 2
    return f"{numbers[0]}x{numbers[1]}" if len(numbers) == 2 else "512x512"


def _iso_date(timestamp: str | None) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(float(timestamp), datetime.timezone.utc)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.replace(microsecond=0).isoformat()


def save_dtype_of(save_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"fp16" / "bf16" / "fp32" / a torch dtype / None (keep) -> torch dtype."""
    if save_dtype is None or isinstance(save_dtype, torch.dtype):
        return save_dtype
    try:
        return SAVE_DTYPES[str(save_dtype).lower()]
    except KeyError:
        from library.errors import ConfigError

        raise ConfigError(f"save_precision = {save_dtype!r} is unknown; use fp16, bf16 or fp32") from None


def save_network(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    save_dtype: str | torch.dtype | None = "fp16",
    *,
    include_dataset_metadata: bool = True,
) -> dict[str, str]:
    """Write a kohya LoRA file atomically; return the metadata written.

    Floating-point weights are cast to `save_dtype` (integer ones, such as (IA)^3's `on_input`, are kept),
    every `alpha` is float32 (consumers read it as a scalar). The
    `sshs_*` hashes are computed on the file as it is with only its `ss_*` keys, as sd-scripts and
    A1111 do; `modelspec.*` keys are added unless given.
    """
    path = Path(path)
    dtype = save_dtype_of(save_dtype)
    prepared: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if key.endswith("." + ALPHA):
            value = value.to(torch.float32).reshape(())
        elif dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        prepared[key] = value.contiguous()
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata value of {key!r} must be a string (json.dumps it), not {type(value).__name__}")
    if not include_dataset_metadata:
        meta = without_dataset_metadata(meta)
    meta = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    model_hash, legacy_hash = sshs_hashes(prepared, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    meta.update(modelspec_metadata(meta, path))
    save_safetensors_atomic(prepared, path, meta)
    return meta


# --- loading ------------------------------------------------------------------------------------------
def read_network_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a LoRA file: .safetensors, or a pickle read without running code."""
    path = Path(path)
    if not path.is_file():
        raise NetworkFileError(f"{path}: no such file; check the path of the LoRA file")
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_safetensors(path)
    obj = load_pickle(path, NetworkFileError, "LoRA file")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise NetworkFileError(f"{path}: holds no tensors at the top level; it is not a LoRA file")
    return tensors, {}  # pickled LoRAs (old kohya .pt files) carry no metadata


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file, with user-facing errors."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise NetworkFileError(f"{path}: no such file; check the path of the LoRA file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise NetworkFileError(
            f"{path}: not a readable .safetensors file ({error}); it is probably truncated or corrupt — "
            "download or copy it again"
        ) from None
    return tensors, metadata


# What a LoRA's U-Net cross-attention keys / values read (the text encoder's width) for other base models.
_CONTEXT_WIDTH_FAMILY = {1024: "SD2.x", 2048: "SDXL"}
_CONTEXT_PROJECTION = re.compile(r"attn2_to_[kv]$")
# SD1.x and SD2.x have one transformer block per attention layer; SDXL has 2 or 10.
_LATER_TRANSFORMER_BLOCK = re.compile(r"_transformer_blocks_[1-9]")


def not_an_sd1_lora(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why a file is not an SD1.x LoRA at all (a full model, an SDXL or SD2 LoRA), or None when it may be one."""
    keys = list(tensors)
    model_keys = [k for k in keys if k.startswith(FULL_MODEL_PREFIXES)]
    if model_keys:
        from library.models.architecture import detect_family

        family = detect_family(model_keys)
        name = "model" if family == "unknown" else f"{family} model"
        prefix = next(p for p in FULL_MODEL_PREFIXES if any(k.startswith(p) for k in model_keys))
        return (f"this is a full {name} checkpoint ({prefix}* keys), not a LoRA; use it "
                "as pretrained_model_name_or_path. A LoRA file has lora_unet_…/lora_te_… keys")
    evidence = None
    if any(k.startswith(SDXL_TE_PREFIXES) for k in keys):
        family, evidence = "SDXL", "it has lora_te1_/lora_te2_ text-encoder keys"
    for key, value in tensors.items():
        module, part = split_key(key)
        if evidence is None and _LATER_TRANSFORMER_BLOCK.search(module):
            family, evidence = "SDXL", f"{module} is a second or later transformer block, which only SDXL has"
        elif (evidence is None and part == DOWN and _CONTEXT_PROJECTION.search(module) and value.dim() == 2
              and int(value.shape[1]) in _CONTEXT_WIDTH_FAMILY):
            width = int(value.shape[1])
            family, evidence = _CONTEXT_WIDTH_FAMILY[width], f"its cross-attention inputs are {width} wide, SD1.x's are 768"
    if evidence is None:
        return None
    return (f"this is an {family} LoRA ({evidence}); it does not fit Stable Diffusion 1.x models. Use a LoRA "
            "made for SD1.x (SD1.5 or a model fine-tuned from it)")


def unsupported_algorithm(keys: list[str]) -> tuple[str, list[str]] | None:
    """(algorithm name, example keys) when the keys belong to a LyCORIS/PEFT algorithm we cannot read."""
    found: dict[str, list[str]] = {}
    for key in keys:
        _, part = split_key(key)
        algorithm = OTHER_ALGORITHMS.get(part)
        if algorithm is None and key.endswith((".lora_A.weight", ".lora_B.weight")):
            algorithm = OTHER_ALGORITHMS["lora_A.weight"]
        if algorithm is not None:
            found.setdefault(algorithm, []).append(key)
    if not found:
        return None
    algorithm, examples = max(found.items(), key=lambda item: len(item[1]))
    return algorithm, examples


def unknown_keys(keys: list[str]) -> list[str]:
    """Keys that are not `<lora_unet_…|lora_te_…>.<a tensor of a readable algorithm>`."""
    bad = []
    for key in keys:
        module, part = split_key(key)
        if not module.startswith((UNET_PREFIX, TE_PREFIX)) or part not in READABLE_PARTS:
            bad.append(key)
    return bad


def check_network_keys(keys: list[str], source: str) -> None:
    """Raise NetworkFileError unless every key is a tensor of an SD1 network we can apply: LoRA/LoCon
    (optionally with lora_mid, dora_scale) or LyCORIS' LoHa, LoKr, (IA)^3."""
    if not keys:
        raise NetworkFileError(f"{source}: the file holds no tensors; it is not a LoRA")
    other = unsupported_algorithm(keys)
    if other is not None:
        algorithm, examples = other
        raise NetworkFileError(
            f"{source}: this network uses {algorithm}, which is not supported yet (keys such as "
            f"{', '.join(examples[:3])}); LoRA/LoCon (lora_down/lora_up/alpha, with optional lora_mid and "
            "dora_scale) and LyCORIS' LoHa (hada_*), LoKr (lokr_*) and (IA)^3 (weight/on_input) can be loaded"
        )
    bad = unknown_keys(keys)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NetworkFileError(
            f"{source}: {len(bad)} key(s) are not LoRA tensors: {shown}. A LoRA file has only "
            "<lora_unet_…|lora_te_…>.lora_down.weight / .lora_up.weight / .alpha keys (or LyCORIS' hada_* / "
            "lokr_* / weight); remove the others (e.g. an embedded embedding) or use the tool that made the file"
        )
    modules: dict[str, dict[str, None]] = {}
    for key in keys:
        module, part = split_key(key)
        modules.setdefault(module, {})[part] = None
    for module, parts in modules.items():
        algorithm = algorithm_of(parts)
        if algorithm is None:
            found = algorithms_in(parts)
            what = (f"mixes tensors of {' and '.join(found)}" if found
                    else f"has only {', '.join(parts)} and no weights")
            raise NetworkFileError(f"{source}: module {module} {what}; the file is damaged or was written wrongly")
        if algorithm == IA3 and DORA_SCALE in parts:
            raise NetworkFileError(f"{source}: module {module} is (IA)^3 with a dora_scale, which no trainer writes "
                                   "and no reader applies; the file is damaged or was written wrongly")
        lacking = missing_parts(algorithm, parts)
        if lacking:
            raise NetworkFileError(f"{source}: module {module} ({algorithm}) has no {', '.join(lacking)}; "
                                   "the file is incomplete")


def require_lora(name: str, parts: Mapping[str, torch.Tensor], what: str) -> None:
    """For the tools that rewrite low-rank factors (merging into one LoRA, resizing): refuse a module of a
    LyCORIS algorithm other than LoRA/LoCon, saying what can be done with it instead."""
    algorithm = algorithm_of(parts)
    if algorithm != LORA:
        raise NetworkFileError(
            f"{name} is a {algorithm} module (LyCORIS), which has no lora_down/lora_up pair to {what}. "
            "Apply it with sample.py, or merge it into a checkpoint (networks/merge.py --sd_model)")


def load_network_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a LoRA/LoCon file; tensors keep the file's names (see `normalize_names`)."""
    tensors, metadata = read_network_file(path)
    reason = not_an_sd1_lora(tensors)
    if reason:
        raise NetworkFileError(f"{path}: {reason}")
    check_network_keys(list(tensors), str(path))
    return tensors, metadata


def normalize_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LyCORIS / LDM-style / transformers-5-style names -> the names we write (diffusers paths).

    Two file keys that land on the same name (a file mixing both styles for one layer) are an error.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module, part = split_key(key)
        new_key = f"{to_diffusers_name(module)}.{part}"
        if new_key in renamed:
            raise NetworkFileError(f"two keys of the file name the same layer after renaming: {key} -> {new_key}")
        renamed[new_key] = value
    return renamed


def group_by_module(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, part = split_key(key)
        modules.setdefault(module, {})[part] = value
    return modules


def module_rank(parts: Mapping[str, torch.Tensor]) -> int:
    return int(parts[DOWN].shape[0])


def module_alpha(parts: Mapping[str, torch.Tensor]) -> float:
    """The module's alpha; a file without alpha means alpha = rank (scale 1)."""
    return float(parts[ALPHA]) if ALPHA in parts else float(module_rank(parts))
