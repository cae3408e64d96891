"""Typed keys for TOML tables: one declaration gives validation, CLI parsing and documentation.

A `Field` says what a key is; `validate_table` checks a whole table once, at the edge, and returns
plain typed values. Errors name the file, the key and the fix ("did you mean", the expected type).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

from library.errors import ConfigError

log = logging.getLogger("pentadactyl")

# Types a key may have. "path" is a string that names a file or folder; "list[str]" etc. are lists;
# "float|null" means the value may be left out (None). Choices restrict strings.
_TYPE_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "path": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    "list[float]": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
    "dict": lambda v: isinstance(v, dict),
    "int|list[int]": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
}

_TYPE_WORDS = {
    "str": "a string",
    "path": "a path string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "dict": "a table",
    "int|list[int]": "an integer or a list of two integers [width, height]",
}


@dataclass(frozen=True)
class Field:
    type: str
    default: Any = None
    help: str = ""
    choices: tuple = ()
    nullable: bool = True  # None (key absent) is allowed
    minimum: float | None = None
    maximum: float | None = None
    section: str = "general"  # for documentation only
    unset: tuple = ()  # values that mean "not set" (sd-scripts' and the GUI's 0 for an interval): the default

    def type_words(self) -> str:
        return _TYPE_WORDS[self.type]


@dataclass
class Unsupported:
    """A key another tool accepts that we deliberately do not; using it is an error with this reason."""

    reason: str
    passed_over: bool = False  # sd-scripts itself does not read it (a GUI's own field): ignored whatever its value


def did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def is_off(value: Any) -> bool:
    """A value that switches a feature off (false, 0, "", []): an unsupported key set so is no request at all."""
    return value is None or value is False or value == "" or value == [] or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _from_text(value: Any, spec: Field) -> Any:
    """sd-scripts' text spellings of lists and sizes: resolution = "512" or "512,768"; a list of numbers as
    "1,2,3"; one string for a list of strings. Anything that does not parse is left for the type check."""
    if not isinstance(value, str) or spec.type not in ("int|list[int]", "list[int]", "list[float]", "list[str]"):
        return value
    if spec.type == "list[str]":
        return [value]
    parts = [p.strip() for p in re.split(r"[,x×]", value.strip())] if spec.type == "int|list[int]" else \
        [p.strip() for p in value.split(",")]
    try:
        numbers = [float(p) if spec.type == "list[float]" else int(p) for p in parts]
    except ValueError:
        return value
    if spec.type == "int|list[int]":
        return numbers[0] if len(numbers) == 1 else numbers
    return numbers


def check_value(key: str, value: Any, spec: Field, where: str) -> Any:
    """Check one value against its Field; return it normalised (ints accepted as floats, sd-scripts' text
    spellings of lists and sizes accepted)."""
    value = _from_text(value, spec)
    if value is None:
        if not spec.nullable:
            raise ConfigError(f"{where}: '{key}' is required ({spec.type_words()}). {spec.help}".strip())
        return None
    if not _TYPE_CHECKS[spec.type](value):
        raise ConfigError(
            f"{where}: '{key}' must be {spec.type_words()}, got {type(value).__name__} {value!r}."
            + (f" {spec.help}" if spec.help else "")
        )
    if spec.type == "float":
        value = float(value)
    if spec.choices and value not in spec.choices:
        raise ConfigError(
            f"{where}: '{key}' = {value!r} is not one of: {', '.join(map(str, spec.choices))}."
            + did_you_mean(str(value), map(str, spec.choices))
        )
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{where}: '{key}' = {value!r} must be at least {spec.minimum}.")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{where}: '{key}' = {value!r} must be at most {spec.maximum}.")
    return value


SWITCHED_OFF = object()  # check_key's answer for an unsupported key set to a value that switches it off


def check_unsupported(named: str, shown: str, value: Any, rule: Unsupported, where: str) -> Any:
    """An unsupported key (`named` in the error, `shown` in the log line): SWITCHED_OFF when it asks for
    nothing (an off value, or a key passed over whatever its value), else a ConfigError with the reason."""
    if rule.passed_over or is_off(value):
        if rule.passed_over and not is_off(value):
            log.info(f"{where}: {shown} passed over: {rule.reason}")
        return SWITCHED_OFF
    raise ConfigError(f"{where}: {named} is not supported by pentadactyl: {rule.reason}")


def check_key(key: str, value: Any, fields: Mapping[str, Field], where: str,
              unsupported: Mapping[str, Unsupported] | None = None) -> Any:
    """One key of a table: its checked value, or SWITCHED_OFF for an unsupported key that asks for nothing
    (`v2 = false`, as GUIs and notebooks write); a ConfigError for an unknown or unsupported key or a bad value."""
    if unsupported and key in unsupported:
        return check_unsupported(f"'{key}'", f"{key} = {value!r}", value, unsupported[key], where)
    if key not in fields:
        raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(key, fields)}")
    if any(value == u and type(value) is type(u) for u in fields[key].unset):
        return SWITCHED_OFF  # e.g. sample_every_n_steps = 0, as kohya_ss writes "never": the default
    return check_value(key, value, fields[key], where)


def validate_table(
    table: Mapping[str, Any],
    fields: Mapping[str, Field],
    where: str,
    unsupported: Mapping[str, Unsupported] | None = None,
    ignore: tuple[str, ...] = (),
    errors: list[str] | None = None,
) -> dict[str, Any]:
    """Validate every key of `table`; unknown keys are errors. Returns only the keys present.

    With `errors`, each problem is appended to it and the table's good keys are returned; without, the
    problems of the whole table are raised together (see `raise_all`). An unsupported key with a value that
    switches it off (`v2 = false`) is no request and is passed over."""
    out = {}
    mine: list[str] = []
    for key, value in table.items():
        if key in ignore:
            continue
        try:
            checked = check_key(key, value, fields, where, unsupported)
        except ConfigError as exc:
            mine.append(str(exc))
            continue
        if checked is not SWITCHED_OFF:
            out[key] = checked
    if errors is None:
        raise_all(mine)
    else:
        errors.extend(mine)
    return out


def raise_all(errors: list[str]) -> None:
    """One ConfigError for every problem found: the message itself when there is one, else a numbered list."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems; fix them all, then run again:\n"
                          + "\n".join(f"  {n}. {e}" for n, e in enumerate(errors, 1)))


