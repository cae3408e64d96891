"""Scores of generated toy hands, and the study's outputs: a Markdown table and a line plot (PIL only)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from library.toy_hands.counter import count_fingers


@dataclass
class HandScore:
    """What the counter read in one set of generated hand images."""

    counts: list[int] = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.counts)

    @property
    def five_rate(self) -> float:
        return sum(c == 5 for c in self.counts) / max(1, len(self.counts))

    @property
    def no_hand_rate(self) -> float:
        return sum(c == 0 for c in self.counts) / max(1, len(self.counts))

    @property
    def mean_error(self) -> float:
        """Mean |count − 5| over images with a hand."""
        hands = [c for c in self.counts if c > 0]
        return sum(abs(c - 5) for c in hands) / max(1, len(hands))

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson 95 % interval of the five-finger rate."""
        n, p = len(self.counts), self.five_rate
        if n == 0:
            return 0.0, 0.0
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.counts).items()))

    def to_dict(self) -> dict:
        lo, hi = self.interval()
        return {"images": self.images, "five_finger_rate": round(self.five_rate, 4),
                "interval95": [round(lo, 4), round(hi, 4)], "no_hand_rate": round(self.no_hand_rate, 4),
                "mean_count_error": round(self.mean_error, 4), "histogram": self.histogram()}


def score_hands(images: Iterable[Image.Image]) -> HandScore:
    return HandScore([count_fingers(im) for im in images])


def pixel_change(images: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
    """Mean absolute pixel difference between paired images, as a share of the full range (0..1)."""
    if len(images) != len(reference):
        raise ValueError("pixel_change needs the same images (prompts and seeds) on both sides")
    diffs = [np.abs(np.asarray(a.convert("RGB"), dtype=np.float32) - np.asarray(b.convert("RGB"), dtype=np.float32)).mean()
             for a, b in zip(images, reference)]
    return float(np.mean(diffs)) / 255.0 if diffs else 0.0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
              y_range: tuple[float, float] = (0.0, 1.0), size: tuple[int, int] = (720, 440),
              baseline: float | None = None) -> Image.Image:
    """A plain line chart: one polyline with markers per series, axes with ticks, a legend, and an
    optional dashed horizontal baseline."""
    width, height = size
    left, right, top, bottom = 64, 190, 48, 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [x for points in series.values() for x, _ in points] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    y_lo, y_hi = y_range
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * plot_w,
                top + (1 - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo)) * plot_h)

    draw.text((left, 8), title, fill="black", font=font)
    for i in range(6):  # y grid and ticks
        y = y_lo + (y_hi - y_lo) * i / 5
        _, py = at(x_lo, y)
        draw.line([(left, py), (left + plot_w, py)], fill=(228, 228, 228))
        draw.text((left - 40, py - 6), f"{y:.0%}" if y_hi <= 1 else f"{y:g}", fill="black", font=font)
    for x in _ticks(x_lo, x_hi):
        px, _ = at(x, y_lo)
        draw.line([(px, top + plot_h), (px, top + plot_h + 4)], fill="black")
        draw.text((px - 10, top + plot_h + 8), f"{x:g}", fill="black", font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w // 2 - 30, height - 20), x_label, fill="black", font=font)
    draw.text((6, top - 18), y_label, fill="black", font=font)
    if baseline is not None:
        _, py = at(x_lo, baseline)
        for x0 in range(left, left + plot_w, 10):
            draw.line([(x0, py), (min(x0 + 5, left + plot_w), py)], fill=(90, 90, 90))
    for k, (name, points) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [at(x, y) for x, y in sorted(points)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 8 + 16 * k
        draw.line([(left + plot_w + 12, ly + 5), (left + plot_w + 32, ly + 5)], fill=colour, width=3)
        draw.text((left + plot_w + 38, ly), name, fill="black", font=font)
    if baseline is not None:
        ly = top + 8 + 16 * len(series)
        draw.line([(left + plot_w + 12, ly + 5), (left + plot_w + 17, ly + 5)], fill=(90, 90, 90))
        draw.line([(left + plot_w + 22, ly + 5), (left + plot_w + 27, ly + 5)], fill=(90, 90, 90))
        draw.text((left + plot_w + 38, ly), "base model", fill="black", font=font)
    return image


def _ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
