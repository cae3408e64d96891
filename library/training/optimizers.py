"""Optimizers and learning-rate schedules by the names sd-scripts users write in their jobs, and the max-norm
step of LoRA weights (sd-scripts' scale_weight_norms) that follows an optimizer step."""

from __future__ import annotations

import ast
import importlib
from typing import Any, Iterable

import torch

from library.errors import ConfigError

# sd-scripts' names (matched without regard to case, as sd-scripts does); a name without a dot that is none of
# these is looked up in torch.optim (case as written: "RAdam"), one with a dot is a class path
OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
              "PagedLion8bit", "SGD", "SGDNesterov", "SGDNesterov8bit", "Adafactor", "Prodigy", "DAdaptation",
              "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion",
              "DAdaptSGD")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor")

# lower-case name -> bitsandbytes.optim class
_BITSANDBYTES = {"adamw8bit": "AdamW8bit", "lion8bit": "Lion8bit", "lion": "Lion", "pagedadamw": "PagedAdamW",
                 "pagedadamw8bit": "PagedAdamW8bit", "pagedadamw32bit": "PagedAdamW32bit",
                 "pagedlion8bit": "PagedLion8bit", "sgdnesterov8bit": "SGD8bit"}
# lower-case name -> (module, class); "DAdaptation" is sd-scripts' old name of DAdaptAdamPreprint
_DADAPTATION = {"dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
                "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
                "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"), "dadaptadam": ("dadaptation", "DAdaptAdam"),
                "dadaptadan": ("dadaptation", "DAdaptAdan"),
                "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
                "dadaptlion": ("dadaptation", "DAdaptLion"), "dadaptsgd": ("dadaptation", "DAdaptSGD")}


def parse_optimizer_args(items: list[str] | None) -> dict[str, Any]:
    """sd-scripts' `optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99", "decouple=True"]` → kwargs, each
    value typed by ast.literal_eval as sd-scripts does (0.01 a float, 2 an int, True a bool, 0.9,0.99 a tuple);
    a value that is no Python literal stays a string. Nothing is evaluated as code."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"optimizer_args: '{item}' is not of the form name=value (e.g. \"weight_decay=0.01\").")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
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


def _torch_optimizer(name: str) -> type | None:
    found = getattr(torch.optim, name, None)
    ok = isinstance(found, type) and issubclass(found, torch.optim.Optimizer) and found is not torch.optim.Optimizer
    return found if ok else None


def _optional_class(name: str, module_name: str, class_name: str, package: str):
    """A class of an optional package; the error names the key and the install line."""
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ConfigError(f"optimizer_type = \"{name}\" needs the {package} package, which cannot be imported here "
                          f"({exc}). Install it with: pip install {package}") from None
    except AttributeError:
        raise ConfigError(f"optimizer_type = \"{name}\": the installed {package} has no {class_name}; "
                          f"upgrade it with: pip install -U {package}") from None


def _adafactor_class():
    from transformers.optimization import Adafactor

    return Adafactor


def _is_adafactor(cls: type) -> bool:  # without importing transformers for every other optimizer
    return cls.__name__ == "Adafactor" and cls.__module__.split(".")[0] == "transformers"


def is_adafactor_relative_step(cls: type, kwargs: dict[str, Any]) -> bool:
    """Adafactor computing its own step size (relative_step=True, its default and sd-scripts')."""
    return _is_adafactor(cls) and bool(kwargs.get("relative_step", True))


# these refuse different (non-zero) learning rates in different parameter groups at their first step
_ONE_LEARNING_RATE = frozenset({"Prodigy", "DAdaptAdam", "DAdaptAdamPreprint", "DAdaptLion", "DAdaptSGD"})


def is_learning_rate_free(cls: type) -> bool:
    """D-Adaptation and Prodigy estimate the step size; learning_rate only scales it (1.0 is usual)."""
    return cls.__module__.split(".")[0] in ("dadaptation", "prodigyopt")


def optimizer_class(name: str, args: list[str] | None) -> tuple[type, dict[str, Any]]:
    """(class, keyword arguments) for an optimizer name and its optimizer_args; cheap, so a job is checked
    before the model loads. Never falls back silently."""
    import inspect

    from library.schema import did_you_mean

    kwargs = parse_optimizer_args(args)
    lower = name.lower()
    if lower == "adamw":
        cls = torch.optim.AdamW
    elif lower in _BITSANDBYTES:
        cls = getattr(_bitsandbytes(name).optim, _BITSANDBYTES[lower])
        if lower == "sgdnesterov8bit":
            kwargs.setdefault("nesterov", True)
            kwargs.setdefault("momentum", 0.9)
    elif lower == "sgd":
        cls = torch.optim.SGD
    elif lower == "sgdnesterov":
        cls = torch.optim.SGD
        kwargs.setdefault("nesterov", True)
        kwargs.setdefault("momentum", 0.9)
    elif lower == "adafactor":
        cls = _adafactor_class()
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            raise ConfigError("optimizer_args: Adafactor's warmup_init=True warms up its relative step, but "
                              "relative_step=False switches that off (sd-scripts silently switches it back on); "
                              "remove warmup_init=True, or set relative_step=True.")
    elif lower == "prodigy":
        cls = _optional_class(name, "prodigyopt", "Prodigy", "prodigyopt")
    elif lower in _DADAPTATION:
        cls = _optional_class(name, *_DADAPTATION[lower], "dadaptation")
    elif "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"optimizer_type = \"{name}\": cannot import {class_name} from {module_name} ({exc}).") from None
    elif _torch_optimizer(name) is not None:
        cls = _torch_optimizer(name)  # sd-scripts' fallback: a bare name is a torch.optim class
    else:
        raise ConfigError(f"optimizer_type = \"{name}\" is unknown.{did_you_mean(name, OPTIMIZERS)} Use one of "
                          f"{', '.join(OPTIMIZERS)}, a torch.optim class such as \"RAdam\", or a full class path "
                          "such as \"torch.optim.Adam\".")
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


