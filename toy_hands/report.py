"""Scores of generated toy hands, and the study's outputs: a Markdown table and a line plot (matplotlib)."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
# A bare Figure, not pyplot: no global figure state and no display needed; savefig renders PNG with Agg.
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from PIL import Image

from library.fileio import atomic_path


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


def write_line_plot(path: str | os.PathLike, series: dict[str, list[tuple[float, float]]], title: str,
                    x_label: str, y_label: str, y_range: tuple[float, float] = (0.0, 1.0),
                    size: tuple[int, int] = (720, 440), baseline: float | None = None) -> None:
    """Write a PNG line chart of `size` pixels, atomically: one line with markers per series, a legend
    beside the axes, and an optional dashed horizontal baseline. Rates (y_range within 0..1) get
    percent ticks."""
    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    for name, points in series.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        axes.plot(xs, ys, marker="o", markersize=4, linewidth=2, label=name)
    if baseline is not None:
        axes.axhline(baseline, linestyle="--", linewidth=1, color="0.35", label="base model")
    axes.set_ylim(*y_range)
    if y_range[1] <= 1:
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, color="0.9")
    if series or baseline is not None:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
