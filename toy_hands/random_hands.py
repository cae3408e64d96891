"""Random hand and object parameters: the draws behind every toy dataset (by seed, reproducible).

A hand is drawn first, then shrunk until its fingers fit the image (which needs the drawing's geometry,
hence a module of its own beside params.py and draw.py)."""

from __future__ import annotations

import math
import random
from typing import Any, Mapping

from toy_hands.draw import hand_extent
from toy_hands.params import (
    BACKGROUNDS, CLEAN_COUNTS, METALS, OBJECT_COLOURS, OBJECT_KINDS, POLISH_COLOURS, POSES, SEXES, SIDES, SKIN_TONES,
    VIEWS, RGB, HandParams, ObjectParams, web_like_counts,
)


def _weighted(rng: random.Random, weights: Mapping[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def sample_hand_params(rng: random.Random, *, counts: Mapping[int, float] | None = None,
                       five_finger_share: float | None = None, fused_share: float = 0.5,
                       backgrounds: tuple[str, ...] = tuple(BACKGROUNDS), pose: str = "any") -> HandParams:
    """Draw a random hand that fits the image (see `fits_image`).

    counts: digit count -> weight; default CLEAN_COUNTS (always 5). five_finger_share: shorthand for
    `web_like_counts(five_finger_share)`. fused_share: how often a hand with fewer than 5 digits shows
    it as a fused pair (the other hands simply miss a finger). pose: a key of POSES, which bounds
    the fingers' spread and the hand's tilt.
    """
    if pose not in POSES:
        raise ValueError(f"pose must be one of {tuple(POSES)}")
    spread_range, tilt = POSES[pose]
    if counts is not None and five_finger_share is not None:
        raise ValueError("give counts or five_finger_share, not both")
    if five_finger_share is not None:
        counts = web_like_counts(five_finger_share)
    digits = int(_weighted(rng, counts or CLEAN_COUNTS))
    fused = 1 if 2 <= digits < 5 and rng.random() < fused_share else 0
    skin = rng.choice(tuple(SKIN_TONES))
    base = dict(
        digits=digits, fused=fused, side=rng.choice(SIDES), view=rng.choice(VIEWS), skin=skin,
        shade=round(rng.uniform(-0.08, 0.08), 3), sex=rng.choice(SEXES), elderly=rng.random() < 0.25,
        nail_polish=rng.choice(tuple(POLISH_COLOURS)) if rng.random() < 0.35 else None,
        ring=rng.choice(tuple(METALS)) if rng.random() < 0.3 else None,
        bracelet=rng.choice(tuple(METALS)) if rng.random() < 0.15 else None,
        spread=round(rng.uniform(*spread_range), 3), finger_length=round(rng.uniform(0.85, 1.1), 3),
        background=rng.choice([b for b in backgrounds if _visible(skin, b)] or backgrounds),
    )
    scale, rotation = rng.uniform(0.85, 1.1), rng.uniform(-tilt, tilt)
    for _ in range(20):  # shrink until the fingers fit; the wrist always runs off the bottom edge
        probe = HandParams(**base, scale=round(scale, 3), rotation=round(rotation, 2))
        lo_x, lo_y, hi_x, hi_y = hand_extent(probe)
        room_x, room_y = (0.45 - hi_x, -0.45 - lo_x), (0.45 - hi_y, -0.45 - lo_y)
        if room_x[0] >= room_x[1] and room_y[0] >= room_y[1]:
            offset = (round(rng.uniform(room_x[1], room_x[0]), 3), round(rng.uniform(room_y[1], room_y[0]), 3))
            return HandParams(**base, scale=probe.scale, rotation=probe.rotation, offset=offset)
        scale *= 0.95
    raise RuntimeError("no scale fits the hand in the image")  # unreachable with the ranges above


def sample_object_params(rng: random.Random, backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)) -> ObjectParams:
    kind = rng.choice(tuple(OBJECT_KINDS))
    colour = rng.choice(OBJECT_KINDS[kind])
    visible = [b for b in backgrounds if not _close(OBJECT_COLOURS[colour], BACKGROUNDS[b])]
    background = rng.choice(visible or backgrounds)
    return ObjectParams(kind=kind, colour=colour, background=background, scale=round(rng.uniform(0.8, 1.1), 3),
                        rotation=round(rng.uniform(-20.0, 20.0), 2),
                        offset=(round(rng.uniform(-0.08, 0.08), 3), round(rng.uniform(-0.08, 0.08), 3)))


def luminance(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _visible(skin: str, background: str) -> bool:
    """Whether a hand of this skin tone stands out from the background by brightness, not only hue:
    hue differences are what blur, chroma subsampling and a small VAE lose first."""
    return abs(luminance(SKIN_TONES[skin]) - luminance(BACKGROUNDS[background])) >= 35.0


def _close(a: RGB, b: RGB, limit: float = 90.0) -> bool:
    return math.dist(a, b) < limit


# ---- captions ----------------------------------------------------------------------------------------
