"""Job keys of `sample.py` (registered as the "sample" script) and of sampling during training.

    python sample.py --config dataset_configs/sample_compare.toml
    python sample.py --pretrained_model_name_or_path model.safetensors --prompt "a photo of a hand --n disfigured"

The training scripts' own sampling keys (sample_prompts, sample_sampler, …) live with the other
training keys; `training_sample_specs` reads their prompt file.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from library.config import MODEL_FIELDS, OUTPUT_FIELDS, register_script
from library.errors import ConfigError
from library.sampling.prompts import PromptSpec, parse_prompt_file, parse_prompt_line, validate_spec
from library.sampling.schedulers import DEFAULT_SAMPLER, resolve_sampler
from library.schema import Field

S = "sampling"

SAMPLE_FIELDS: dict[str, Field] = {
    "prompt": Field("str", None, "one prompt; sd-scripts options may follow it: "
                    "\"a photo of a hand --n disfigured --d 1234 --s 30 --l 7.5\".", section=S),
    "prompts": Field("list[str]", None, "several prompts (same syntax as 'prompt'); TOML only.", section=S),
    "prompt_file": Field("path", None, "a prompt file in sd-scripts syntax (.txt, .toml or .json).", section=S),
    "negative_prompt": Field("str", "", "negative prompt of every prompt that sets none (--n).", section=S),
    "sampler": Field("str", DEFAULT_SAMPLER, "sd-scripts name (ddim, euler_a, dpmsolver++, …) or A1111 name "
                     "(\"DPM++ 2M Karras\", \"Euler a\", …).", section=S),
    "steps": Field("int", 30, "denoising steps.", minimum=1, maximum=1000, section=S),
    "cfg_scale": Field("float", 7.5, "classifier-free guidance scale.", minimum=0, section=S),
    "width": Field("int", 512, "image width (multiple of 8).", minimum=8, section=S),
    "height": Field("int", 512, "image height (multiple of 8).", minimum=8, section=S),
    "seeds": Field("list[int]", None, "seeds of every prompt's images (overrides images_per_prompt); "
                   "default: seed, seed+1, …", section=S),
    "images_per_prompt": Field("int", 1, "images per prompt (seeds seed, seed+1, …).", minimum=1, section=S),
    "batch_size": Field("int", 1, "images denoised together (same images up to float rounding, more memory).",
                        minimum=1, section=S),
    "networks": Field("list[str]", None, "LoRA/LoCon files with multipliers: [\"style.safetensors:0.75\"].",
                      section=S),
    "network_mode": Field("str", "auto", "merge (fast; multipliers fixed), patch, or auto (merge all but a "
                          "swept network).", choices=("auto", "merge", "patch"), section=S),
    "sweep_multipliers": Field("list[float]", None, "render everything at each multiplier of one network, "
                               "e.g. [0, 0.5, 0.75, 1.0], and a grid comparing them.", section=S),
    "sweep_network": Field("str", None, "the network to sweep (file or base name); default: the first.", section=S),
    "embeddings": Field("list[str]", None, "textual-inversion files or folders; the prompt token is the file's "
                        "base name (EasyNegative.safetensors → EasyNegative).", section=S),
    "dtype": Field("str", "auto", "U-Net/text-encoder precision: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, "
                   "bf16.", choices=("auto", "fp32", "fp16", "bf16"), section=S),
    "vae_dtype": Field("str", "fp32", "VAE decoding precision (fp16 can give NaN/black images).",
                       choices=("fp32", "fp16", "bf16"), section=S),
    "device": Field("str", "auto", "auto (CUDA when available), cpu, cuda, cuda:1, …", section=S),
    "grid": Field("bool", True, "also write a labelled grid (prompts × seeds, or × multipliers).", section=S),
}

register_script("sample", [MODEL_FIELDS, SAMPLE_FIELDS, OUTPUT_FIELDS], has_datasets=False)

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
