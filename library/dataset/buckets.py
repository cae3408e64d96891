"""Aspect-ratio buckets: which resolutions exist, and which one an image goes to.

The algorithm follows sd-scripts so that a job behaves as users expect from it:

* predefined buckets (the default): every (w, h) on a grid of `steps` pixels between `min_size` and
  `max_size` whose area is at most resolution², plus the largest square; an image goes to the bucket
  with the nearest aspect ratio and is scaled to cover it, then cropped;
* `no_upscale`: each image gets its own bucket - never enlarged, shrunk to the target area only when it
  is larger, both sides rounded down to `steps`.

All functions here are pure; they see image sizes, never pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_bucket_resolutions(
    resolution: tuple[int, int], min_size: int = 256, max_size: int = 1024, steps: int = 64
) -> list[tuple[int, int]]:
    """All predefined buckets for a target area of resolution[0]·resolution[1], sorted by (w, h)."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        # the tallest height on the grid that keeps the area within budget, capped at max_size
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    """Where an image of a given size goes and how it is scaled before the crop."""

    bucket: tuple[int, int]  # (width, height) of the training crop
    resized: tuple[int, int]  # (width, height) after scaling, before cropping; covers `bucket`
    ar_error: float  # bucket aspect ratio minus image aspect ratio (reported as a statistic)


def _cover_size(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is scaled to so that it covers `bucket` with one side matching exactly."""
    w, h = image_size
    aspect = w / h
    if aspect > bucket[0] / bucket[1]:  # wider than the bucket: match heights, crop the sides
        scale = bucket[1] / h
    else:  # taller (or equal): match widths, crop top and bottom
        scale = bucket[0] / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    # rounding must never leave the image a pixel short of the bucket
    return max(resized[0], bucket[0]), max(resized[1], bucket[1])


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def select_bucket(
    image_size: tuple[int, int],
    predefined: list[tuple[int, int]] | None,
    *,
    max_area: int,
    steps: int,
) -> BucketChoice:
    """Choose a bucket for an image of `image_size` (width, height).

    With `predefined` buckets: an exact size match wins, else the nearest aspect ratio (first on ties,
    in sorted bucket order). Without (`bucket_no_upscale`): a bucket cut from the image itself.
    """
    w, h = image_size
    aspect = w / h
    if predefined is not None:
        if image_size in predefined:
            bucket = image_size
        else:
            bucket = min(predefined, key=lambda r: abs(r[0] / r[1] - aspect))
        return BucketChoice(bucket, _cover_size(image_size, bucket), bucket[0] / bucket[1] - aspect)

    if w * h > max_area:
        # shrink to the target area keeping the aspect ratio; then round whichever side gives the
        # smaller aspect error to the grid and derive the other side from it
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = _round_to_steps(rw, steps)
        bh_from_w = _round_to_steps(bw / aspect, steps)
        bh = _round_to_steps(rh, steps)
        bw_from_h = _round_to_steps(bh * aspect, steps)
        err_w = abs(bw / bh_from_w - aspect) if bh_from_w else math.inf
        err_h = abs(bw_from_h / bh - aspect) if bh else math.inf
        if err_w < err_h:
            resized = (bw, int(bw / aspect + 0.5))
        else:
            resized = (int(bh * aspect + 0.5), bh)
    else:
        resized = (w, h)  # never upscale
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    ar_error = bucket[0] / bucket[1] - aspect if bucket[1] else math.inf
    return BucketChoice(bucket, resized, ar_error)


def crop_offset(resized: tuple[int, int], bucket: tuple[int, int], random_fraction: tuple[float, float] | None) -> tuple[int, int]:
    """Top-left corner of the crop: centred, or at `random_fraction` (each in [0, 1)) of the slack."""
    slack_x, slack_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_fraction is None:
        return slack_x // 2, slack_y // 2
    return int(random_fraction[0] * (slack_x + 1)), int(random_fraction[1] * (slack_y + 1))


def format_bucket_table(rows: list[tuple[str, tuple[int, int], int, int]]) -> str:
    """A printable table of (dataset label, (w, h), images, samples per epoch) rows."""
    lines = [f"{'dataset':<10} {'bucket (w×h)':>13} {'aspect':>7} {'images':>7} {'samples/epoch':>14}"]
    for label, (w, h), images, samples in rows:
        lines.append(f"{label:<10} {f'{w}×{h}':>13} {w / h:>7.3f} {images:>7} {samples:>14}")
    return "\n".join(lines)
