"""Accuracy of the toy-hand finger counter on held-out generated hands (not part of the tests).

    python bench/bench_finger_counter.py [--images 500] [--seed 9000] [--size 64]

Draws `--images` hands with 3-7 digits (equally often, fused fingers included) from a seed the tests
and the training data do not use, counts each one clean and after `degrade` (blur, noise, colour shift,
resampling, JPEG), and prints accuracy overall and per true count, the confusions, and the accuracy
of the answers the counter was sure of (every vote agreeing).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from toy_hands import analyse_hand, degrade, draw_hand, sample_example  # noqa: E402

COUNTS = {3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0}


def measure(n: int, seed: int, size: int) -> tuple[dict[str, list[tuple[int, int, float]]], float]:
    """{condition: [(true count, counted, confidence)]} and seconds per count."""
    results: dict[str, list[tuple[int, int, float]]] = {"clean": [], "augmented": []}
    elapsed = 0.0
    for i in range(n):
        params = sample_example(seed, i, counts=COUNTS)
        image = draw_hand(params, size)
        for condition, im in (("clean", image), ("augmented", degrade(image, random.Random(f"{seed}:{i}")))):
            start = time.perf_counter()
            found = analyse_hand(im)
            elapsed += time.perf_counter() - start
            results[condition].append((params.digits, found.count, found.confidence))
    return results, elapsed / (2 * n)


def table(results: dict[str, list[tuple[int, int, float]]]) -> str:
    counts = sorted({t for rows in results.values() for t, _, _ in rows})
    head = "| condition | all | " + " | ".join(f"{c} digits" for c in counts) + " | sure: share, accuracy |"
    lines = [head, "|" + "---|" * (len(counts) + 3)]
    for condition, rows in results.items():
        cells = [f"{_acc(rows)}"] + [_acc([r for r in rows if r[0] == c]) for c in counts]
        sure = [r for r in rows if r[2] == 1.0]
        cells.append(f"{len(sure) / len(rows):.0%}, {_acc(sure)}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _acc(rows: list[tuple[int, int, float]]) -> str:
    if not rows:
        return "-"
    right = sum(t == f for t, f, _ in rows)
    return f"{right / len(rows):.1%} ({right}/{len(rows)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    results, per_image = measure(args.images, args.seed, args.size)
    print(f"{args.images} held-out hands, {args.size}×{args.size}, seed {args.seed}; "
          f"{per_image * 1000:.0f} ms per count\n")
    print(table(results))
    for condition, rows in results.items():
        wrong = Counter((t, f) for t, f, _ in rows if t != f)
        print(f"\n{condition} confusions (true → counted: times): "
              + (", ".join(f"{t}→{f}: {k}" for (t, f), k in sorted(wrong.items())) or "none"))


if __name__ == "__main__":
    main()
