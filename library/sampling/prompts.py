"""Sample prompts: one `PromptSpec` per prompt, read from sd-scripts' prompt files (.txt/.toml/.json).

`.txt` — one prompt a line, `#` lines and blank lines skipped, options after the prompt, each
introduced by " --":

    a photo of a hand, best quality --n disfigured, blurry --w 512 --h 768 --d 1234 --s 30 --l 7.5 --ss ddim

`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--s` steps, `--l` CFG scale, `--ss` sampler.

`.toml` — defaults in `[prompt]`, one `[[prompt.subset]]` per prompt:

    [prompt]
    negative_prompt = "disfigured"
    width = 512
    [[prompt.subset]]
    prompt = "a photo of a hand"
    seed = 1

`.json` — a list whose items are prompt strings (with " --" options, as in .txt) or tables.
Table keys use sd-scripts' names (prompt, negative_prompt, width, height, seed, sample_steps, scale,
sample_sampler) or ours (steps, cfg_scale, sampler). Unknown options are errors naming the line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from library.errors import ConfigError
from library.lora_tags import split_lora_tags
from library.sampling.schedulers import resolve_sampler
from library.schema import did_you_mean, load_toml

DEFAULT_STEPS = 30
DEFAULT_SIZE = 512
DEFAULT_CFG_SCALE = 7.5


@dataclass(frozen=True)
class PromptSpec:
    """Everything that makes one prompt's images (seed None: the run's seeds are used)."""

    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    seed: int | None = None
    sampler: str | None = None  # canonical sampler name; None: the run's sampler
    loras: tuple[tuple[str, float], ...] = ()  # the prompt's own `<lora:name:m>` tags (taken out of `prompt`)
    source: str = field(default="", compare=False)  # "prompts.txt line 3", for messages


# Option letters of sd-scripts' .txt lines → PromptSpec field and value type.
LINE_OPTIONS: dict[str, tuple[str, type]] = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "s": ("steps", int),
    "l": ("cfg_scale", float),
    "ss": ("sampler", str),
}

# Keys of .toml/.json prompt tables → PromptSpec field (sd-scripts' names and ours).
TABLE_KEYS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "steps": "steps",
    "scale": "cfg_scale",
    "cfg_scale": "cfg_scale",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}

_FIELD_TYPES: dict[str, type] = {"prompt": str, "negative_prompt": str, "width": int, "height": int,
                                 "seed": int, "steps": int, "cfg_scale": float, "sampler": str}

_EXTRA_NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet|lycoris):[^>]*>", re.IGNORECASE)


def validate_spec(spec: PromptSpec) -> PromptSpec:
    """Check ranges and the sampler name; returns the spec with the sampler name made canonical."""
    where = spec.source or "prompt"
    for name, value in (("width", spec.width), ("height", spec.height)):
        if value < 8 or value % 8:
            raise ConfigError(f"{where}: {name} {value} must be a positive multiple of 8 (e.g. 512).")
    if not 1 <= spec.steps <= 1000:
        raise ConfigError(f"{where}: steps {spec.steps} must be between 1 and 1000.")
    if spec.cfg_scale < 0:
        raise ConfigError(f"{where}: CFG scale {spec.cfg_scale} must not be negative.")
    tag = _EXTRA_NETWORK_TAG.search(spec.negative_prompt)
    if tag:
        raise ConfigError(f"{where}: '{tag.group(0)}' in the negative prompt: WebUI applies LoRA tags only from the "
                          "prompt; move it there.")
    prompt, loras = split_lora_tags(spec.prompt)
    tag = _EXTRA_NETWORK_TAG.search(prompt)
    if tag:
        raise ConfigError(f"{where}: '{tag.group(0)}' in a prompt is not read (only <lora:name:multiplier> is, for "
                          "LyCORIS files too); write <lora:…> or list the file in the job instead: networks = "
                          "[\"file.safetensors:0.75\"].")
    sampler = resolve_sampler(spec.sampler, where).name if spec.sampler else None
    if loras:
        return replace(spec, prompt=prompt, loras=spec.loras + tuple(loras), sampler=sampler)
    return replace(spec, sampler=sampler)


def parse_prompt_line(line: str, defaults: PromptSpec, where: str) -> PromptSpec:
    """One .txt line (prompt + " --x value" options) → PromptSpec, starting from `defaults`."""
    parts = line.split(" --")
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        match = re.match(r"\s*([A-Za-z]+)(?:\s+(.*))?$", part, re.DOTALL)
        letter = match.group(1).lower() if match else part.split()[0] if part.split() else ""
        if not match or letter not in LINE_OPTIONS:
            raise ConfigError(f"{where}: unknown option '--{letter or part.strip()}'; options are "
                              f"{', '.join('--' + k for k in LINE_OPTIONS)}."
                              + (did_you_mean(letter, LINE_OPTIONS) if letter else ""))
        key, kind = LINE_OPTIONS[letter]
        text = (match.group(2) or "").strip()
        if not text and kind is not str:
            raise ConfigError(f"{where}: option --{letter} needs a value.")
        values[key] = _convert(text, kind, f"{where}: --{letter}")
    if not values["prompt"]:
        raise ConfigError(f"{where}: the line has options but no prompt before them.")
    return validate_spec(replace(defaults, source=where, **values))


def _convert(value: Any, kind: type, where: str) -> Any:
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        word = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"{where}: {value!r} is not {word}.") from None


def spec_from_table(table: Mapping[str, Any], defaults: PromptSpec, where: str,
                    require_prompt: bool = True) -> PromptSpec:
    """A .toml/.json prompt table → PromptSpec (keys in sd-scripts' names or ours)."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in TABLE_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(key, TABLE_KEYS)} "
                              f"Keys: {', '.join(TABLE_KEYS)}.")
        name = TABLE_KEYS[key]
        values[name] = _convert(value, _FIELD_TYPES[name], f"{where}: '{key}'")
    spec = replace(defaults, source=where, **values)
    if require_prompt and not spec.prompt.strip():
        raise ConfigError(f"{where}: 'prompt' is missing or empty.")
    return spec