def parse_cli_value(key: str, text: str, spec: Field) -> Any:
    """Turn a command-line string into the Field's type (lists are comma-separated)."""
    where = f"command line --{key}"
    try:
        if spec.type == "bool":
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if spec.type == "int":
            return int(text)
        if spec.type == "float":
            return float(text)
        if spec.type in ("list[str]",):
            return [s.strip() for s in text.split(",") if s.strip()]
        if spec.type == "list[int]":
            return [int(s) for s in text.split(",")]
        if spec.type == "list[float]":
            return [float(s) for s in text.split(",")]
        if spec.type == "int|list[int]":
            parts = [int(s) for s in text.replace("x", ",").split(",")]
            return parts[0] if len(parts) == 1 else parts
        if spec.type == "dict":
            import json

            return json.loads(text)
    except ValueError:
        raise ConfigError(f"{where}: '{text}' is not {spec.type_words()}.") from None
    return text


def load_toml(path) -> dict:
    """Read a TOML file; syntax errors name the file and line."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (check the path; relative paths are from the current folder).")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}. Fix that line (strings need quotes, "
                          "tables [name], arrays [1, 2]).") from None


def toml_value(value: Any) -> str:
    """One value as TOML: booleans, numbers, strings (a JSON string is a valid TOML basic string), arrays and
    inline tables; anything else (a Path) is written as its string."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def job_toml(keys: Mapping[str, Any], general: Mapping[str, Any] | None = None,
             datasets: list[Mapping[str, Any]] | None = None, comment: str = "") -> str:
    """A job file's text: top-level keys (None left out), an optional `[general]` table and
    `[[datasets]]` tables, each with its `subsets` list written as `[[datasets.subsets]]`."""
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    lines += [f"{k} = {toml_value(v)}" for k, v in keys.items() if v is not None]
    if general:
        lines += ["", "[general]"] + [f"{k} = {toml_value(v)}" for k, v in general.items() if v is not None]
    for dataset in datasets or []:
        lines += ["", "[[datasets]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in dataset.items() if k != "subsets" and v is not None]
        for subset in dataset.get("subsets", []):
            lines += ["  [[datasets.subsets]]"] + [f"  {k} = {toml_value(v)}" for k, v in subset.items()
                                                   if v is not None]
    return "\n".join(lines) + "\n"


def parse_key_values(items: list[str] | None, key_name: str) -> dict[str, str]:
    """sd-scripts' `["conv_dim=8", "conv_alpha=4"]` → {"conv_dim": "8", "conv_alpha": "4"}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{key_name}: '{item}' is not of the form name=value (e.g. \"conv_dim=8\").")
        out[key.strip()] = value.strip()
    return out