def check_optimizer_job(job) -> list[str]:
    """What the optimizer and schedule keys of a training job say together, before the model loads: a
    ConfigError for combinations that cannot do what they say, else the warnings to log (maybe none)."""
    cls, kwargs = optimizer_class(job.optimizer_type, job.optimizer_args)
    source = job.source
    part_rates = {k: getattr(job, k, None) for k in ("unet_lr", "text_encoder_lr")}
    if is_adafactor_relative_step(cls, kwargs):
        own = ("Adafactor with relative_step=True (its default) computes its own step size from the step count "
               "and the weights' scale")
        manual = ("or set optimizer_args = [\"relative_step=False\", \"scale_parameter=False\", "
                  "\"warmup_init=False\"] to train at learning_rate")
        if job.lr_scheduler not in ("constant", "adafactor"):
            raise ConfigError(f"{source}: {own}, so lr_scheduler = \"{job.lr_scheduler}\" would have no effect "
                              "(sd-scripts silently replaces it). Set lr_scheduler = \"adafactor\" (it logs the "
                              f"optimizer's rate), {manual} with this schedule.")
        if job.lr_warmup_steps:
            raise ConfigError(f"{source}: {own}, so lr_warmup_steps = {job.lr_warmup_steps} would have no effect "
                              "(sd-scripts refuses it too). Remove it; Adafactor warms up itself with "
                              f"optimizer_args \"warmup_init=True\", {manual} and a warm-up.")
        given = [k for k, v in part_rates.items() if v]
        if given:
            raise ConfigError(f"{source}: {own} for every parameter, so {' and '.join(given)} would have no effect "
                              "(sd-scripts ignores them). Remove them (0 still freezes a part), " + manual + ".")
    elif job.lr_scheduler == "adafactor":
        raise ConfigError(f"{source}: lr_scheduler = \"adafactor\" reports the step size that Adafactor computes "
                          "itself; it needs optimizer_type = \"Adafactor\" with relative_step=True (the default). "
                          "Choose another lr_scheduler, such as \"constant_with_warmup\".")
    warnings = []
    if is_learning_rate_free(cls):
        # a job without part rates (textual inversion) gets learning_rate for both: one rate
        parts = {k: job.learning_rate if v is None else v for k, v in part_rates.items()}
        if getattr(job, "network_train_unet_only", False):
            parts.pop("text_encoder_lr", None)
        if getattr(job, "network_train_text_encoder_only", False):
            parts.pop("unet_lr", None)
        trained = {k: v for k, v in parts.items() if v}
        if cls.__name__ in _ONE_LEARNING_RATE and len(set(trained.values())) > 1:
            raise ConfigError(f"{source}: {cls.__name__} takes one learning rate for all trained parameters (it "
                              "stops at the first step otherwise), but "
                              f"{' and '.join(f'{k} = {v:g}' for k, v in trained.items())} differ. Give them the "
                              "same value, or leave them out and set learning_rate (1.0 is usual); 0 still "
                              "freezes a part.")
        rates = list(trained.values()) or [job.learning_rate]
        if max(rates) <= 0.1:
            warnings.append(f"learning rate {max(rates):g} is low for {cls.__name__}: it estimates the step size "
                            "itself and the learning rate only scales it; learning_rate = 1.0 is usual.")
    return warnings


