"""Drawing toy hands and objects: polygons in a hand-local frame, drawn at 4× and downsampled.

The hand-local frame ("hand units", y up) is that of a right hand with its palm centre at the origin,
fingers pointing up and the wrist running down. The palm is an ellipse about one unit wide; the
fingers fan out from its upper rim, the thumb from its side (+x when the palm faces the viewer: look
at your own right palm; -x for the back of the hand), and the forearm is long enough to leave the image at any allowed
rotation, as in the study's photographs. A left hand is the mirror image of the right one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from toy_hands.params import (
    BACKGROUNDS, METALS, OBJECT_COLOURS, POLISH_COLOURS, RGB, SKIN_TONES, HandParams, ObjectParams,
)

SUPERSAMPLE = 4
UNIT = 0.34  # one hand unit as a fraction of the image side at scale 1
PALM_CENTRE = (0.5, 0.62)  # image fractions: below the middle, leaving room for the fingers
OUTLINE = 0.025  # hand units; thin, so that it does not close the gaps between fingers
FOREARM = 4.0  # hand units below the palm centre: enough to leave the image at ±60°
# Finger lengths from little finger to index finger (hand units beyond the base); the middle is longest.
LENGTH_PROFILE = (0.62, 0.80, 0.86, 0.78)

Point = tuple[float, float]


@dataclass(frozen=True)
class Digit:
    base: Point
    tip: Point
    width: float
    thumb: bool = False
    fused: bool = False
    ring_finger: bool = False


@dataclass(frozen=True)
class HandGeometry:
    palm_a: float  # half width
    palm_b: float  # half height
    wrist_half: float
    digits: tuple[Digit, ...]


def hand_geometry(p: HandParams) -> HandGeometry:
    """Where the palm, wrist and digits are, in hand units (a pure function of the parameters)."""
    width_factor = 1.08 if p.sex == "male" else 0.92
    n_fingers = max(0, p.digits - 1)
    slots = n_fingers + p.fused  # a fused finger takes two slots
    palm_a = (0.5 if p.sex == "male" else 0.46) + 0.035 * max(0, slots - 4)  # crowded hands get a wider palm
    palm_b = 0.55
    spacing = min(0.23, 1.75 * palm_a / max(slots, 1))
    finger_w = min(0.15, 0.62 * spacing) * width_factor
    # angle between neighbouring fingers: even closed fingers diverge enough to stay apart at 64 px
    fan = math.radians(10.0 + 12.0 * p.spread)
    length = p.finger_length * (1.03 if p.sex == "female" else 1.0)
    centres = [(k - (slots - 1) / 2) * spacing for k in range(slots)]
    fused_pairs = _fused_slots(slots, p.fused)
    digits: list[Digit] = []
    k = 0
    while k < slots:
        group = (k, k + 1) if k in fused_pairs else (k,)
        x = sum(centres[j] for j in group) / len(group)
        mid = sum(j - (slots - 1) / 2 for j in group) / len(group)
        t = mid / (slots - 1) + 0.5 if slots > 1 else 2 / 3  # 0 = little finger side, 1 = index side
        finger_len = float(np.interp(t, np.linspace(0, 1, len(LENGTH_PROFILE)), LENGTH_PROFILE)) * length
        angle = mid * fan
        base = (x, palm_b * math.sqrt(max(0.0, 1 - (x / palm_a) ** 2)) - 0.12)
        tip = (base[0] + math.sin(angle) * (finger_len + 0.12), base[1] + math.cos(angle) * (finger_len + 0.12))
        w = finger_w + spacing * (len(group) - 1)
        digits.append(Digit(base, tip, w, fused=len(group) == 2, ring_finger=(k == 1 or (slots < 2 and k == 0))))
        k += len(group)
    if p.digits >= 1:
        angle = math.radians(42.0 + 28.0 * p.spread)
        base = (palm_a * 0.72, -0.08)
        reach = 0.66 * p.finger_length
        digits.append(Digit(base, (base[0] + math.sin(angle) * reach, base[1] + math.cos(angle) * reach),
                            0.19 * width_factor, thumb=True))
    if p.view == "back":  # seen from the back, a right hand has its thumb on the viewer's left
        digits = [dataclasses.replace(d, base=(-d.base[0], d.base[1]), tip=(-d.tip[0], d.tip[1])) for d in digits]
    return HandGeometry(palm_a, palm_b, 0.34 * width_factor, tuple(digits))


def _fused_slots(slots: int, fused: int) -> set[int]:
    """First slots of the fused pairs: middle and ring fingers first, as in most generated hands."""
    chosen: list[int] = []
    for s in (1, 3, 5, 0, 2, 4):
        if len(chosen) < fused and s + 1 < slots and all(abs(s - c) >= 2 for c in chosen):
            chosen.append(s)
    if len(chosen) < fused:  # the greedy order can paint itself into a corner; pairs side by side always fit
        chosen = [2 * j for j in range(fused)]
    return set(chosen)


# ---- shapes in hand units --------------------------------------------------------------------------

def capsule(a: Point, b: Point, width: float, grow: float = 0.0, segments: int = 10) -> list[Point]:
    """A stadium from a to b (round ends), as a polygon."""
    r = width / 2 + grow
    heading = math.atan2(b[1] - a[1], b[0] - a[0])
    points = []
    for centre, start in ((b, heading - math.pi / 2), (a, heading + math.pi / 2)):
        for i in range(segments + 1):
            ang = start + math.pi * i / segments
            points.append((centre[0] + r * math.cos(ang), centre[1] + r * math.sin(ang)))
    return points


def ellipse(centre: Point, a: float, b: float, grow: float = 0.0, segments: int = 40) -> list[Point]:
    return [(centre[0] + (a + grow) * math.cos(2 * math.pi * i / segments),
             centre[1] + (b + grow) * math.sin(2 * math.pi * i / segments)) for i in range(segments)]


def along(d: Digit, fraction: float) -> Point:
    return (d.base[0] + (d.tip[0] - d.base[0]) * fraction, d.base[1] + (d.tip[1] - d.base[1]) * fraction)


def across(d: Digit, centre: Point, half: float) -> list[Point]:
    """A segment through `centre` perpendicular to the digit, `half` long on each side."""
    dx, dy = d.tip[0] - d.base[0], d.tip[1] - d.base[1]
    norm = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / norm * half, dx / norm * half
    return [(centre[0] - nx, centre[1] - ny), (centre[0] + nx, centre[1] + ny)]


def silhouette(g: HandGeometry, grow: float = 0.0) -> list[list[Point]]:
    wrist = [(-g.wrist_half - grow, 0.0), (g.wrist_half + grow, 0.0), (g.wrist_half * 1.1 + grow, -FOREARM),
             (-g.wrist_half * 1.1 - grow, -FOREARM)]
    digits = [capsule(d.base, d.tip, d.width, grow) for d in g.digits]
    return [ellipse((0, 0), g.palm_a, g.palm_b, grow), wrist] + digits


class Canvas:
    """Maps hand units to supersampled pixels for one hand and draws on the image."""

    def __init__(self, p: HandParams | ObjectParams, size: int, centre: Point):
        self.px = size * SUPERSAMPLE
        self.image = Image.new("RGB", (self.px, self.px), BACKGROUNDS[p.background])
        self.draw = ImageDraw.Draw(self.image)
        self.unit = UNIT * p.scale * self.px
        self.cos, self.sin = math.cos(math.radians(p.rotation)), math.sin(math.radians(p.rotation))
        self.cx, self.cy = (centre[0] + p.offset[0]) * self.px, (centre[1] + p.offset[1]) * self.px

    def map(self, points: list[Point]) -> list[Point]:
        u, c, s = self.unit, self.cos, self.sin
        return [(self.cx + u * (x * c - y * s), self.cy - u * (x * s + y * c)) for x, y in points]

    def polygon(self, points: list[Point], fill: RGB) -> None:
        self.draw.polygon(self.map(points), fill=fill)

    def stroke(self, points: list[Point], width: float, fill: RGB) -> None:
        self.draw.line(self.map(points), fill=fill, width=max(1, round(width * self.unit)), joint="curve")

    def finish(self, size: int, mirror: bool) -> Image.Image:
        image = ImageOps.mirror(self.image) if mirror else self.image
        return image.resize((size, size), Image.Resampling.LANCZOS)


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def scaled(c: RGB, f: float) -> RGB:
    return tuple(int(min(255, max(0, round(x * f)))) for x in c)  # type: ignore[return-value]


def hand_extent(p: HandParams) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) of the hand without its forearm, as image fractions from the
    centre with zero offset (x right, y down). The same for either side: a left hand mirrors its offset."""
    canvas_unit = UNIT * p.scale
    c, s = math.cos(math.radians(p.rotation)), math.sin(math.radians(p.rotation))
    g = hand_geometry(p)
    points = [pt for poly in [silhouette(g, 0.03)[0]] + silhouette(g, 0.03)[2:] for pt in poly]
    xs = [PALM_CENTRE[0] - 0.5 + canvas_unit * (x * c - y * s) for x, y in points]
    ys = [PALM_CENTRE[1] - 0.5 - canvas_unit * (x * s + y * c) for x, y in points]
    return min(xs), min(ys), max(xs), max(ys)


