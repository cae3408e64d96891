"""Latent cache: the VAE's encoding of each (image, bucket, crop, flip), in memory or beside the image.

The disk file `<image name>.latents.safetensors` holds the unscaled mean of the VAE's latent
distribution (and its mirrored twin when flip_aug is on), with metadata naming what it was made from:
the image file's size and modification time, the bucket, the resize, the crop and the VAE. A file whose
metadata differ in any of these is encoded again and overwritten; a later run with the same data and
VAE reads it instead of encoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

CACHE_SUFFIX = ".latents.safetensors"
CACHE_FORMAT = "pentadactyl-latents/1"


def cache_path(image: Path) -> Path:
    # the full image name (not the stem) keeps foo.png and foo.jpg apart
    return image.with_name(image.name + CACHE_SUFFIX)


def vae_identity(vae: torch.nn.Module) -> str:
    """A short fingerprint of what determines the latents: the encoder's config and weights.

    Only the encoder and quant_conv matter (a VAE with a fine-tuned decoder, like SD's ft-MSE one,
    encodes identically). Hashing every weight of the 34M-parameter encoder would take a second per
    run; a strided sample of each tensor plus its sum changes whenever the weights do.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(("encoder.", "quant_conv.")):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 512)
        sample = flat[::step].to("cpu", torch.float32)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
        h.update(repr(float(flat.to(torch.float64).sum())).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """Everything a cached latent depends on; stored as the file's metadata."""

    file_size: int
    mtime_ns: int
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    flipped: bool  # the mirrored latent is stored too
    vae: str

    def metadata(self) -> dict[str, str]:
        return {
            "format": CACHE_FORMAT,
            "image_file_size": str(self.file_size),
            "image_mtime_ns": str(self.mtime_ns),
            "bucket": f"{self.bucket[0]}x{self.bucket[1]}",
            "resized": f"{self.resized[0]}x{self.resized[1]}",
            "crop": f"{self.crop[0]},{self.crop[1]}",
            "flipped": str(self.flipped).lower(),
            "vae": self.vae,
        }

    def matches(self, stored: Mapping[str, str] | None) -> bool:
        """True when a file with `stored` metadata can be used for this key."""
        if not stored:
            return False
        want = self.metadata()
        for key in ("format", "image_file_size", "image_mtime_ns", "bucket", "resized", "crop", "vae"):
            if stored.get(key) != want[key]:
                return False
        # a file with the mirrored latent also serves a run without flip_aug
        return not self.flipped or stored.get("flipped") == "true"


def read_cache(path: Path, key: CacheKey) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The cached (latent, mirrored latent or None) when the file exists and matches `key`."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not key.matches(f.metadata()):
                return None
            latent = f.get_tensor("latent")
            flipped = f.get_tensor("latent_flipped") if key.flipped else None
    except Exception:  # an unreadable cache file is simply rebuilt
        return None
    if not torch.isfinite(latent).all() or (flipped is not None and not torch.isfinite(flipped).all()):
        return None
    return latent, flipped


def write_cache(path: Path, key: CacheKey, latent: torch.Tensor, flipped: torch.Tensor | None) -> None:
    from library.fileio import save_safetensors_atomic

    tensors = {"latent": latent.to(torch.float32).cpu()}
    if flipped is not None:
        tensors["latent_flipped"] = flipped.to(torch.float32).cpu()
    save_safetensors_atomic(tensors, path, metadata=key.metadata())


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Unscaled latent means [B, 4, h, w] (float32, CPU) of pixels [B, 3, H, W] in [-1, 1]."""
    dist = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
    # the mean, not a sample: a cached latent must not freeze one draw of the VAE's noise
    return dist.mean.to("cpu", torch.float32)
