"""Small generated image/caption folders for the quickstart and the tests (no downloads).

Each image is a coloured shape on a plain background, and its caption says which:
"a red circle on a white background". Deterministic for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from library.fileio import atomic_path, write_text_atomic

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, background: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(w / 2 + rng.uniform(-0.1, 0.1) * w), int(h / 2 + rng.uniform(-0.1, 0.1) * h)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def write_shape_folder(folder: str | Path, count: int, size: tuple[int, int] = (64, 64), seed: int = 0,
                       shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = tuple(COLOURS),
                       backgrounds: tuple[str, ...] = tuple(BACKGROUNDS), caption_extension: str = ".txt") -> list[Path]:
    """Write `count` PNGs with caption files into `folder`; return the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        shape, colour, background = rng.choice(shapes), rng.choice(colours), rng.choice(backgrounds)
        image = draw_shape(shape, colour, background, size, rng)
        path = folder / f"{i:04d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        write_text_atomic(path.with_suffix(caption_extension), f"a {colour} {shape} on a {background} background")
        paths.append(path)
    return paths