def parse_prompt_text(text: str, defaults: PromptSpec, source: str) -> list[PromptSpec]:
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        specs.append(parse_prompt_line(line, defaults, f"{source} line {number}"))
    return specs


def parse_prompt_file(path: str | os.PathLike, defaults: PromptSpec | None = None) -> list[PromptSpec]:
    """All prompts of a .txt/.toml/.json prompt file (sd-scripts syntax).

    `defaults` gives the values a prompt does not set (steps 30, 512×512, CFG 7.5 unless given).
    """
    path = Path(path)
    defaults = defaults or PromptSpec(prompt="")
    if not path.is_file():
        raise ConfigError(f"{path}: prompt file not found (check 'prompt_file' / 'sample_prompts').")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        specs = _parse_toml(path, defaults)
    elif suffix == ".json":
        specs = _parse_json(path, defaults)
    elif suffix in (".txt", ""):
        specs = parse_prompt_text(_read_text(path), defaults, str(path))
    else:
        raise ConfigError(f"{path}: unknown prompt file type '{path.suffix}'; use .txt, .toml or .json.")
    if not specs:
        raise ConfigError(f"{path}: holds no prompts.")
    return specs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None


def _parse_toml(path: Path, defaults: PromptSpec) -> list[PromptSpec]:
    table = load_toml(path)
    unknown = [k for k in table if k != "prompt"]
    if unknown or not isinstance(table.get("prompt"), dict):
        raise ConfigError(f"{path}: a TOML prompt file has one [prompt] table with [[prompt.subset]] entries"
                          + (f"; unknown table/key '{unknown[0]}'" if unknown else "") + ".")
    prompt_table = dict(table["prompt"])
    subsets = prompt_table.pop("subset", [])
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise ConfigError(f"{path}: 'subset' must be [[prompt.subset]] tables.")
    base = spec_from_table(prompt_table, defaults, f"{path} [prompt]", require_prompt=False)
    specs = []
    for i, subset in enumerate(subsets, 1):
        spec = spec_from_table(subset, base, f"{path} [[prompt.subset]] #{i}")
        specs.append(validate_spec(spec))
    return specs


def _parse_json(path: Path, defaults: PromptSpec) -> list[PromptSpec]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: JSON syntax error at line {exc.lineno} column {exc.colno}: {exc.msg}.") from None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: a JSON prompt file is a list of prompt strings or tables.")
    specs = []
    for i, item in enumerate(items, 1):
        where = f"{path} item {i}"
        if isinstance(item, str):
            specs.append(parse_prompt_line(item, defaults, where))
        elif isinstance(item, dict):
            specs.append(validate_spec(spec_from_table(item, defaults, where)))
        else:
            raise ConfigError(f"{where}: expected a string or a table, got {type(item).__name__}.")
    return specs
