"""Degradations that make clean toy hands look like a small generator's output: blur, noise, colour
shift, resolution loss and JPEG blocks. Used to test and measure the finger counter."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageFilter


def blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma))


def add_noise(image: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def shift_colour(image: Image.Image, shift: tuple[float, float, float], gain: float = 1.0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * gain + np.asarray(shift, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def resample(image: Image.Image, factor: float) -> Image.Image:
    """Down to `factor` of the size and back up: the detail a lower-resolution latent would lose."""
    small = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                         Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def degrade(image: Image.Image, rng: random.Random, strength: float = 1.0) -> Image.Image:
    """A random mix of all the above (each applied at random strength; `strength` scales them)."""
    image = image.convert("RGB")
    if rng.random() < 0.5:
        image = resample(image, rng.uniform(0.55, 0.8))
    image = blur(image, rng.uniform(0.3, 1.0) * strength)
    gain = 1.0 + rng.uniform(-0.1, 0.1) * strength
    shift = (rng.uniform(-15, 15) * strength, rng.uniform(-15, 15) * strength, rng.uniform(-15, 15) * strength)
    image = shift_colour(image, shift, gain)
    image = add_noise(image, rng.uniform(2.0, 8.0) * strength, rng)
    if rng.random() < 0.5:
        image = jpeg(image, rng.randint(35, 75))
    return image
