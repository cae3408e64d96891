"""The statistics behind `evaluate.py report`: intervals, a two-way cluster bootstrap, Cohen's kappa, Spearman.

Pure functions over numbers (numpy only), so each one can be checked against a hand computation or scipy.

- `wilson_interval`: the score interval of a binomial share, for images drawn independently of each other.
- `t_interval`: mean ± Student-t quantile × standard error, the mean score's interval for independent images.
- `CrossedBootstrap`: images come from a grid of prompts × seeds shared by the runs being compared, so two
  images with the same prompt (or the same seed) are not independent. One resample draws the prompts with
  replacement and, independently, the seeds with replacement, and takes every image in each chosen
  (prompt, seed) cell, a cell counted (times its prompt was drawn) × (times its seed was drawn). The
  statistic is recomputed on the weighted images; the interval is the 2.5 % and 97.5 % percentiles of the
  resampled values. The same resamples serve every group, so intervals and paired differences agree.
- `cohen_kappa`: agreement of two raters beyond chance, (p_observed − p_chance) / (1 − p_chance).
- `spearman`: Pearson's correlation of the ranks (ties get their average rank), as scipy.stats.spearmanr.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
_BLOCK = 256  # resamples weighted at a time


def normal_quantile(level: float) -> float:
    """The two-sided standard normal quantile for a confidence `level` (0.95 → 1.96)."""
    if level == 0.95:
        return Z95
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson's score interval for a share `successes / n`; None when n is 0."""
    if n <= 0:
        return None
    z = normal_quantile(level)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)  # exact ends, not 0.9999999999999999
    return low, high


def t_interval(values: Sequence[float], level: float = 0.95,
               bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float] | None:
    """mean ± t(n−1) × s / √n, clipped to `bounds`; None for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    mean = float(x.mean())
    return max(bounds[0], mean - half), min(bounds[1], mean + half)


class CrossedBootstrap:
    """Resamples of a prompts × seeds design: `weights(prompts, seeds)` gives each image's multiplicity.

    `prompt_keys` and `seed_keys` list every prompt and seed of the whole selection (all runs), so one
    resample means the same draw of prompts and seeds for every group.
    """

    def __init__(self, prompt_keys: Sequence[Hashable], seed_keys: Sequence[Hashable],
                 resamples: int = 2000, seed: int = 0):
        self.prompt_index = {k: i for i, k in enumerate(dict.fromkeys(prompt_keys))}
        self.seed_index = {k: i for i, k in enumerate(dict.fromkeys(seed_keys))}
        self.resamples = resamples
        rng = np.random.default_rng(seed)
        p, s = len(self.prompt_index), len(self.seed_index)
        # counts of each prompt (seed) in a draw of P (S) with replacement: shape (resamples, P) and (resamples, S)
        self.prompt_draws = rng.multinomial(p, np.full(p, 1 / p), size=resamples) if p else np.zeros((resamples, 0))
        self.seed_draws = rng.multinomial(s, np.full(s, 1 / s), size=resamples) if s else np.zeros((resamples, 0))

    def weights(self, prompts: Sequence[Hashable], seeds: Sequence[Hashable]) -> np.ndarray:
        """(resamples, n) multiplicities of the n items whose prompt and seed are given."""
        pi = np.fromiter((self.prompt_index[k] for k in prompts), dtype=np.int64, count=len(prompts))
        si = np.fromiter((self.seed_index[k] for k in seeds), dtype=np.int64, count=len(seeds))
        return (self.prompt_draws[:, pi] * self.seed_draws[:, si]).astype(np.float64)

    def mean_interval(self, prompts: Sequence[Hashable], seeds: Sequence[Hashable], values: Sequence[float],
                      level: float = 0.95) -> tuple[float, float] | None:
        """Percentile interval of the weighted mean of `values` (one per item) over the resamples.

        Items sharing a (prompt, seed) cell are aggregated first, so the work grows with cells, not images.
        Resamples that draw none of the items are left out (a group covering a few of the selection's
        prompts and seeds misses them in some draws); None when fewer than a quarter remain.
        """
        if len(values) == 0:
            return None
        cells: dict[tuple[Hashable, Hashable], list[float]] = {}
        for p, s, v in zip(prompts, seeds, values):
            total = cells.setdefault((p, s), [0.0, 0.0])
            total[0] += float(v)
            total[1] += 1.0
        keys = list(cells)
        sums = np.array([cells[k][0] for k in keys])
        counts = np.array([cells[k][1] for k in keys])
        pi = np.array([self.prompt_index[k[0]] for k in keys], dtype=np.int64)
        si = np.array([self.seed_index[k[1]] for k in keys], dtype=np.int64)
        resampled = []
        for start in range(0, self.resamples, _BLOCK):  # blocks bound the memory: _BLOCK × cells weights at a time
            block = slice(start, start + _BLOCK)
            w = (self.prompt_draws[block][:, pi] * self.seed_draws[block][:, si]).astype(np.float64)
            n = w @ counts
            ok = n > 0
            resampled.append((w[ok] @ sums) / n[ok])
        stats = np.concatenate(resampled)
        if stats.size < self.resamples / 4:
            return None
        alpha = (1 - level) / 2
        low, high = np.quantile(stats, [alpha, 1 - alpha])
        return float(low), float(high)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float:
    """Cohen's (unweighted) kappa of two raters' labels of the same items; NaN when chance agreement is 1."""
    if len(first) != len(second):
        raise ValueError("cohen_kappa: the two raters must label the same items")
    n = len(first)
    if n == 0:
        return math.nan
    categories = sorted(set(first) | set(second), key=repr)
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    for a, b in zip(first, second):
        table[index[a], index[b]] += 1
    observed = np.trace(table) / n
    chance = float((table.sum(axis=1) / n) @ (table.sum(axis=0) / n))
    if chance >= 1.0:
        return math.nan
    return float((observed - chance) / (1 - chance))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    sorted_x = x[order]
    start = 0
    while start < x.size:
        stop = start + 1
        while stop < x.size and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of the 1-based ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN when fewer than two pairs or one side is constant."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y must have the same length")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / scale if scale > 0 else math.nan
