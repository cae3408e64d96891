"""What several test modules share: job files, the fixed-noise loss, an independent infotext parser.

Test modules import from here (`from support import ...`; pytest.ini puts tests/ and the repository root on
the path) and never from each other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from library.schema import job_toml

# 64-pixel single-bucket training: what every training test's [general] table says
SMALL_BUCKETS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64}


def write_job_file(folder: Path, keys: dict, subsets: list[dict] | None = None, general: dict | None = None,
                   name: str = "job.toml") -> Path:
    """`folder/job.toml` with `keys` at the top level (None values left out), `general` (SMALL_BUCKETS when
    there are subsets) and one dataset of `subsets`."""
    if general is None and subsets:
        general = SMALL_BUCKETS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(job_toml(keys, general, [{"subsets": subsets}] if subsets else None), encoding="utf-8")
    return path


def fixed_noise_loss(model, folder: Path, caption: str | None = None, network_file: Path | None = None) -> float:
    """Mean denoising loss over a folder's 64×64 images at fixed timesteps and noise.

    `caption`: used for every image instead of its caption file. `network_file`: a LoRA patched in at 1.0
    for the measurement (and removed afterwards).
    """
    from library.dataset import TrainDataset, resolve_datasets
    from library.sampling.networks import attach_networks, detach_networks, load_sampling_networks
    from library.text_encoding import encode_texts
    from library.training import noise as nz

    applied = load_sampling_networks([f"{network_file}:1.0"]) if network_file else []
    attach_networks(applied, ["patch"] * len(applied), model.unet, model.text_encoder)
    subset = {"image_dir": str(folder)}
    if caption is not None:
        subset.update(class_tokens=caption, caption_extension=".none")
    configs = resolve_datasets({"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
                               {"datasets": [{"subsets": [subset]}]}, "test", Path.cwd())
    data = TrainDataset(configs, seed=0)
    data.cache_latents(model.vae, "cpu", torch.float32)
    alphas, losses = nz.sd1_alphas_cumprod(), []
    with torch.no_grad():
        for n, batch in enumerate(data.batches(1)):
            for k in range(4):  # four fixed timesteps per image: a steadier estimate
                g = torch.Generator().manual_seed(100 * n + k)
                t = torch.tensor([50 + 250 * k])
                noise = torch.randn(batch["latents"].shape, generator=g)
                ctx = encode_texts(model.tokenizer, model.text_encoder, batch["captions"])
                pred = model.unet(nz.add_noise(batch["latents"], noise, t, alphas), t, encoder_hidden_states=ctx).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    detach_networks(applied)
    return sum(losses) / len(losses)


def write_job(tmp_path: Path, model: Path, images: Path, **keys) -> Path:
    """A small LoRA job on 64-pixel images (keys override the defaults); its outputs go to tmp_path/out."""
    base = {
        "pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"), "output_name": "lora",
        "network_dim": 4, "network_alpha": 4.0, "learning_rate": 2e-3, "max_train_steps": 8, "seed": 7,
        "train_batch_size": 2, "cache_latents": True, "optimizer_type": "AdamW", "save_precision": "float",
    }
    return write_job_file(tmp_path, {**base, **keys}, [{"image_dir": str(images)}])


def run_job(path: Path, **overrides):
    """Train the LoRA job at `path` in this process."""
    from library.config import load_job
    from library.training.loop import train
    from library.training.network_method import NetworkMethod

    job = load_job("train_network", config_path=str(path), overrides=overrides)
    return train(job, NetworkMethod(job))


# ------------------------------------------------------------------------- A1111 infotext, read back
# Written here, independently of library/sampling/infotext.py's writer: a PNG's text must parse back to
# the settings that made it.
_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {field: value}) of an A1111 `parameters` text."""
    *head, last = text.strip().split("\n")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    fields = {}
    for key, value in _PARAM.findall(last):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields


def parse_hash_list(value: str) -> dict[str, str]:
    """`name: hash, name: hash` (A1111's Lora/TI hashes) as a dict."""
    return dict(item.split(": ") for item in value.split(", "))
