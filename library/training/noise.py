"""The noise-prediction objective of SD1.x as small pure functions.

SD1's DDPM schedule: betas = linspace(√0.00085, √0.012, 1000)², ᾱ_t = ∏(1 − β).
z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε, and the U-Net predicts ε.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from library.models.architecture import SD1_SCHEDULER_CONFIG


def sd1_alphas_cumprod(num_steps: int = SD1_SCHEDULER_CONFIG["num_train_timesteps"],
                       beta_start: float = SD1_SCHEDULER_CONFIG["beta_start"],
                       beta_end: float = SD1_SCHEDULER_CONFIG["beta_end"]) -> torch.Tensor:
    """ᾱ_t for t = 0..num_steps-1 of the scaled_linear schedule, in float64 then float32 (as diffusers)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep)."""
    return torch.randint(min_timestep, max_timestep, (batch,), generator=generator, dtype=torch.long)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; noise_offset adds a per-channel constant (helps very dark/bright images)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator)
    return noise.to(latents.device, latents.dtype)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction: min(SNR, γ) / SNR (Hang et al., 2023)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    """Mean loss per sample [B]: l2 (MSE), huber (pseudo-Huber with scale huber_c) or smooth_l1."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        elementwise = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        elementwise = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    elif loss_type == "smooth_l1":
        elementwise = F.smooth_l1_loss(pred, target, reduction="none", beta=huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return elementwise.mean(dim=list(range(1, elementwise.ndim)))
