"""A1111's "parameters" text (infotext) and the short hashes it carries; atomic PNG writing.

    a photo of a hand <lora:myhands:0.75>
    Negative prompt: disfigured
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Lora hashes: "myhands: 0123456789ab"

Conventions followed (A1111 WebUI ≥ 1.5):
- "Model hash": the first 10 hex digits of the sha256 of the whole checkpoint file;
- "Lora hashes": `name: hash` pairs, hash = the first 12 hex digits of the file's `sshs_model_hash`
  metadata (sha256 of the safetensors data after the header), computed when the file lacks it;
  ':' and ',' are removed from names;
- "TI hashes": the first 12 hex digits of the sha256 of the embedding file;
- a value holding ',', ':' or a newline is written as a JSON string (A1111's quoting);
- Karras samplers are named the pre-1.9 way ("DPM++ 2M Karras", no "Schedule type"): WebUI ≥ 1.9
  splits such names itself, and older versions know no other form;
- LoRAs appear in the prompt as `<lora:name:multiplier>`, which is what makes WebUI apply them when
  the PNG is dropped on it (the hashes alone do not).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Mapping

from library.fileio import write_bytes_atomic

MODEL_HASH_LENGTH = 10
LORA_HASH_LENGTH = 12
TI_HASH_LENGTH = 12
_READ_BLOCK = 1 << 20


def infotext_quote(value: str) -> str:
    """A1111 writes a value that holds ',', ':' or a newline as a JSON string."""
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def format_number(value: float) -> str:
    """7.5 → '7.5', 7.0 → '7', 0.75 → '0.75' (the way WebUI shows numbers)."""
    return f"{value:g}"


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None = None,
    model_name: str | None = None,
    clip_skip: int = 1,
    lora_hashes: Mapping[str, str] | None = None,
    ti_hashes: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The `parameters` text A1111 writes into its PNGs (and reads back when one is dropped on it)."""
    fields: list[tuple[str, str]] = [
        ("Steps", str(steps)),
        ("Sampler", sampler),
        ("CFG scale", format_number(cfg_scale)),
        ("Seed", str(seed)),
        ("Size", f"{width}x{height}"),
    ]
    if model_hash:
        fields.append(("Model hash", model_hash))
    if model_name:
        fields.append(("Model", model_name))
    if clip_skip > 1:
        fields.append(("Clip skip", str(clip_skip)))
    if lora_hashes:
        fields.append(("Lora hashes", ", ".join(f"{_clean_name(n)}: {h}" for n, h in lora_hashes.items())))
    if ti_hashes:
        fields.append(("TI hashes", ", ".join(f"{_clean_name(n)}: {h}" for n, h in ti_hashes.items())))
    fields.extend((extra or {}).items())
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {infotext_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def _clean_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def prompt_with_lora_tags(prompt: str, loras: Mapping[str, float]) -> str:
    """Append `<lora:name:multiplier>` for each LoRA with a non-zero multiplier (WebUI's prompt syntax)."""
    tags = " ".join(f"<lora:{_clean_name(name)}:{format_number(m)}>" for name, m in loras.items() if m != 0)
    return f"{prompt} {tags}" if tags else prompt


# --------------------------------------------------------------------------------------------- hashes


def file_sha256(path: str | os.PathLike, offset: int = 0, progress: bool = False) -> str:
    """sha256 hex digest of a file from `offset` on, read in blocks (a tqdm bar for big files)."""
    from tqdm import tqdm

    path = Path(path)
    size = path.stat().st_size - offset
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                          disable=not progress or size < (256 << 20), leave=False) as bar:
        handle.seek(offset)
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def model_short_hash(path: str | os.PathLike, progress: bool = True) -> str | None:
    """A1111's "Model hash" of a checkpoint file; None for a diffusers folder (WebUI has no hash for it)."""
    path = Path(path)
    if not path.is_file():
        return None
    return file_sha256(path, progress=progress)[:MODEL_HASH_LENGTH]


def safetensors_data_offset(path: str | os.PathLike) -> int:
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
    return 8 + header_size


def lora_short_hash(path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """A1111's LoRA hash: `sshs_model_hash` from the file's metadata, else the same hash computed."""
    stored = (metadata or {}).get("sshs_model_hash", "")
    if len(stored) >= LORA_HASH_LENGTH and all(c in "0123456789abcdefABCDEF" for c in stored):
        return stored[:LORA_HASH_LENGTH].lower()
    return file_sha256(path, offset=safetensors_data_offset(path))[:LORA_HASH_LENGTH]


def embedding_short_hash(path: str | os.PathLike) -> str:
    return file_sha256(path)[:TI_HASH_LENGTH]


# --------------------------------------------------------------------------------------------- PNGs


def save_png_atomic(image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write a PIL image as PNG with a `parameters` text chunk; a crash never leaves half a file."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)  # tEXt when Latin-1, iTXt otherwise; WebUI reads both
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


# --------------------------------------------------------------------------------------------- reading


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Read an A1111 `parameters` text back: (prompt, negative prompt, {field: value}).

    The last line holds the fields when it reads as `Key: value, Key: value, …` with at least three of
    them or a `Steps` field (a prompt line such as "style: ink" is one field, not a fields line). Quoted
    values (see `infotext_quote`) come back unquoted. Lines before a `Negative prompt:` line are the prompt
    (several lines kept as written); that line and the lines after it, the negative prompt. A text with no
    fields line is all prompt, as WebUI reads it.
    """
    lines = text.strip("\n").split("\n")
    fields = _parse_fields(lines[-1]) if lines else None
    if fields is not None and (len(fields) >= 3 or "Steps" in fields):
        lines = lines[:-1]
    else:
        fields = {}
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if negative_lines or line.startswith("Negative prompt:"):
            negative_lines.append(line.removeprefix("Negative prompt:").lstrip() if not negative_lines else line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), fields


_FIELD_KEY = re.compile(r"\s*([A-Za-z][\w \-/+().]*?)\s*:\s*")


def _parse_fields(line: str) -> dict[str, str] | None:
    """`Key: value, Key: "quoted, value"` → {key: value}; None when the line is not such a list."""
    fields: dict[str, str] = {}
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(line):
        key = _FIELD_KEY.match(line, pos)
        if key is None:
            return None
        pos = key.end()
        if line.startswith('"', pos):
            try:
                value, pos = decoder.raw_decode(line, pos)
            except ValueError:
                return None
            rest = line[pos:].lstrip()
            if rest and not rest.startswith(","):
                return None
            pos = len(line) - len(rest) + 1
        else:
            end = line.find(",", pos)
            end = len(line) if end < 0 else end
            value, pos = line[pos:end].strip(), end + 1
        fields[key.group(1)] = str(value)
    return fields or None