def build_optimizer(name: str, param_groups: list[dict], learning_rate: float, args: list[str] | None):
    """An optimizer over `param_groups` (each may carry its own "lr"). Adafactor's relative step takes no
    learning rate: the groups' and the job's are left out (the adafactor schedule reports the real one)."""
    cls, kwargs = optimizer_class(name, args)
    lr: float | None = learning_rate
    if is_adafactor_relative_step(cls, kwargs):
        param_groups = [{k: v for k, v in group.items() if k != "lr"} for group in param_groups]
        lr = None
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer_args do not fit {name}: {exc}") from None


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0,
                    initial_lr: float = 0.0):
    """A schedule by name. An Adafactor with relative_step always gets the adafactor schedule (its rate is its
    own; check_optimizer_job refuses other names given with it): it reports the optimizer's step size, and
    `initial_lr` before the first step."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler = \"{name}\" is unknown; use one of {', '.join(SCHEDULERS)}.")
    relative = _is_adafactor(type(optimizer)) and bool(optimizer.defaults.get("relative_step"))
    if name == "adafactor" or relative:
        if not relative:
            raise ConfigError("lr_scheduler = \"adafactor\" needs optimizer_type = \"Adafactor\" with "
                              "relative_step=True (the default).")
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr)
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


@torch.no_grad()
def apply_max_norm(modules: Iterable, max_norm: float) -> tuple[int, float, float]:
    """sd-scripts' scale_weight_norms, after an optimizer step: each LoRA module whose weight change
    W = alpha/rank · up·down has a Frobenius norm above `max_norm` gets up and down scaled by √(max_norm/‖W‖),
    so that ‖W‖ is then exactly `max_norm`; modules at or below it are untouched (the network's multiplier
    plays no part). Returns (modules scaled, mean and max of the norms after scaling), as sd-scripts logs them.

    ‖up·down‖² = Σ (upᵀup) ⊙ (down·downᵀ): two rank × rank products instead of the full weight (a module with a
    Tucker core, which training never creates, computes the weight). One device sync, for the figures."""
    modules = list(modules)
    if not modules:
        return 0, 0.0, 0.0
    norms = []
    for module in modules:
        if module.lora_mid is not None:
            norms.append(module.delta_weight().norm())
            continue
        up, down = module.lora_up.weight.flatten(1).float(), module.lora_down.weight.flatten(1).float()
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
        norms.append(squared.sqrt() * module.scale)
    norms_t = torch.stack([n.to(norms[0].device) for n in norms])
    over = norms_t > max_norm
    ratio = torch.where(over, max_norm / norms_t.clamp(min=1e-30), torch.ones_like(norms_t))
    root = ratio.sqrt()
    for i, module in enumerate(modules):
        factor = root[i].to(module.lora_up.weight.device)
        module.lora_up.weight.mul_(factor)
        module.lora_down.weight.mul_(factor.to(module.lora_down.weight.device))
    after = norms_t * ratio
    scaled, mean, largest = torch.stack([over.sum().float(), after.mean(), after.max()]).tolist()
    return int(scaled), mean, largest