def draw_hand(p: HandParams, size: int = 64) -> Image.Image:
    """Render a hand: outline, skin, palm or back details, nails, jewellery."""
    g = hand_geometry(p)
    skin = scaled(SKIN_TONES[p.skin], 1.0 + p.shade)
    if p.elderly:  # older skin: a little greyer and paler
        skin = mix(skin, (170, 160, 155), 0.18)
    outline, crease = scaled(skin, 0.62), scaled(skin, 0.78)
    canvas = Canvas(p, size, PALM_CENTRE)
    for poly in silhouette(g, grow=OUTLINE):
        canvas.polygon(poly, outline)
    for poly in silhouette(g):
        canvas.polygon(poly, skin)
    if p.view == "front":
        _palm_side(canvas, g, p, skin, crease)
    else:
        _back_side(canvas, g, p, skin, crease)
    for d in g.digits:
        if d.fused:  # the seam of two fingers grown together
            canvas.stroke([along(d, 0.45), along(d, 0.97)], 0.025, crease)
    if p.ring:
        ring_finger = next((d for d in g.digits if d.ring_finger and not d.thumb), None)
        if ring_finger is not None:
            canvas.stroke(across(ring_finger, along(ring_finger, 0.3), ring_finger.width * 0.6), 0.07, METALS[p.ring])
    if p.bracelet:
        y = -0.95
        canvas.polygon([(-g.wrist_half * 1.1, y), (g.wrist_half * 1.1, y), (g.wrist_half * 1.1, y - 0.12),
                        (-g.wrist_half * 1.1, y - 0.12)], METALS[p.bracelet])
    return canvas.finish(size, mirror=p.side == "left")


