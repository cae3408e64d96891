"""`evaluate.py report`: the ratings of the database as tables and plots, where blindness ends.

    python evaluate.py report --db ratings.sqlite --out report/

What counts
- Ratings: those of `--source` (`human`, the default; `counter`, the toy world's finger counter; `all`),
  and only the raters named by `--rater` when given. A rater who rated an image twice counts once, with the
  latest rating.
- An image's label: "no hand" when more than half of its counted ratings say so; otherwise its score is the
  mean of its counted scores (0, ½ or 1 each; two raters at 0 and ½ give 0.25). No-hand images are counted in
  their own column and left out of the mean and the shares; images without a counted rating are "unrated".
- Shares: "rated 1" is the share of scored images whose score is 1 (every rater gave 1); "rated ≥ ½" the
  share whose score is at least ½.

Groups: each run; within a run, each training step when its images carry more than one, and each set of
LoRA multipliers (`name:multiplier`, from the images' `loras`) when they carry more than one.

Intervals (95 %), chosen once for the whole report (`--interval auto`, or forced `bootstrap` / `wilson`):
- `bootstrap` (auto: when some cell — prompt, negative prompt, seed — holds images of two or more runs, as
  when runs are sampled on one grid of prompts × seeds): a crossed cluster bootstrap. Each of `--resamples`
  (2,000) resamples draws the selection's prompts (prompt + negative prompt) with replacement and, apart,
  its seeds with replacement, and takes all images in every chosen (prompt, seed) cell, each counted
  (draws of its prompt) × (draws of its seed); the interval is the 2.5–97.5 % percentiles of the statistic
  over the resamples (seeded by `--seed`; the same resamples for every group). An image without a seed is
  its own seed.
- `wilson` (auto: otherwise, the images being independent draws): Wilson's score interval for the shares,
  mean ± Student t × standard error for the mean score.

Paired differences: for each pair of runs, the cells where both have scored images; per cell, the
difference of the two runs' mean scores in it; their mean over the cells, with the crossed bootstrap
interval over those same cells.

Agreement: Cohen's kappa for each pair of raters over the images both rated, with four categories
(0, ½, 1, no hand).

Metrics: each per-image metric (`metrics` table) and each classifier's predictions (`predictions`) against
the images' scores: Spearman's rho, and a plot with a second-degree trend line.

Outputs in `--out`: report.md (the tables), report.csv (one row per group: all its numbers, and the group's
mean of every per-image metric), pairs.csv, agreement.csv, plots/score_by_step.png and
plots/metric_NAME.png. Every file is written atomically; other files in the folder are left alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sqlite3
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Sequence

from library.errors import ConfigError

log = logging.getLogger("pentadactyl")

NO_HAND = "no hand"
SOURCES = ("human", "counter", "classifier", "all")
INTERVALS = ("auto", "bootstrap", "wilson")
LEVEL = 0.95


# --------------------------------------------------------------------------------------------- records

@dataclass
class ImageRecord:
    """One image with what the report needs: where it was drawn from and its counted ratings."""

    id: int
    run: str
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    loras: str = "none"  # "name:multiplier, …" label; "none" without LoRAs
    training_step: int | None = None
    ratings: dict[str, float | str] = field(default_factory=dict)  # rater → 0, 0.5, 1 or NO_HAND

    @property
    def no_hand(self) -> bool:
        return sum(v == NO_HAND for v in self.ratings.values()) * 2 > len(self.ratings) > 0

    @property
    def score(self) -> float | None:
        """The mean of the counted scores; None when unrated or no hand."""
        scores = [v for v in self.ratings.values() if v != NO_HAND]
        if not scores or self.no_hand:
            return None
        return sum(scores) / len(scores)

    @property
    def prompt_key(self) -> tuple[str, str]:
        return (self.prompt or "", self.negative_prompt or "")

    @property
    def seed_key(self) -> object:
        return self.seed if self.seed is not None else ("image", self.id)

    @property
    def cell(self) -> tuple[tuple[str, str], object]:
        return (self.prompt_key, self.seed_key)


def lora_label(loras_json: str | None) -> str:
    """`[["hands", 0.75], ["style", 1]]` → "hands:0.75, style:1"; "none" for NULL or an empty list."""
    if not loras_json:
        return "none"
    try:
        loras = json.loads(loras_json)
        parts = [f"{name}:{float(mult):g}" for name, mult in loras]
    except (ValueError, TypeError):
        return str(loras_json)
    return ", ".join(parts) if parts else "none"


def load_images(conn: sqlite3.Connection, source: str = "human", raters: Sequence[str] = ()) -> list[ImageRecord]:
    """Every image of the database with the ratings that count (see the module docstring)."""
    if source not in SOURCES:
        raise ConfigError(f"--source {source}: choose one of {', '.join(SOURCES)}")
    images = {row["id"]: ImageRecord(row["id"], row["run"], row["prompt"], row["negative_prompt"], row["seed"],
                                     lora_label(row["loras"]), row["training_step"])
              for row in conn.execute("SELECT id, run, prompt, negative_prompt, seed, loras, training_step "
                                      "FROM images ORDER BY run, id")}
    if raters:
        known = {row[0] for row in conn.execute("SELECT DISTINCT rater FROM ratings")}
        unknown = sorted(set(raters) - known)
        if unknown:
            raise ConfigError(f"--rater {', '.join(unknown)}: no ratings by that rater in the database "
                              f"(raters: {', '.join(sorted(known)) or 'none yet'})")
    query, params = "SELECT image_id, rater, score, no_hand FROM ratings", []
    where = []
    if source != "all":
        where.append("source = ?")
        params.append(source)
    if raters:
        where.append(f"rater IN ({', '.join('?' * len(raters))})")
        params.extend(raters)
    if where:
        query += " WHERE " + " AND ".join(where)
    for row in conn.execute(query + " ORDER BY rated_at, id", params):  # the latest rating of a rater wins
        images[row["image_id"]].ratings[row["rater"]] = NO_HAND if row["no_hand"] else float(row["score"])
    return list(images.values())


# --------------------------------------------------------------------------------------------- results

Interval = tuple[float, float] | None


@dataclass
class GroupSummary:
    """The numbers of one group of images: a run, or one training step or LoRA set within it."""

    run: str
    kind: str  # "run", "training_step" or "loras"
    training_step: int | None  # the group's step (for a run: its only step, else None)
    loras: str | None  # the group's LoRA label, "none" without LoRAs (for a run: its only label, else None)
    images: int
    scored: int
    no_hand: int
    unrated: int
    mean: float | None
    mean_ci: Interval
    share_1: float | None
    share_1_ci: Interval
    share_half: float | None
    share_half_ci: Interval
    interval: str  # "bootstrap" or "wilson"
    metric_means: dict[str, float] = field(default_factory=dict)  # the group's mean of each per-image metric
    several_steps: bool = False  # the group spans images of more than one training step


@dataclass
class PairedDifference:
    run_a: str
    run_b: str
    cells: int
    mean_a: float | None
    mean_b: float | None
    difference: float | None  # mean over the shared cells of (run_a's cell mean − run_b's)
    ci: Interval


@dataclass
class Agreement:
    rater_a: str
    rater_b: str
    images: int
    observed: float | None  # share of the images with the same label
    kappa: float


@dataclass
class Correlation:
    """A per-image metric against the human score over the scored images that have it."""

    name: str
    images: int
    rho: float
    scores: list[float] = field(default_factory=list, repr=False)
    values: list[float] = field(default_factory=list, repr=False)


@dataclass
class Report:
    groups: list[GroupSummary]
    pairs: list[PairedDifference]
    agreement: list[Agreement]
    correlations: list[Correlation]
    set_metrics: list[dict]
    interval: str
    source: str
    raters: tuple[str, ...]
    resamples: int
    seed: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- numbers

def shared_cells(images: Sequence[ImageRecord]) -> bool:
    """True when some (prompt, negative prompt, seed) cell holds images of two or more runs."""
    runs_of: dict[object, set[str]] = {}
    for image in images:
        if image.seed is not None:
            runs_of.setdefault(image.cell, set()).add(image.run)
    return any(len(runs) > 1 for runs in runs_of.values())


def _bootstrap_for(images: Sequence[ImageRecord], resamples: int, seed: int):
    from library.evaluate.stats import CrossedBootstrap

    return CrossedBootstrap([i.prompt_key for i in images], [i.seed_key for i in images], resamples, seed)


def summarize_group(images: Sequence[ImageRecord], run: str, kind: str, method: str, bootstrap=None,
                    metric_values: dict[str, dict[int, float]] | None = None) -> GroupSummary:
    """The numbers of one group; `bootstrap` (a CrossedBootstrap) is needed when `method` is "bootstrap"."""
    from library.evaluate.stats import t_interval, wilson_interval

    scored = [i for i in images if i.score is not None]
    no_hand = sum(i.no_hand for i in images)
    unrated = sum(not i.ratings for i in images)
    scores = [i.score for i in scored]
    ones = [1.0 if s == 1.0 else 0.0 for s in scores]
    halves = [1.0 if s >= 0.5 else 0.0 for s in scores]

    def mean(values):
        return sum(values) / len(values) if values else None

    if method == "bootstrap":
        prompts, seeds = [i.prompt_key for i in scored], [i.seed_key for i in scored]
        cis = [bootstrap.mean_interval(prompts, seeds, v, LEVEL) for v in (scores, ones, halves)]
    else:
        cis = [t_interval(scores, LEVEL), wilson_interval(sum(ones), len(ones), LEVEL),
               wilson_interval(sum(halves), len(halves), LEVEL)]
    steps = {i.training_step for i in images}
    labels = {i.loras for i in images}
    means = {}
    for name, values in (metric_values or {}).items():
        have = [values[i.id] for i in images if i.id in values]
        if have:
            means[name] = sum(have) / len(have)
    return GroupSummary(run, kind, next(iter(steps)) if len(steps) == 1 else None,
                        next(iter(labels)) if len(labels) == 1 else None,
                        len(images), len(scored), no_hand, unrated,
                        mean(scores), cis[0], mean(ones), cis[1], mean(halves), cis[2], method, means,
                        len(steps) > 1)


def _groups_of_run(images: list[ImageRecord]) -> list[tuple[str, list[ImageRecord]]]:
    groups = [("run", images)]
    steps = sorted({i.training_step for i in images}, key=lambda s: (s is not None, s or 0))
    if len(steps) > 1:
        groups += [("training_step", [i for i in images if i.training_step == s]) for s in steps]
    labels = sorted({i.loras for i in images})
    by_label = [[i for i in images if i.loras == label] for label in labels]
    by_step = [members for kind, members in groups if kind == "training_step"]
    same = {frozenset(map(id, g)) for g in by_label} == {frozenset(map(id, g)) for g in by_step}
    if len(labels) > 1 and not same:  # a run's checkpoints are files of their own: those lines are the steps'
        groups += [("loras", members) for members in by_label]
    return groups


def paired_differences(images: Sequence[ImageRecord], bootstrap) -> list[PairedDifference]:
    """Each pair of runs compared on the cells where both have scored images (see the module docstring)."""
    cell_scores: dict[str, dict[object, list[float]]] = {}
    for image in images:
        if image.score is not None and image.seed is not None:
            cell_scores.setdefault(image.run, {}).setdefault(image.cell, []).append(image.score)
    pairs = []
    for a, b in combinations(sorted(cell_scores), 2):
        common = [c for c in cell_scores[a] if c in cell_scores[b]]
        if not common:
            continue
        mean_a = [sum(cell_scores[a][c]) / len(cell_scores[a][c]) for c in common]
        mean_b = [sum(cell_scores[b][c]) / len(cell_scores[b][c]) for c in common]
        diffs = [x - y for x, y in zip(mean_a, mean_b)]
        ci = bootstrap.mean_interval([c[0] for c in common], [c[1] for c in common], diffs, LEVEL)
        pairs.append(PairedDifference(a, b, len(common), sum(mean_a) / len(common), sum(mean_b) / len(common),
                                      sum(diffs) / len(diffs), ci))
    return pairs


def rater_agreement(images: Sequence[ImageRecord]) -> list[Agreement]:
    """Cohen's kappa of every pair of raters over the images both rated."""
    from library.evaluate.stats import cohen_kappa

    raters = sorted({r for i in images for r in i.ratings})
    result = []
    for a, b in combinations(raters, 2):
        both = [i for i in images if a in i.ratings and b in i.ratings]
        if not both:
            continue
        first, second = [i.ratings[a] for i in both], [i.ratings[b] for i in both]
        observed = sum(x == y for x, y in zip(first, second)) / len(both)
        result.append(Agreement(a, b, len(both), observed, cohen_kappa(first, second)))
    return result


