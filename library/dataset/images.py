"""Image files: finding them, reading their size cheaply, loading them as clean RGB crops.

Every image becomes 8-bit RGB however it was stored: EXIF orientation applied; transparency
composited on white (a transparent background would otherwise turn black and be learnt as such);
grayscale, palette, CMYK and 16-bit images converted. Huge images are refused before decoding.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files users keep beside images that are not images we could train on.
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".jxl", ".psd")
DEFAULT_MAX_IMAGE_PIXELS = 16384 * 16384  # 268 MP: ~800 MB as RGB; anything bigger is refused

# EXIF orientations that swap width and height (rotations by 90 or 270 degrees, with/without mirror).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class BadImageError(Exception):
    """An image that cannot be used; the message names the file and the reason."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name for a stable order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


@dataclass(frozen=True)
class ImageHeader:
    size: tuple[int, int]  # (width, height) after EXIF orientation
    file_size: int
    mtime_ns: int


# PIL's limit is one global: loader threads switch it off and back one at a time, or two could interleave
# and leave it off for the whole process
_PIL_LIMIT = threading.Lock()


def _open(path: Path, max_pixels: int) -> Image.Image:
    # PIL's own bomb check warns at half its limit and raises at the limit; ours names the file and
    # the key that raises the limit, so switch PIL's off and check the header size ourselves.
    try:
        with warnings.catch_warnings(), _PIL_LIMIT:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{path}: cannot be read as an image ({exc}); the file is corrupt or not an image.") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadImageError(
            f"{path}: {w}×{h} = {w * h / 1e6:.0f} megapixels is over the limit of {max_pixels / 1e6:.0f} MP "
            "(a guard against decompression bombs); downscale the file, or raise max_image_pixels."
        )
    if w == 0 or h == 0:
        img.close()
        raise BadImageError(f"{path}: the image has zero size.")
    return img


def read_header(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Size (as displayed, i.e. after EXIF rotation) without decoding the pixels."""
    stat = path.stat()
    if stat.st_size == 0:
        raise BadImageError(f"{path}: the file is empty (0 bytes).")
    img = _open(path, max_pixels)
    try:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block should not lose the image; orientation stays as stored
            orientation = 1
        if orientation in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    finally:
        img.close()
    return ImageHeader((w, h), stat.st_size, stat.st_mtime_ns)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; transparency is composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: PIL's convert("L") clips instead of scaling, so scale by hand
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully as RGB with EXIF orientation applied; BadImageError if it cannot be.

    `min_size` lets JPEG decoding skip detail that the resize would throw away (draft mode decodes at
    1/2, 1/4 or 1/8 scale while staying at least this large), which saves most of the time and memory
    for photos far larger than their bucket.
    """
    img = _open(path, max_pixels)
    try:
        if min_size is not None and img.format == "JPEG":
            w, h = min_size
            exif_swaps = img.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS
            img.draft("RGB", (h, w) if exif_swaps else (w, h))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: the image data is broken ({exc}); the file is truncated or corrupt.") from None


def resize_and_crop(img: Image.Image, resized: tuple[int, int], bucket: tuple[int, int], offset: tuple[int, int]) -> Image.Image:
    """Scale to `resized` (covering the bucket), then cut the bucket out at `offset`."""
    if img.size != resized:
        # reducing_gap: shrink by an integer factor first (fast box filter), then Lanczos for the rest
        img = img.resize(resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = offset
    if (left, top, left + bucket[0], top + bucket[1]) != (0, 0, *img.size):
        img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return img


def color_augment(img: Image.Image, hue_shift: float) -> Image.Image:
    """Rotate the hue by `hue_shift` (a fraction of the full circle, e.g. ±0.02)."""
    hsv = np.array(img.convert("HSV"), dtype=np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(round(hue_shift * 256))) % 256
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def to_tensor(img: Image.Image, flip: bool) -> torch.Tensor:
    """[3, H, W] float in [-1, 1], as the VAE expects; `flip` mirrors left-right."""
    arr = np.asarray(img, dtype=np.uint8)
    if flip:
        arr = arr[:, ::-1]
    # transpose and convert in one numpy copy: a strided torch .float() is several times slower
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw).mul_(1 / 127.5).sub_(1.0)


def check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise DatasetError(f"{what} '{path}' does not exist; check the path (shown here as resolved).")
    if not path.is_dir():
        raise DatasetError(f"{what} '{path}' is a file, not a folder; give the folder that holds the images.")
