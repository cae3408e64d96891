"""Counting the digits of a toy hand by classical geometry (numpy, PIL and scipy.ndimage): the study's
"bespoke classifier" for our miniature.

1. Foreground: the background is the median border colour; a pixel is hand when its colour distance
   to it passes an Otsu threshold. Parts much smaller than the largest are noise; holes (creases,
   nails) are filled. (A lower "hysteresis" threshold for faint pixels was tried: it closes the gaps
   between blurred fingers and cost more than it gained.)
2. Palm: the deepest point of the distance transform is the palm centre, its depth R the palm radius.
3. Digits: a morphological opening with a disc of about 0.6 R keeps the palm and the forearm but
   removes everything thinner: fingers (fused ones too), the thumb. What remains beyond a small band
   around the opened palm falls apart into one component per digit. Components reaching the image
   border are the forearm (it always leaves the image) and are not counted; short stubs are noise.
4. The count is the majority over a few disc sizes and band widths; `confidence` is the share that
   agrees, a cheap warning for the ambiguous hands a generator can draw.

The analysis runs at a fixed working size, so it behaves the same for 64 px and 512 px images, and on
a smooth foreground map (colour distance, resampled bilinearly) that blur, noise and JPEG blocks
shift but do not break.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

WORK_SIZE = 128
PAD = 1  # a frame of background: the distance transform then sees the image edge as an edge
OPENINGS = (0.5, 0.6, 0.7)  # disc radii as fractions of the palm radius
BANDS = (0.15, 0.25)  # ignored band around the opened palm, fractions of R: splits fingers touching at the base
REFERENCE = (0.6, 0.15)  # the setting that breaks ties
MIN_LENGTH = 0.35  # a digit must reach this far (× R) beyond the opened palm
MIN_CONTRAST = 24.0  # colour distance below which nothing counts as foreground
MIN_PART = 0.02  # foreground parts smaller than this share of the largest are noise
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-neighbour connectivity for ndimage.label and binary_fill_holes


@dataclass
class FingerCount:
    """The count with its evidence. Coordinates are (x, y) pixels of the input image."""

    count: int
    confidence: float
    votes: dict[int, int] = field(default_factory=dict)
    tips: list[tuple[float, float]] = field(default_factory=list)
    palm_centre: tuple[float, float] | None = None
    palm_radius: float = 0.0


def count_fingers(image: Image.Image | np.ndarray) -> int:
    """How many digits (thumb included) the hand in the image shows; 0 when there is no hand."""
    return analyse_hand(image).count


def analyse_hand(image: Image.Image | np.ndarray) -> FingerCount:
    pixels, to_input = _working_pixels(image)
    mask = _foreground(pixels)
    if mask.sum() < 30:
        return FingerCount(0, 1.0)
    mask = np.pad(mask, PAD)
    depth = _distance(~mask)  # depth inside the hand: distance to the nearest background pixel
    radius = float(depth.max())
    cy, cx = (float(v.mean()) for v in np.nonzero(depth >= radius - 0.5))
    border = np.zeros_like(mask)
    border[: PAD + 2], border[-PAD - 2:], border[:, : PAD + 2], border[:, -PAD - 2:] = True, True, True, True
    votes: Counter[int] = Counter()
    tips_by_count: dict[int, list[tuple[float, float]]] = {}
    reference = -1
    for opening in OPENINGS:
        r = opening * radius
        core = depth > r
        # distance to the eroded core; the opened palm is where it is at most r
        reach = _distance(core)
        for band in BANDS:
            digits = mask & (reach > r + band * radius)
            tips = _digit_tips(digits, reach, border, r + MIN_LENGTH * radius)
            votes[len(tips)] += 1
            tips_by_count.setdefault(len(tips), tips)
            if (opening, band) == REFERENCE:
                reference = len(tips)
    # A tie goes to the reference setting's count: neutral, unlike "closest to five", which would
    # flatter a model under study.
    count, agree = max(votes.items(), key=lambda kv: (kv[1], kv[0] == reference))
    return FingerCount(count, agree / sum(votes.values()), dict(votes),
                       [to_input(x - PAD, y - PAD) for x, y in tips_by_count[count]],
                       to_input(cx - PAD, cy - PAD), radius / to_input.scale)


class _ToInput:
    """Maps working-size pixel coordinates back to the input image."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, x: float, y: float) -> tuple[float, float]:
        return ((x + 0.5) / self.scale - 0.5, (y + 0.5) / self.scale - 0.5)


def _working_pixels(image: Image.Image | np.ndarray) -> tuple[np.ndarray, _ToInput]:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    scale = WORK_SIZE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32), _ToInput(scale)


def _foreground(pixels: np.ndarray) -> np.ndarray:
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(ring, axis=0)
    contrast = np.sqrt(((pixels - background) ** 2).sum(axis=2))
    labels, n = _labels(contrast > max(_otsu(contrast), MIN_CONTRAST))
    if n == 0:
        return np.zeros(contrast.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    # Specks of noise are tiny beside the hand; a fingertip cut off by a faint ring or nail is not.
    keep = np.flatnonzero(sizes >= MIN_PART * sizes.max()) + 1
    return _fill_holes(np.isin(labels, keep))


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean_below = np.cumsum(hist * centres) / np.maximum(weight, 1)
    mean_above = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(total - weight, 1)
    between = weight * (total - weight) * (mean_below - mean_above) ** 2
    return float(centres[int(np.argmax(between))])


def _distance(source: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of `source` (0 on it)."""
    return ndimage.distance_transform_edt(~source)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background that cannot reach the image edge (creases, nails, a ring) becomes foreground. The
    background is 8-connected too, so a gap that meets the outside only at a corner is not a hole."""
    return ndimage.binary_fill_holes(mask, structure=_EIGHT)


def _labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of `mask`, 8-neighbour (a one-pixel-wide slanted stroke stays one part),
    numbered 1..n in raster order of their first pixel; 0 outside."""
    return ndimage.label(mask, structure=_EIGHT)


def _digit_tips(digits: np.ndarray, reach: np.ndarray, border: np.ndarray,
                min_reach: float) -> list[tuple[float, float]]:
    """The tip (x, y) of each component that is long enough and does not touch the border."""
    labels, n = _labels(digits)
    tips = []
    for label in range(1, n + 1):
        part = labels == label
        if (part & border).any():
            continue
        score = np.where(part, reach, -1.0)
        if score.max() < min_reach:
            continue
        y, x = np.unravel_index(int(np.argmax(score)), score.shape)
        tips.append((float(x), float(y)))
    return tips
