"""Optimizers and learning-rate schedules by the names sd-scripts users write in their jobs."""

from __future__ import annotations

import ast
import importlib
from typing import Any

import torch

from library.errors import ConfigError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGD", "SGDNesterov")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_optimizer_args(items: list[str] | None) -> dict[str, Any]:
    """sd-scripts' `optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)"]` → kwargs."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"optimizer_args: '{item}' is not of the form name=value (e.g. \"weight_decay=0.01\").")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return kwargs


def _bitsandbytes(name: str):
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        raise ConfigError(
            f"optimizer_type = \"{name}\" needs bitsandbytes, which cannot be imported here ({exc}). "
            "Install it (pip install bitsandbytes) or choose optimizer_type = \"AdamW\"."
        ) from None
    return bnb


def optimizer_class(name: str, args: list[str] | None) -> tuple[type, dict[str, Any]]:
    """(class, keyword arguments) for an optimizer name and its optimizer_args; cheap, so a job is checked
    before the model loads. Never falls back silently."""
    import inspect

    from library.schema import did_you_mean

    kwargs = parse_optimizer_args(args)
    lower = name.lower()
    if lower == "adamw":
        cls = torch.optim.AdamW
    elif lower in ("adamw8bit", "lion8bit", "lion"):
        bnb = _bitsandbytes(name)
        cls = {"adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit, "lion": bnb.optim.Lion}[lower]
    elif lower == "sgd":
        cls = torch.optim.SGD
    elif lower == "sgdnesterov":
        cls = torch.optim.SGD
        kwargs.setdefault("nesterov", True)
        kwargs.setdefault("momentum", 0.9)
    elif "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"optimizer_type = \"{name}\": cannot import {class_name} from {module_name} ({exc}).") from None
    else:
        raise ConfigError(f"optimizer_type = \"{name}\" is unknown.{did_you_mean(name, OPTIMIZERS)} Use one of "
                          f"{', '.join(OPTIMIZERS)} or a full class path such as \"torch.optim.Adam\".")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: the constructor will say
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ConfigError(f"optimizer_args: {cls.__name__} takes no argument {', '.join(map(repr, unknown))}."
                              f"{did_you_mean(unknown[0], [k for k in params if k not in ('params', 'self')])}")
    return cls, kwargs


def build_optimizer(name: str, param_groups: list[dict], learning_rate: float, args: list[str] | None):
    """An optimizer over `param_groups` (each may carry its own "lr")."""
    cls, kwargs = optimizer_class(name, args)
    try:
        return cls(param_groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer_args do not fit {name}: {exc}") from None


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0):
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler = \"{name}\" is unknown; use one of {', '.join(SCHEDULERS)}.")
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant":
        kwargs = {}
    if name == "constant_with_warmup":
        kwargs = {"num_warmup_steps": warmup_steps}
    return get_scheduler(name, optimizer, **kwargs)
