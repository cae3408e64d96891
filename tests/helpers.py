"""Measurements several test modules share."""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
    base.update(keys)
    lines = [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    lines += ["[general]", "resolution = 64", "min_bucket_reso = 64", "max_bucket_reso = 64",
              "[[datasets]]", "[[datasets.subsets]]", f"image_dir = {json.dumps(str(images))}"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_job(path: Path, **overrides):
    """Train the LoRA job at `path` in this process."""
    from library.config import load_job
    from library.training.loop import train
    from library.training.network_method import NetworkMethod

    job = load_job("train_network", config_path=str(path), overrides=overrides)
    return train(job, NetworkMethod(job))
