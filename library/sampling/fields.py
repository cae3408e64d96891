"""Job keys of `sample.py` (the training scripts' own sampling keys live in library/training/fields.py)."""

from __future__ import annotations

from library.sampling.schedulers import DEFAULT_SAMPLER
from library.fields import MODEL_FIELDS
from library.schema import Field

S = "sampling"

# sample.py reads the model keys of the training scripts, but its prompts have no length limit by default
SAMPLE_MODEL_FIELDS: dict[str, Field] = {
    **MODEL_FIELDS,
    "max_token_length": Field("int", None, "cut prompts after 75, 150 or 225 tokens; default: no limit (any "
                              "number of 75-token chunks, as WebUI).", choices=(75, 150, 225), section="model"),
}

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
    "lora_dir": Field("path", None, "folder of LoRA files for <lora:name:multiplier> in prompts (name = a file's "
                      "base name, as in WebUI's models/Lora).", section=S),
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
    "grid": Field("bool", True, "also write a labelled grid (prompts down × seeds across; with a sweep, one "
                  "panel per multiplier).", section=S),
}
