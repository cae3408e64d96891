"""What a toy hand (or a non-hand object) is made of, how to sample one, and how to caption it.

Everything here is pure: a parameter record fully decides its image (see draw.py) and its caption, and
the samplers take an explicit `random.Random`, so a (seed, index) pair always gives the same example.
"""

from __future__ import annotations

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