def _metric_values(conn: sqlite3.Connection) -> dict[str, dict[int, float]]:
    """name → {image id → value} for per-image metrics and classifier predictions ("prediction: MODEL")."""
    values: dict[str, dict[int, float]] = {}
    for row in conn.execute("SELECT image_id, name, value FROM metrics WHERE value IS NOT NULL ORDER BY name"):
        values.setdefault(row["name"], {})[row["image_id"]] = float(row["value"])
    for row in conn.execute("SELECT image_id, model, score FROM predictions ORDER BY model"):
        values.setdefault(f"prediction: {row['model']}", {})[row["image_id"]] = float(row["score"])
    return values


def correlations(images: Sequence[ImageRecord], metric_values: dict[str, dict[int, float]]) -> list[Correlation]:
    from library.evaluate.stats import spearman

    result = []
    for name, values in metric_values.items():
        pairs = [(i.score, values[i.id]) for i in images if i.score is not None and i.id in values]
        scores, metric = [p[0] for p in pairs], [p[1] for p in pairs]
        result.append(Correlation(name, len(pairs), spearman(scores, metric), scores, metric))
    return result


def build_report(conn: sqlite3.Connection, source: str = "human", raters: Sequence[str] = (),
                 interval: str = "auto", resamples: int = 2000, seed: int = 0) -> Report:
    """Every number of the report from an open rating database (see the module docstring)."""
    from tqdm import tqdm

    if interval not in INTERVALS:
        raise ConfigError(f"--interval {interval}: choose one of {', '.join(INTERVALS)}")
    if resamples < 100:
        raise ConfigError(f"--resamples {resamples}: too few for a 95 % percentile interval; use 1000 or more")
    images = load_images(conn, source, raters)
    if not images:
        raise ConfigError("the rating database has no images yet; add some with `python evaluate.py import`")
    notes = []
    if not any(i.ratings for i in images):
        notes.append(f"no ratings of --source {source}" + (f" by {', '.join(raters)}" if raters else "")
                     + " yet: the scores are empty (rate on `evaluate.py serve`, or try another --source)")
        log.warning(notes[-1])
    method = interval if interval != "auto" else ("bootstrap" if shared_cells(images) else "wilson")
    bootstrap = _bootstrap_for(images, resamples, seed)
    metric_values = _metric_values(conn)
    by_run: dict[str, list[ImageRecord]] = {}
    for image in images:
        by_run.setdefault(image.run, []).append(image)
    work = [(run, kind, group) for run in sorted(by_run) for kind, group in _groups_of_run(by_run[run])]
    groups = [summarize_group(group, run, kind, method, bootstrap, metric_values)
              for run, kind, group in tqdm(work, desc="report: groups", unit="group", leave=False)]
    set_metrics = [dict(row) for row in conn.execute(
        "SELECT run, name, value, std, images, reference FROM set_metrics ORDER BY run, name")]
    return Report(groups, paired_differences(images, bootstrap), rater_agreement(images),
                  correlations(images, metric_values), set_metrics, method, source, tuple(raters),
                  resamples, seed, notes)


