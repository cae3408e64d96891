"""From the job keys of `sample.py` (library/sampling/fields.py) and of sampling during training to prompts.

    python sample.py --config dataset_configs/sample_compare.toml
    python sample.py --pretrained_model_name_or_path model.safetensors --prompt "a photo of a hand --n disfigured"

The training scripts' own sampling keys (sample_prompts, sample_sampler, …) live with the other
training keys; `training_sample_specs` reads their prompt file.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from library.errors import ConfigError
from library.sampling.prompts import PromptSpec, parse_prompt_file, parse_prompt_line, validate_spec
from library.sampling.schedulers import DEFAULT_SAMPLER, resolve_sampler

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prompt_defaults(job) -> PromptSpec:
    """The values a prompt inherits from the job (size, steps, CFG, negative prompt, sampler)."""
    sampler = resolve_sampler(job.sampler, f"{job.source}: 'sampler'").name
    return PromptSpec(prompt="", negative_prompt=job.negative_prompt, width=job.width, height=job.height,
                      steps=job.steps, cfg_scale=job.cfg_scale, sampler=sampler)


def specs_from_job(job) -> list[PromptSpec]:
    """Every prompt of a sample job: 'prompt', 'prompts' and 'prompt_file' together, in that order."""
    defaults = prompt_defaults(job)
    specs: list[PromptSpec] = []
    texts = ([job.prompt] if job.prompt else []) + list(job.prompts or [])
    for i, text in enumerate(texts, 1):
        specs.append(parse_prompt_line(text, defaults, f"{job.source}: prompt {i}"))
    if job.prompt_file:
        specs.extend(parse_prompt_file(job.prompt_file, defaults))
    if not specs:
        raise ConfigError(f"{job.source}: nothing to sample: set 'prompt', 'prompts' or 'prompt_file'.")
    return [validate_spec(s) for s in specs]


def training_sample_specs(prompt_file: str, width: int = 512, height: int = 512, sampler: str = DEFAULT_SAMPLER,
                          steps: int = 30, cfg_scale: float = 7.5) -> list[PromptSpec]:
    """Prompts for sampling during training (the trainer passes its resolution, e.g. 64 for the tiny model)."""
    defaults = replace(PromptSpec(prompt=""), width=width, height=height, steps=steps, cfg_scale=cfg_scale,
                       sampler=resolve_sampler(sampler, "sample_sampler").name)
    return parse_prompt_file(prompt_file, defaults)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}': CUDA is not available on this machine; use device = \"cpu\".")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