def _palm_side(canvas: Canvas, g: HandGeometry, p: HandParams, skin: RGB, crease: RGB) -> None:
    """The palm: lighter skin, the three main lines, finger joint creases, polish peeking at the tips."""
    palm_tone = mix(skin, (246, 206, 190), 0.45 if p.skin == "dark" else 0.2)
    canvas.polygon(ellipse((0.02, 0.0), g.palm_a * 0.86, g.palm_b * 0.84), palm_tone)
    a, b = g.palm_a, g.palm_b
    lines = [
        [(-0.8 * a, 0.42 * b), (-0.2 * a, 0.5 * b), (0.45 * a, 0.45 * b), (0.75 * a, 0.55 * b)],  # heart line
        [(-0.8 * a, 0.1 * b), (-0.1 * a, 0.18 * b), (0.6 * a, 0.3 * b)],  # head line
        [(0.55 * a, 0.3 * b), (0.3 * a, -0.1 * b), (0.25 * a, -0.6 * b)],  # life line, around the thumb
    ]
    if p.elderly:
        lines += [[(-0.5 * a, -0.3 * b), (0.0, -0.2 * b)], [(-0.6 * a, 0.25 * b), (-0.1 * a, 0.32 * b)]]
    for line in lines:
        canvas.stroke(line, 0.03, crease)
    for d in g.digits:
        for f in ((0.55, 0.78) if not d.thumb else (0.6,)):
            canvas.stroke(across(d, along(d, f), d.width * 0.35), 0.022, crease)
        if p.nail_polish:
            canvas.polygon(capsule(along(d, 0.985), d.tip, d.width * 0.55), POLISH_COLOURS[p.nail_polish])


