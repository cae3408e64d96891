"""What a toy hand (or a non-hand object) is made of, how to sample one, and how to caption it.

Everything here is pure: a parameter record fully decides its image (see draw.py) and its caption, and
the samplers take an explicit `random.Random`, so a (seed, index) pair always gives the same example.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping

RGB = tuple[int, int, int]

# Base colours; HandParams.shade scales them a little so two "medium" hands need not be identical.
SKIN_TONES: dict[str, RGB] = {"fair": (236, 200, 172), "medium": (196, 144, 104), "dark": (110, 70, 46)}
# Plain backgrounds, each far (in RGB) from every skin tone so that a hand's outline is always visible.
BACKGROUNDS: dict[str, RGB] = {
    "white": (246, 246, 244), "grey": (150, 154, 160), "black": (18, 18, 22),
    "blue": (52, 92, 196), "green": (56, 150, 84), "purple": (112, 64, 150),
}
# Polish and metal colours are kept apart from the backgrounds: a fingertip must never vanish into one.
POLISH_COLOURS: dict[str, RGB] = {"red": (206, 24, 44), "pink": (236, 88, 156), "coral": (246, 120, 84)}
METALS: dict[str, RGB] = {"gold": (222, 180, 60), "silver": (204, 206, 214)}
SEXES = ("male", "female")
SIDES = ("left", "right")
VIEWS = ("front", "back")  # front = the palm faces the viewer (the study's "palmar"), back = "dorsal"

MAX_DIGITS = 7
CLEAN_COUNTS: dict[int, float] = {5: 1.0}
# How often a wrong hand has each wrong count in a "web-like" mix. "near": near misses either way (a
# finger too many or too few, sometimes two). "extra": mostly extra fingers, SD1.5's six- and
# seven-fingered hands (the second pretraining run of the toy model uses it).
WRONG_COUNTS: dict[str, dict[int, float]] = {
    "near": {3: 0.10, 4: 0.35, 6: 0.40, 7: 0.15},
    "extra": {4: 0.05, 6: 0.35, 7: 0.60},
}
# Poses: name -> (spread range, largest tilt in degrees either way). "any": every spread and tilt the
# drawing supports; "web": the pretraining mix, where fingers are apart enough to be counted (a
# 16×16 latent cannot keep two touching fingers apart, so a model would learn blobs, not counts);
# "spread": fingers fanned and the hand upright, as in a dataset photographed to a protocol (11K Hands).
POSES: dict[str, tuple[tuple[float, float], float]] = {
    "any": ((0.0, 1.0), 35.0), "web": ((0.3, 1.0), 35.0), "spread": ((0.7, 1.0), 10.0)}


@dataclass(frozen=True)
class HandParams:
    """One stylised hand. Geometry is in "hand units" (about the palm's width); see draw.py.

    digits: visible digits including the thumb, 0-7 (5 is a well-formed hand). The thumb is the first
        digit; with 0 digits only the palm and wrist are drawn.
    fused: how many of the non-thumb digits are two fingers grown together (drawn double-width, each
        counted as one digit): the "fused fingers" of generated hands.
    side / view: "left"|"right", "front" (palm towards the viewer)|"back". A left hand is the mirror
        image of the right hand with the same other parameters (rotation and offset mirror too).
    spread: 0 (fingers nearly parallel) .. 1 (fanned wide). finger_length: multiplier (bent fingers
        look shorter). scale: multiplier of the default hand size. rotation: degrees, counter-clockwise
        for a right hand. offset: palm-centre shift as fractions of the image side (x right, y down).
    """

    digits: int = 5
    fused: int = 0
    side: str = "right"
    view: str = "front"
    skin: str = "medium"
    shade: float = 0.0
    sex: str = "female"
    elderly: bool = False
    nail_polish: str | None = None
    ring: str | None = None
    bracelet: str | None = None
    spread: float = 0.5
    finger_length: float = 1.0
    scale: float = 1.0
    rotation: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)
    background: str = "white"

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.digits <= MAX_DIGITS, f"digits must be 0-{MAX_DIGITS}"),
            (0 <= self.fused <= max(0, self.digits - 1), "fused must be between 0 and digits - 1"),
            (self.side in SIDES, f"side must be one of {SIDES}"), (self.view in VIEWS, f"view must be one of {VIEWS}"),
            (self.skin in SKIN_TONES, f"skin must be one of {tuple(SKIN_TONES)}"),
            (self.sex in SEXES, f"sex must be one of {SEXES}"),
            (self.background in BACKGROUNDS, f"background must be one of {tuple(BACKGROUNDS)}"),
            (self.nail_polish is None or self.nail_polish in POLISH_COLOURS,
             f"nail_polish: None or {tuple(POLISH_COLOURS)}"),
            (self.ring is None or self.ring in METALS, f"ring: None or {tuple(METALS)}"),
            (self.bracelet is None or self.bracelet in METALS, f"bracelet: None or {tuple(METALS)}"),
            (0.0 <= self.spread <= 1.0, "spread must be in [0, 1]"),
            (0.5 <= self.finger_length <= 1.3, "finger_length must be in [0.5, 1.3]"),
            (0.4 <= self.scale <= 1.5, "scale must be in [0.4, 1.5]"),
            (abs(self.shade) <= 0.3, "shade must be in [-0.3, 0.3]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"HandParams: {message}")

    @property
    def well_formed(self) -> bool:
        """What the study counts as a good hand: five separate digits."""
        return self.digits == 5 and self.fused == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": "hand", "offset": list(self.offset)}


OBJECT_KINDS: dict[str, tuple[str, ...]] = {  # kind -> the colours it comes in (captions name them)
    "apple": ("red", "green"), "star": ("yellow", "orange"), "house": ("red", "blue", "yellow"),
    "tree": ("green",), "cup": ("red", "blue", "white"),
}
OBJECT_COLOURS: dict[str, RGB] = {
    "red": (214, 40, 40), "green": (60, 168, 56), "yellow": (240, 206, 40), "orange": (244, 140, 30),
    "blue": (40, 80, 210), "white": (250, 250, 250),
}


@dataclass(frozen=True)
class ObjectParams:
    """A non-hand concept: a simple object with its own caption, to check that a hand LoRA leaves
    other prompts alone."""

    kind: str = "apple"
    colour: str = "red"
    background: str = "white"
    scale: float = 1.0
    rotation: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.kind not in OBJECT_KINDS:
            raise ValueError(f"ObjectParams: kind must be one of {tuple(OBJECT_KINDS)}")
        if self.colour not in OBJECT_KINDS[self.kind]:
            raise ValueError(f"ObjectParams: a {self.kind} is one of {OBJECT_KINDS[self.kind]}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"ObjectParams: background must be one of {tuple(BACKGROUNDS)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": "object", "object": self.kind, "offset": list(self.offset)}


def params_from_dict(d: Mapping[str, Any]) -> HandParams | ObjectParams:
    """Inverse of `to_dict` (for manifests)."""
    d = dict(d)
    kind = d.pop("kind")
    d["offset"] = tuple(d["offset"])
    if kind == "hand":
        return HandParams(**d)
    d["kind"] = d.pop("object")
    return ObjectParams(**d)


# ---- sampling ----------------------------------------------------------------------------------------

def web_like_counts(five_finger_share: float, wrong: str = "near") -> dict[int, float]:
    """A digit-count distribution where only `five_finger_share` of hands are well formed and the rest
    follow the WRONG_COUNTS mix `wrong`."""
    if not 0.0 <= five_finger_share <= 1.0:
        raise ValueError("five_finger_share must be in [0, 1]")
    if wrong not in WRONG_COUNTS:
        raise ValueError(f"wrong must be one of {tuple(WRONG_COUNTS)}")
    counts = {k: (1.0 - five_finger_share) * w for k, w in WRONG_COUNTS[wrong].items()}
    counts[5] = five_finger_share
    return {k: v for k, v in sorted(counts.items()) if v > 0}


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
    from toy_hands.draw import hand_extent  # geometry lives with the drawing code

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

def caption_for(params: HandParams | ObjectParams) -> str:
    """The study's 11K-Hands grammar, never stating how many fingers:

        ('front'|'back') 'of' ('fair'|'medium'|'dark') '-skinned' ['elderly'] ('male'|'female')
        ('left'|'right') 'hand' ['with' ('nail polish'|'accessories'|'nail polish and accessories')]

    e.g. "back of dark-skinned elderly female left hand with nail polish and accessories". Objects:
    "a red apple on a white background".
    """
    if isinstance(params, ObjectParams):
        return f"a {params.colour} {params.kind} on a {params.background} background"
    words = [params.view, "of", f"{params.skin}-skinned"] + (["elderly"] if params.elderly else [])
    words += [params.sex, params.side, "hand"]
    extras = [name for name, present in (("nail polish", params.nail_polish),
                                         ("accessories", params.ring or params.bracelet)) if present]
    if extras:
        words += ["with", " and ".join(extras)]
    return " ".join(words)