def summarize(conn: sqlite3.Connection, **options) -> list[GroupSummary]:
    """The per-group table alone (the options of `build_report`)."""
    return build_report(conn, **options).groups


# --------------------------------------------------------------------------------------------- writing

def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: Interval, percent: bool = False) -> str:
    if value is None:
        return "—"
    scale, digits, unit = (100, 1, " %") if percent else (1, 3, "")
    text = f"{value * scale:.{digits}f}{unit}"
    if ci is not None:
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def _group_labels(group: GroupSummary) -> tuple[str, str]:
    """(training step, LoRAs) cells of the table: "all" where a run's row spans several, "—" for no step."""
    step = "all" if group.training_step is None and group.several_steps else (
        "—" if group.training_step is None else str(group.training_step))
    return step, "all" if group.loras is None else group.loras


def markdown_table(groups: Sequence[GroupSummary]) -> str:
    """The per-group table in Markdown; each run's row first, then its steps and LoRA sets."""
    lines = ["| run | step | LoRAs | images | scored | no hand | unrated | mean score | rated 1 | rated ≥ ½ |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for g in groups:
        step, loras = _group_labels(g)
        run = g.run if g.kind == "run" else ""
        lines.append(f"| {run} | {step} | {loras} | {g.images} | {g.scored} | {g.no_hand} | {g.unrated} | "
                     f"{_with_ci(g.mean, g.mean_ci)} | {_with_ci(g.share_1, g.share_1_ci, True)} | "
                     f"{_with_ci(g.share_half, g.share_half_ci, True)} |")
    return "\n".join(lines) + "\n"


def render_markdown(report: Report, plots: Sequence[str] = (), skipped: Sequence[str] = ()) -> str:
    who = f"--source {report.source}" + (f", raters {', '.join(report.raters)}" if report.raters else "")
    if report.interval == "bootstrap":
        how = (f"crossed bootstrap over prompts and seeds ({report.resamples} resamples, seed {report.seed}): "
               "the runs share prompt × seed cells")
    else:
        how = "Wilson (shares) and Student t (mean): the images are independent draws"
    out = ["# Evaluation report", "",
           f"Ratings: {who}. Score: the mean of an image's ratings (0, ½, 1); no-hand images are counted apart "
           "and left out of the mean and the shares.", f"95 % intervals: {how}.", ""]
    out += [f"> {note}" for note in report.notes] + ([""] if report.notes else [])
    out += ["## Runs", "", markdown_table(report.groups)]
    if report.pairs:
        out += ["## Paired differences", "",
                "Mean score of run A minus run B over the prompt × seed cells both have (bootstrap over those cells).",
                "", "| run A | run B | cells | mean A | mean B | A − B [95 %] |", "|---|---|---:|---:|---:|---|"]
        out += [f"| {p.run_a} | {p.run_b} | {p.cells} | {_number(p.mean_a)} | {_number(p.mean_b)} | "
                f"{_with_ci(p.difference, p.ci)} |" for p in report.pairs]
        out.append("")
    if report.agreement:
        out += ["## Inter-rater agreement", "", "Cohen's kappa over the images both raters rated "
                "(categories 0, ½, 1, no hand).", "",
                "| rater A | rater B | images | agreement | kappa |", "|---|---|---:|---:|---:|"]
        out += [f"| {a.rater_a} | {a.rater_b} | {a.images} | {_with_ci(a.observed, None, True)} | "
                f"{_number(a.kappa)} |" for a in report.agreement]
        out.append("")
    if report.correlations:
        out += ["## Metrics against the human score", "", "Spearman's rho over the scored images that have the metric.",
                "", "| metric | images | Spearman rho |", "|---|---:|---:|"]
        out += [f"| {c.name} | {c.images} | {_number(c.rho)} |" for c in report.correlations]
        out.append("")
    if report.set_metrics:
        out += ["## Set metrics", "", "| run | metric | value | std | images | reference |",
                "|---|---|---:|---:|---:|---|"]
        out += [f"| {m['run']} | {m['name']} | {_number(m['value'], 4)} | {_number(m['std'], 4)} | {m['images']} | "
                f"{m['reference'] or ''} |" for m in report.set_metrics]
        out.append("")
    if plots or skipped:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [f"- skipped: {s}" for s in skipped]
        out.append("")
    return "\n".join(out)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def _ci_parts(ci: Interval) -> list[float | None]:
    return [None, None] if ci is None else [ci[0], ci[1]]


def groups_csv(report: Report) -> str:
    metric_names = sorted({name for g in report.groups for name in g.metric_means})
    set_names = sorted({m["name"] for m in report.set_metrics})
    set_values = {(m["run"], m["name"]): m["value"] for m in report.set_metrics}
    header = ["run", "group", "training_step", "loras", "images", "scored", "no_hand", "unrated",
              "mean_score", "mean_score_low", "mean_score_high", "share_1", "share_1_low", "share_1_high",
              "share_half", "share_half_low", "share_half_high", "interval",
              *[f"metric:{n}" for n in metric_names], *[f"set:{n}" for n in set_names]]
    rows = []
    for g in report.groups:
        rows.append([g.run, g.kind, g.training_step, g.loras, g.images, g.scored, g.no_hand, g.unrated,
                     g.mean, *_ci_parts(g.mean_ci), g.share_1, *_ci_parts(g.share_1_ci),
                     g.share_half, *_ci_parts(g.share_half_ci), g.interval,
                     *[g.metric_means.get(n) for n in metric_names],
                     *[set_values.get((g.run, n)) if g.kind == "run" else None for n in set_names]])
    return _csv_text(header, rows)


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def plot_score_by_step(groups: Sequence[GroupSummary]) -> bytes | None:
    """Mean score against training step, one line (and interval band) per run; None when no run has two steps."""
    from matplotlib.figure import Figure

    lines = {}
    for g in groups:
        if g.kind == "training_step" and g.training_step is not None and g.mean is not None:
            lines.setdefault(g.run, []).append(g)
    lines = {run: sorted(gs, key=lambda g: g.training_step) for run, gs in lines.items() if len(gs) > 1}
    if not lines:
        return None
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for run, gs in lines.items():
        steps = [g.training_step for g in gs]
        line, = axes.plot(steps, [g.mean for g in gs], marker="o", label=run)
        with_ci = [(g.training_step, g.mean_ci) for g in gs if g.mean_ci is not None]
        if len(with_ci) > 1:
            axes.fill_between([s for s, _ in with_ci], [c[0] for _, c in with_ci], [c[1] for _, c in with_ci],
                              color=line.get_color(), alpha=0.18, linewidth=0)
    for g in groups:  # runs without a step series (a base model): their mean as a dashed reference line
        if g.kind == "run" and g.run not in lines and g.mean is not None:
            axes.axhline(g.mean, linestyle="--", linewidth=1, color="grey")
            axes.annotate(g.run, (0, g.mean), xycoords=("axes fraction", "data"), xytext=(4, 3),
                          textcoords="offset points", fontsize="small", color="grey")
    axes.set_xlabel("training step")
    axes.set_ylabel("mean score (95 % interval)")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title("Score by training step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return _png_bytes(figure)


def plot_metric(correlation: Correlation) -> bytes:
    """A metric against the human score: the images, a second-degree trend line, Spearman's rho in the title."""
    import numpy as np
    from matplotlib.figure import Figure

    x, y = np.asarray(correlation.scores), np.asarray(correlation.values)
    figure = Figure(figsize=(5.2, 4.2))
    axes = figure.add_subplot()
    jitter = np.random.default_rng(0).uniform(-0.025, 0.025, x.size)  # scores sit on a few levels: spread them
    axes.scatter(x + jitter, y, s=12, alpha=0.5)
    degree = min(2, len(set(x.tolist())) - 1)
    coefficients = np.polyfit(x, y, degree)
    grid = np.linspace(x.min(), x.max(), 100)
    axes.plot(grid, np.polyval(coefficients, grid), color="black", linewidth=1.5,
              label=f"trend (degree {degree})")
    axes.set_xlabel("human score")
    axes.set_ylabel(correlation.name)
    axes.set_title(f"{correlation.name}: Spearman ρ = {correlation.rho:.3f} (n = {correlation.images})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return _png_bytes(figure)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "metric"


def write_report(report: Report, out: str | Path) -> list[Path]:
    """report.md, report.csv, pairs.csv, agreement.csv and plots/*.png in `out`; returns the files written."""
    from library.fileio import check_writable_folder, write_bytes_atomic, write_text_atomic

    out = check_writable_folder(out, "--out")
    written: list[Path] = []
    plots: list[str] = []
    skipped: list[str] = []

    def write_plot(name: str, data: bytes) -> None:
        path = out / "plots" / name
        write_bytes_atomic(path, data)
        written.append(path)
        plots.append(f"plots/{name}")

    by_step = plot_score_by_step(report.groups)
    if by_step is None:
        skipped.append("score_by_step.png: no run has scored images at two or more training steps")
    else:
        write_plot("score_by_step.png", by_step)
    if not report.correlations:
        skipped.append("metric plots: the database has no per-image metrics or classifier predictions")
    for c in report.correlations:
        if c.images < 3 or len(set(c.scores)) < 2 or len(set(c.values)) < 2:
            skipped.append(f"{c.name}: needs three scored images with the metric and more than one value of each "
                           f"(has {c.images})")
            continue
        write_plot(f"metric_{_file_name(c.name)}.png", plot_metric(c))
    for reason in skipped:
        log.info(f"report: skipped {reason}")
    files = {
        "report.md": render_markdown(report, plots, skipped),
        "report.csv": groups_csv(report),
        "pairs.csv": _csv_text(["run_a", "run_b", "cells", "mean_a", "mean_b", "difference", "low", "high"],
                               [[p.run_a, p.run_b, p.cells, p.mean_a, p.mean_b, p.difference, *_ci_parts(p.ci)]
                                for p in report.pairs]),
        "agreement.csv": _csv_text(["rater_a", "rater_b", "images", "agreement", "kappa"],
                                   [[a.rater_a, a.rater_b, a.images, a.observed,
                                     None if math.isnan(a.kappa) else a.kappa] for a in report.agreement]),
    }
    for name, text in files.items():
        write_text_atomic(out / name, text)
        written.append(out / name)
    return written


# --------------------------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (SQLite)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv, pairs.csv, "
                                                     "agreement.csv and plots/")
    parser.add_argument("--source", choices=SOURCES, default="human",
                        help="which ratings count: human raters (default), the finger counter, a classifier "
                             "(study.py's judge), or all")
    parser.add_argument("--rater", action="append", default=[], metavar="NAME",
                        help="count only this rater's ratings (repeat for several)")
    parser.add_argument("--interval", choices=INTERVALS, default="auto",
                        help="95 %% intervals: bootstrap over prompts and seeds, Wilson / t for independent "
                             "draws, or auto (bootstrap when runs share prompt × seed cells)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap (default 0)")


def run(args: argparse.Namespace) -> int:
    from library.evaluate.db import connect

    conn = connect(args.db, create=False)
    try:
        report = build_report(conn, args.source, tuple(args.rater), args.interval, args.resamples, args.seed)
    finally:
        conn.close()
    written = write_report(report, args.out)
    print(markdown_table(report.groups), end="")
    print(f"wrote {len(written)} files to {args.out} (report.md, report.csv, "
          f"{sum(p.suffix == '.png' for p in written)} plots)")
    return 0


COMMANDS = {"report": ("tables and plots of the ratings: per run, step and LoRA; agreement; metrics",
                       add_arguments, run)}