def _back_side(canvas: Canvas, g: HandGeometry, p: HandParams, skin: RGB, crease: RGB) -> None:
    """The back: knuckle wrinkles, nails (natural or polished), tendons; age spots when elderly."""
    nail = POLISH_COLOURS[p.nail_polish] if p.nail_polish else mix(skin, (250, 228, 222), 0.55)
    wrinkles = 3 if p.elderly else 1
    for d in g.digits:
        for f in ((0.45, 0.7) if not d.thumb else (0.55,)):
            for w in range(wrinkles):
                canvas.stroke(across(d, along(d, f + 0.03 * w), d.width * 0.3), 0.02, crease)
        length = math.dist(d.base, d.tip)
        start = max(0.0, 1 - (0.22 + d.width * 0.4) / max(length, 1e-6))
        canvas.polygon(capsule(along(d, start), along(d, 0.96), d.width * 0.55), nail)
    for d in g.digits:  # tendons fanning from the wrist towards each knuckle
        if not d.thumb:
            canvas.stroke([(d.base[0] * 0.3, -0.35), (d.base[0] * 0.9, d.base[1] - 0.1)], 0.025, scaled(skin, 0.9))
    if p.elderly:
        for x, y in ((-0.2, -0.1), (0.15, 0.15), (-0.05, -0.35), (0.25, -0.2)):
            canvas.polygon(ellipse((x * g.palm_a * 2, y), 0.035, 0.03), scaled(skin, 0.8))


# ---- non-hand objects -------------------------------------------------------------------------------

def draw_object(p: ObjectParams, size: int = 64) -> Image.Image:
    """Render a simple object (apple, star, house, tree, cup) centred in the image."""
    canvas = Canvas(p, size, (0.5, 0.5))
    colour = OBJECT_COLOURS[p.colour]
    dark = scaled(colour, 0.6)
    if p.kind == "apple":
        canvas.polygon(ellipse((0, 0), 0.95, 0.85, 0.05), dark)
        canvas.polygon(ellipse((0, 0), 0.95, 0.85), colour)
        canvas.stroke([(0, 0.7), (0.08, 1.15)], 0.08, (100, 60, 30))
        canvas.polygon(ellipse((0.3, 1.0), 0.22, 0.09), (60, 150, 50))
    elif p.kind == "star":
        star = [(math.cos(math.pi / 2 + i * math.pi / 5) * (1.2 if i % 2 == 0 else 0.5),
                 math.sin(math.pi / 2 + i * math.pi / 5) * (1.2 if i % 2 == 0 else 0.5)) for i in range(10)]
        canvas.polygon(star, colour)
    elif p.kind == "house":
        canvas.polygon([(-0.9, -1.0), (0.9, -1.0), (0.9, 0.2), (-0.9, 0.2)], colour)
        canvas.polygon([(-1.1, 0.2), (1.1, 0.2), (0.0, 1.1)], (150, 60, 50) if p.colour != "red" else (90, 60, 50))
        canvas.polygon([(-0.2, -1.0), (0.2, -1.0), (0.2, -0.4), (-0.2, -0.4)], (90, 60, 40))
    elif p.kind == "tree":
        canvas.polygon([(-0.15, -1.2), (0.15, -1.2), (0.15, 0.0), (-0.15, 0.0)], (110, 70, 40))
        canvas.polygon(ellipse((0, 0.45), 0.8, 0.75), colour)
    else:  # cup
        canvas.stroke([(0.6, 0.4), (1.0, 0.3), (1.0, -0.3), (0.6, -0.4)], 0.12, dark)
        canvas.polygon([(-0.7, 0.7), (0.7, 0.7), (0.6, -0.8), (-0.6, -0.8)], colour)
        canvas.polygon(ellipse((0, 0.7), 0.7, 0.12), dark)
    return canvas.finish(size, mirror=False)
