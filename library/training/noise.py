"""The noise-prediction objective of SD1.x as small pure functions.

SD1's DDPM schedule: betas = linspace(√0.00085, √0.012, 1000)², ᾱ_t = ∏(1 − β).
z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε, and the U-Net predicts ε.

The noise options and loss weights follow sd-scripts (library/custom_train_functions.py: apply_noise_offset,
pyramid_noise_like, apply_snr_weight, apply_debiased_estimation; train_util's noise and input perturbation).
Every random draw comes from the one sample's generator, in a fixed order (timestep, noise, offset, pyramid
layers, input perturbation), so a sample's noise depends only on (seed, step, sample index); sd-scripts
draws some of them once per batch from a global generator instead (noted where it matters).
"""

from __future__ import annotations

import math

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


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0,
                 adaptive_noise_scale: float | None = None, multires_iterations: int = 0,
                 multires_discount: float = 0.3, offset_random_strength: bool = False) -> torch.Tensor:
    """Gaussian noise like `latents` (the U-Net's target): noise_offset adds a per-channel constant (helps very
    dark/bright images), plus adaptive_noise_scale × |channel mean of the latents| when that is set;
    multires_iterations then makes it pyramid noise. offset_random_strength scales noise_offset by a uniform draw
    (per sample here; sd-scripts draws one per batch). Without the options the draws, and so the noise, are the
    plain ones."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        if offset_random_strength:  # sd-scripts' noise_offset_random_strength: U(0, 1) × noise_offset
            noise_offset = noise_offset * torch.rand(1, generator=generator).item()
        strength = offset_strength(latents, noise_offset, adaptive_noise_scale)
        noise = noise + strength * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator)
    if multires_iterations:
        noise = pyramid_noise(noise, generator, multires_iterations, multires_discount)
    return noise.to(latents.device, latents.dtype)


def offset_strength(latents: torch.Tensor, noise_offset: float,
                    adaptive_noise_scale: float | None) -> float | torch.Tensor:
    """The noise offset's scale: noise_offset, or per channel max(0, noise_offset + adaptive_noise_scale ×
    |mean over height and width of the latents|) (sd-scripts' apply_noise_offset) as [B, C, 1, 1]."""
    if adaptive_noise_scale is None:
        return noise_offset
    channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs().cpu()
    return torch.clamp(noise_offset + adaptive_noise_scale * channel_mean, min=0.0)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (sd-scripts' pyramid_noise_like): for i = 0 … iterations − 1 draw r ~ U[2, 4),
    add Gaussian noise of size max(1, ⌊H / rⁱ⌋) × max(1, ⌊W / rⁱ⌋), upsampled bilinearly to H × W, times
    discountⁱ (i = 0 adds a full-size layer); stop after the first 1-pixel side; divide by the std.
    r and the std are per sample here (sd-scripts: one r per layer and the std of the whole batch)."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = 2 + 2 * torch.rand(1, generator=generator, dtype=torch.float32).item()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        layer = torch.randn(b, c, hn, wn, generator=generator, dtype=torch.float32)
        noise = noise + F.interpolate(layer, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def input_perturbation(like: torch.Tensor, generator: torch.Generator, gamma: float,
                       random_strength: bool = False) -> torch.Tensor:
    """Input-perturbation noise γ·ξ, ξ ~ N(0, I) like `like` (Ning et al., 2023): added to the noise that makes
    the U-Net's input, not to its target. random_strength: γ·u with u ~ U[0, 1) per sample (sd-scripts draws
    one u per batch)."""
    strength = gamma * torch.rand(1, generator=generator, dtype=torch.float32).item() if random_strength else gamma
    xi = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    return (strength * xi).to(like.device, like.dtype)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction: min(SNR, γ) / SNR (Hang et al., 2023)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


def debiased_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Debiased-estimation loss weights for ε-prediction: 1 / √SNR, SNR capped at 1000 (it is ~1175 at t = 0)
    (Yu et al., 2023; sd-scripts' apply_debiased_estimation). With min_snr_gamma both weights apply."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = torch.clamp(a / (1 - a), max=1000.0)
    return 1 / torch.sqrt(snr)


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str = "snr",
                    huber_c: float = 0.1, huber_scale: float = 1.0) -> torch.Tensor:
    """sd-scripts' per-sample huber threshold c [B] from the timesteps: 'snr' (1 − c)/(1 + σ_t)² + c with
    σ_t = √((1 − ᾱ_t)/ᾱ_t) (c near 1 at low noise, near huber_c at high noise), 'exponential'
    e^(−αt)·scale with α = −ln(c)/1000 (1 at t = 0, huber_c·scale at t = 1000), or 'constant' c·scale."""
    t = timesteps.long()
    if schedule == "snr":
        a = alphas_cumprod.to(t.device)[t].double()
        sigma = torch.sqrt((1 - a) / a)
        return ((1 - huber_c) / (1 + sigma) ** 2 + huber_c).float()
    if schedule == "exponential":
        alpha = -math.log(huber_c) / len(alphas_cumprod)
        return (torch.exp(-alpha * t.double()) * huber_scale).float()
    if schedule == "constant":
        return torch.full(t.shape, huber_c * huber_scale, dtype=torch.float32, device=t.device)
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float | torch.Tensor = 0.1) -> torch.Tensor:
    """Mean loss per sample [B]: l2 (MSE), l1, huber 2c·(√(d²+c²) − c) or smooth_l1 2·(√(d²+c²) − c), with
    d = pred − target and c a number or one threshold per sample (huber_threshold)."""
    pred, target = pred.float(), target.float()
    if isinstance(huber_c, torch.Tensor):
        huber_c = huber_c.float().to(pred.device).view(-1, *([1] * (pred.ndim - 1)))
    if loss_type == "l2":
        elementwise = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        elementwise = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        elementwise = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    elif loss_type == "smooth_l1":
        elementwise = 2 * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return elementwise.mean(dim=list(range(1, elementwise.ndim)))
