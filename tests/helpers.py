"""Measurements several test modules share."""

from __future__ import annotations

from pathlib import Path

import torch


def fixed_noise_loss(model, folder: Path, caption: str | None = None, network_file: Path | None = None) -> float:
    """Mean denoising loss over a folder's 64×64 images at fixed timesteps and noise.

    `caption`: used for every image instead of its caption file. `network_file`: a LoRA patched in at 1.0
    for the measurement (and removed afterwards).
    """
    from networks import apply_network_files

    from library.dataset import TrainDataset, resolve_datasets
    from library.text_encoding import encode_texts
    from library.training import noise as nz

    applied = apply_network_files(model.unet, model.text_encoder, [f"{network_file}:1.0"], mode="patch") \
        if network_file else []
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
    for network in applied:
        network.restore()
    return sum(losses) / len(losses)
