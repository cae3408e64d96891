"""evaluate.py report: its numbers against hand computations and scipy, its files on disk, its refusals."""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from library.errors import ConfigError
from library.evaluate import report as R
from library.evaluate.db import DatabaseError, connect
from library.evaluate.stats import (CrossedBootstrap, average_ranks, cohen_kappa, spearman, t_interval,
                                    wilson_interval)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- database helpers

@pytest.fixture
def conn(tmp_path):
    connection = connect(tmp_path / "ratings.sqlite")
    yield connection
    connection.close()


def add_image(conn, run, prompt, seed, *, negative=None, loras=None, step=None) -> int:
    count = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    cursor = conn.execute(
        "INSERT INTO images (sha256, path, run, prompt, negative_prompt, seed, loras, training_step) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (f"sha{count}", f"{run}/{count}.png", run, prompt, negative, seed,
         json.dumps(loras) if loras is not None else None, step))
    return cursor.lastrowid


def rate(conn, image_id, rater, score, source="human"):
    """score: 0, 0.5, 1 or R.NO_HAND."""
    if score == R.NO_HAND:
        conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand, source) VALUES (?, ?, NULL, 1, ?)",
                     (image_id, rater, source))
    else:
        conn.execute("INSERT INTO ratings (image_id, rater, score, source) VALUES (?, ?, ?, ?)",
                     (image_id, rater, score, source))


def by_key(groups):
    return {(g.run, g.kind, g.training_step if g.kind == "training_step" else g.loras if g.kind == "loras"
             else None): g for g in groups}


# ------------------------------------------------------------------------------------- statistics

def test_wilson_interval_matches_the_hand_computed_bounds():
    # 5 of 20, z = 1.95996: centre (0.25 + z²/40) / (1 + z²/20) = 0.290271, half-width 0.178420
    assert wilson_interval(5, 20) == pytest.approx((0.111862, 0.468701), abs=1e-6)
    # 0 of 10: the lower end is 0 and the upper z² / (n + z²) = 3.841459 / 13.841459
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.841459 / 13.841459, abs=1e-7))
    assert wilson_interval(10, 10) == (pytest.approx(10 / 13.841459, abs=1e-7), 1.0)
    assert wilson_interval(0, 0) is None


def test_t_interval_matches_scipy_and_is_clipped_to_the_scale():
    values = [1, 0.5, 0.5, 1, 0, 1, 0.5, 0.5, 1, 1, 0.5, 0]
    expected = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert t_interval(values) == pytest.approx(expected, abs=1e-12)
    assert t_interval([1, 0.5, 1]) == (pytest.approx(np.mean([1, 0.5, 1]) - 0.717, abs=1e-3), 1.0)
    assert t_interval([1.0]) is None


def test_cohen_kappa_matches_a_confusion_table_counted_by_hand():
    nh = R.NO_HAND
    first = [1, 1, 1, 0.5, 0.5, 0, 0, nh, 1, 0]
    second = [1, 1, 0.5, 0.5, 0, 0, 0, nh, 1, 1]
    # agreements on images 1, 2, 4, 6, 7, 8, 9: p_o = 0.7. Margins (1, ½, 0, no hand): 4, 2, 3, 1 for both
    # raters, so p_e = (16 + 4 + 9 + 1) / 100 = 0.3 and kappa = (0.7 − 0.3) / (1 − 0.3) = 4/7
    assert cohen_kappa(first, second) == pytest.approx(4 / 7, abs=1e-12)
    assert cohen_kappa([1, 0, 0.5], [1, 0, 0.5]) == pytest.approx(1.0)
    # agreement at chance level: p_o = p_e = 0.5
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # one category: chance agreement is 1, kappa undefined


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(4)
    scores = rng.choice([0, 0.25, 0.5, 0.75, 1], size=60)  # few levels: many ties
    metric = scores + rng.normal(0, 0.4, size=60)
    metric[:10] = 0.3  # ties in the metric as well
    assert spearman(scores, metric) == pytest.approx(scipy.stats.spearmanr(scores, metric).statistic, abs=1e-12)
    assert list(average_ranks([3, 1, 3, 2])) == [3.5, 1, 3.5, 2]
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _brute_force_bootstrap(bootstrap, prompts, seeds, values, level=0.95):
    """The scheme written out literally: per resample, list the drawn prompts and seeds (with repeats) and
    collect every item of every chosen (prompt, seed) cell; the mean of that list."""
    prompt_names = list(bootstrap.prompt_index)
    seed_names = list(bootstrap.seed_index)
    stats = []
    for r in range(bootstrap.resamples):
        drawn_prompts = [p for p, k in zip(prompt_names, bootstrap.prompt_draws[r]) for _ in range(k)]
        drawn_seeds = [s for s, k in zip(seed_names, bootstrap.seed_draws[r]) for _ in range(k)]
        sample = [v for p in drawn_prompts for s in drawn_seeds
                  for pi, si, v in zip(prompts, seeds, values) if (pi, si) == (p, s)]
        if sample:
            stats.append(sum(sample) / len(sample))
    return tuple(np.quantile(stats, [(1 - level) / 2, (1 + level) / 2]))


def test_crossed_bootstrap_takes_every_image_of_the_chosen_cells():
    rng = np.random.default_rng(0)
    prompts = [f"p{i % 3}" for i in range(30)]
    seeds = [i % 4 for i in range(30)]  # 3 prompts × 4 seeds, two or three images in each cell
    values = rng.choice([0, 0.5, 1], size=30).tolist()
    bootstrap = CrossedBootstrap(prompts, seeds, resamples=300, seed=5)
    assert bootstrap.prompt_draws.sum(axis=1).tolist() == [3] * 300  # 3 prompts drawn with replacement
    assert bootstrap.seed_draws.sum(axis=1).tolist() == [4] * 300
    expected = _brute_force_bootstrap(bootstrap, prompts, seeds, values)
    assert bootstrap.mean_interval(prompts, seeds, values) == pytest.approx(expected, abs=1e-12)
    # a subset (one run's images) is resampled with the same draws
    sub = slice(0, 13)
    expected = _brute_force_bootstrap(bootstrap, prompts[sub], seeds[sub], values[sub])
    assert bootstrap.mean_interval(prompts[sub], seeds[sub], values[sub]) == pytest.approx(expected, abs=1e-12)


def test_a_prompt_effect_widens_the_bootstrap_interval_to_what_four_prompts_allow():
    # two prompts always draw good hands, two never: the share is (good prompts drawn) / 4, 0 with chance
    # 1/16 > 2.5 % and 1 with chance 1/16, so the 95 % interval is [0, 1]; Wilson for 50/100 is far narrower
    prompts = [f"p{p}" for p in range(4) for _ in range(25)]
    seeds = [s for _ in range(4) for s in range(25)]
    values = [1.0 if p in ("p0", "p1") else 0.0 for p in prompts]
    bootstrap = CrossedBootstrap(prompts, seeds, resamples=2000, seed=0)
    assert bootstrap.mean_interval(prompts, seeds, values) == (0.0, 1.0)
    low, high = wilson_interval(50, 100)
    assert 0.39 < low < high < 0.61
    again = CrossedBootstrap(prompts, seeds, resamples=2000, seed=0)
    assert (again.prompt_draws == bootstrap.prompt_draws).all()  # the same --seed, the same resamples


# ------------------------------------------------------------------------------------- what counts

def test_image_score_no_hand_latest_rating_and_source_filter(conn):
    a = add_image(conn, "run", "hand", 1)
    rate(conn, a, "ann", 0.0)
    rate(conn, a, "bob", 0.5)  # mean of the raters: 0.25
    b = add_image(conn, "run", "hand", 2)
    for rater, score in (("ann", R.NO_HAND), ("bob", R.NO_HAND), ("cy", 1.0)):
        rate(conn, b, rater, score)  # two of three say no hand: no hand
    c = add_image(conn, "run", "hand", 3)
    rate(conn, c, "ann", R.NO_HAND)
    rate(conn, c, "bob", 1.0)  # one of two: not more than half, so scored 1
    d = add_image(conn, "run", "hand", 4)
    rate(conn, d, "ann", 0.0)
    rate(conn, d, "ann", 1.0)  # ann changed her mind: the latest counts
    rate(conn, d, "counter", 0.0, source="counter")
    e = add_image(conn, "run", "hand", 5)  # never rated

    images = {i.id: i for i in R.load_images(conn)}
    assert images[a].score == 0.25 and not images[a].no_hand
    assert images[b].no_hand and images[b].score is None
    assert images[c].score == 1.0 and not images[c].no_hand
    assert images[d].ratings == {"ann": 1.0}
    assert images[e].ratings == {}
    assert R.load_images(conn, "counter")[3].ratings == {"counter": 0.0}
    assert R.load_images(conn, "all")[3].ratings == {"ann": 1.0, "counter": 0.0}
    assert R.load_images(conn, raters=["bob"])[0].ratings == {"bob": 0.5}

    [g] = R.summarize(conn)
    assert (g.images, g.scored, g.no_hand, g.unrated) == (5, 3, 1, 1)
    assert g.mean == pytest.approx((0.25 + 1 + 1) / 3)
    assert (g.share_1, g.share_half) == (pytest.approx(2 / 3), pytest.approx(2 / 3))

    with pytest.raises(ConfigError, match=r"--rater zed: no ratings by that rater .*raters: ann, bob, counter, cy"):
        R.load_images(conn, raters=["zed"])


def test_independent_draws_get_wilson_and_t_intervals(conn):
    scores = {"a": [1, 1, 0.5, 0, R.NO_HAND, 1, 0.5, 1], "b": [0, 0, 0.5, 1, 0, 0]}
    for run, values in scores.items():
        for k, score in enumerate(values):  # every image its own prompt and seed: nothing shared
            rate(conn, add_image(conn, run, f"{run} prompt {k}", 100 * len(run) + k + (50 if run == "b" else 0)),
                 "ann", score)
    report = R.build_report(conn)
    assert report.interval == "wilson" and report.pairs == []
    groups = by_key(report.groups)
    a = groups["a", "run", None]
    hands = [1, 1, 0.5, 0, 1, 0.5, 1]
    assert (a.images, a.scored, a.no_hand) == (8, 7, 1)
    assert a.mean == pytest.approx(5 / 7)
    assert a.mean_ci == pytest.approx(t_interval(hands))
    assert (a.share_1, a.share_1_ci) == (pytest.approx(4 / 7), pytest.approx(wilson_interval(4, 7)))
    assert (a.share_half, a.share_half_ci) == (pytest.approx(6 / 7), pytest.approx(wilson_interval(6, 7)))
    b = groups["b", "run", None]
    # 1 of 6 rated 1: Wilson by hand, z² = 3.841459: centre (1/6 + z²/12) / (1 + z²/6) = 0.296836
    assert b.share_1_ci == pytest.approx((0.030053, 0.563502), abs=1e-6)


def test_groups_per_training_step_and_lora_multiplier(conn):
    for step in (100, 200):
        for mult in (0.5, 1.0):
            for seed in range(3):
                image = add_image(conn, "lora", "hand", seed, loras=[["hands", mult]], step=step)
                rate(conn, image, "ann", 1.0 if step == 200 and mult == 1.0 else 0.5 if step == 200 else 0.0)
    for seed in range(3):
        rate(conn, add_image(conn, "base", "hand", seed), "ann", 0.0)
    groups = by_key(R.summarize(conn))
    assert set(groups) == {("base", "run", None), ("lora", "run", None), ("lora", "training_step", 100),
                           ("lora", "training_step", 200), ("lora", "loras", "hands:0.5"),
                           ("lora", "loras", "hands:1")}
    assert groups["lora", "run", None].images == 12
    assert groups["lora", "training_step", 100].mean == 0.0
    assert groups["lora", "training_step", 200].mean == 0.75
    assert groups["lora", "training_step", 200].share_1 == 0.5
    assert groups["lora", "loras", "hands:1"].mean == 0.5
    assert groups["lora", "loras", "hands:0.5"].mean == 0.25
    assert groups["base", "run", None].loras == "none"
    table = R.markdown_table(R.summarize(conn))
    assert "| lora | all | all | 12 | 12 | 0 | 0 |" in table
    assert "|  | 200 | all | 6 |" in table and "|  | all | hands:0.5 | 6 |" in table


def test_checkpoint_files_of_a_run_are_listed_once_by_step(conn):
    # a study's run: each training step is its own file, so the LoRA groups would repeat the step groups
    for step in (100, 200):
        for seed in range(2):
            rate(conn, add_image(conn, "lora", "hand", seed, loras=[[f"lora-step{step}", 1.0]], step=step), "ann", 1.0)
    groups = R.summarize(conn)
    assert sorted((g.kind, g.training_step) for g in groups) == [("run", None), ("training_step", 100),
                                                                  ("training_step", 200)]
    assert R.markdown_table(groups).count("|  | 100 |") == 1


def _shared_grid(conn):
    """Runs a and b on prompts P0, P1 × seeds 0, 1, 2; b lacks the cell (P1, 2); c has its own prompt."""
    a = {("P0", 0): 1, ("P0", 1): 1, ("P0", 2): 0.5, ("P1", 0): 0, ("P1", 1): 0.5, ("P1", 2): 1}
    b = {("P0", 0): 0.5, ("P0", 1): 0, ("P0", 2): 0.5, ("P1", 0): 0, ("P1", 1): 0}
    for run, cells in (("a", a), ("b", b)):
        for (prompt, seed), score in cells.items():
            rate(conn, add_image(conn, run, prompt, seed, negative="blurry"), "ann", score)
    rate(conn, add_image(conn, "c", "other", 9), "ann", 1)
    return a, b


def test_shared_cells_bring_the_bootstrap_and_paired_differences(conn):
    a, b = _shared_grid(conn)
    report = R.build_report(conn, resamples=1000, seed=3)
    assert report.interval == "bootstrap"
    [pair] = report.pairs  # c shares no cell with anyone
    common = [cell for cell in a if cell in b]
    diffs = [a[cell] - b[cell] for cell in common]  # 0.5, 1, 0, 0, 0.5
    assert (pair.run_a, pair.run_b, pair.cells) == ("a", "b", 5)
    assert pair.difference == pytest.approx(2 / 5)
    assert pair.mean_a == pytest.approx(3 / 5) and pair.mean_b == pytest.approx(1 / 5)
    bootstrap = CrossedBootstrap([(p, "blurry") for p in ("P0", "P0", "P1")] + [("other", "")],
                                 [0, 1, 2, 9], 1000, 3)
    assert bootstrap.prompt_index == {("P0", "blurry"): 0, ("P1", "blurry"): 1, ("other", ""): 2}
    expected = bootstrap.mean_interval([(c[0], "blurry") for c in common], [c[1] for c in common], diffs)
    assert pair.ci == pytest.approx(expected)
    group = by_key(report.groups)["a", "run", None]
    assert group.interval == "bootstrap" and group.mean == pytest.approx(4 / 6)
    assert group.mean_ci[0] <= group.mean <= group.mean_ci[1]
    assert R.build_report(conn, interval="wilson").groups[0].mean_ci == pytest.approx(t_interval(list(a.values())))
    assert R.build_report(conn, resamples=1000, seed=3).pairs == report.pairs  # fixed --seed: same numbers


def test_kappa_between_raters_in_the_report(conn):
    nh = R.NO_HAND
    first = [1, 1, 1, 0.5, 0.5, 0, 0, nh, 1, 0]
    second = [1, 1, 0.5, 0.5, 0, 0, 0, nh, 1, 1]
    for k, (x, y) in enumerate(zip(first, second)):
        image = add_image(conn, "run", f"p{k}", k)
        rate(conn, image, "ann", x)
        rate(conn, image, "bob", y)
        if k < 4:
            rate(conn, image, "cy", x)
    agreement = {(g.rater_a, g.rater_b): g for g in R.build_report(conn).agreement}
    assert agreement["ann", "bob"].images == 10
    assert agreement["ann", "bob"].kappa == pytest.approx(4 / 7)
    assert agreement["ann", "bob"].observed == pytest.approx(0.7)
    assert agreement["ann", "cy"].images == 4 and agreement["ann", "cy"].kappa == pytest.approx(1.0)
    # bob vs cy on images 0..3: (1,1) (1,1) (½,1) (½,½): p_o = 3/4, p_e = (2·3 + 2·1)/16 = 1/2, kappa 1/2
    assert agreement["bob", "cy"].kappa == pytest.approx(0.5)


def test_metric_and_prediction_correlations_match_scipy(conn):
    rng = np.random.default_rng(1)
    scores = rng.choice([0, 0.5, 1], size=40)
    for k, score in enumerate(scores):
        image = add_image(conn, "run", f"p{k}", k)
        rate(conn, image, "ann", float(score))
        conn.execute("INSERT INTO metrics (image_id, name, value) VALUES (?, 'clip score', ?)",
                     (image, float(score + rng.normal(0, 0.5))))
        conn.execute("INSERT INTO predictions (image_id, model, score) VALUES (?, 'clf-1', ?)",
                     (image, float(rng.random())))
    unscored = add_image(conn, "run", "no hand", 99)
    rate(conn, unscored, "ann", R.NO_HAND)
    conn.execute("INSERT INTO metrics (image_id, name, value) VALUES (?, 'clip score', 5.0)", (unscored,))
    correlations = {c.name: c for c in R.build_report(conn).correlations}
    assert set(correlations) == {"clip score", "prediction: clf-1"}
    clip = correlations["clip score"]
    assert clip.images == 40  # the no-hand image has no score to correlate
    values = [v for (v,) in conn.execute("SELECT value FROM metrics WHERE image_id != ? ORDER BY image_id",
                                         (unscored,))]
    assert clip.rho == pytest.approx(scipy.stats.spearmanr(scores, values).statistic, abs=1e-12)


# ------------------------------------------------------------------------------------- files and command

def _command(argv):
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    return R.run(parser.parse_args(argv))


def test_report_files_on_disk(conn, tmp_path, capsys):
    a, b = _shared_grid(conn)
    for image_id, step in ((1, 100), (2, 200), (3, 200)):
        conn.execute("UPDATE images SET training_step = ? WHERE id = ?", (step, image_id))
    conn.execute("INSERT INTO metrics (image_id, name, value) SELECT id, 'hand/landmarks', id * 0.1 FROM images")
    conn.execute("INSERT INTO set_metrics (run, name, value, std, images) VALUES ('a', 'KID', 0.0123, 0.002, 6)")
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _command(["--db", str(tmp_path / "ratings.sqlite"), "--out", str(out), "--resamples", "500"]) == 0
    assert "wrote 6 files" in capsys.readouterr().out

    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["notes.txt", "report.md", "report.csv", "pairs.csv", "agreement.csv", "plots",
         "score_by_step.png", "metric_hand_landmarks.png"])  # and no temporaries left behind
    for png in (out / "plots").iterdir():
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300
    rows = list(csv.DictReader((out / "report.csv").open()))
    run_a = next(r for r in rows if r["run"] == "a" and r["group"] == "run")
    assert float(run_a["mean_score"]) == pytest.approx(4 / 6)
    assert run_a["interval"] == "bootstrap" and run_a["set:KID"] == "0.0123"
    assert float(run_a["metric:hand/landmarks"]) == pytest.approx(np.mean([0.1 * i for i in range(1, 7)]))
    step_200 = next(r for r in rows if r["run"] == "a" and r["group"] == "training_step" and r["training_step"] == "200")
    assert step_200["images"] == "2" and float(step_200["mean_score"]) == pytest.approx(0.75)
    [pair] = list(csv.DictReader((out / "pairs.csv").open()))
    assert (pair["run_a"], pair["run_b"], pair["cells"], float(pair["difference"])) == ("a", "b", "5", 0.4)
    markdown = (out / "report.md").read_text()
    assert "| a | b | 5 | 0.600 | 0.200 | 0.400 [" in markdown
    assert "| a | KID | 0.0123 | 0.0020 | 6 |" in markdown
    assert "![score_by_step](plots/score_by_step.png)" in markdown
    assert "crossed bootstrap over prompts and seeds (500 resamples, seed 0)" in markdown


def test_plots_are_skipped_with_a_reason(conn, tmp_path):
    rate(conn, add_image(conn, "run", "hand", 1), "ann", 1.0)
    out = tmp_path / "out"
    R.write_report(R.build_report(conn), out)
    assert not (out / "plots").exists()
    markdown = (out / "report.md").read_text()
    assert "- skipped: score_by_step.png: no run has scored images at two or more training steps" in markdown
    assert "- skipped: metric plots: the database has no per-image metrics" in markdown


def test_user_mistakes_are_named(tmp_path, conn):
    with pytest.raises(DatabaseError, match=r"--db .*missing\.sqlite: no such rating database"):
        _command(["--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="has no images yet"):
        _command(["--db", str(tmp_path / "ratings.sqlite"), "--out", str(tmp_path / "out")])
    rate(conn, add_image(conn, "run", "hand", 1), "ann", 1.0)
    with pytest.raises(ConfigError, match="--resamples 10: too few"):
        _command(["--db", str(tmp_path / "ratings.sqlite"), "--out", str(tmp_path / "out"), "--resamples", "10"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--out = .*file.*cannot write there"):
        _command(["--db", str(tmp_path / "ratings.sqlite"), "--out", str(tmp_path / "file")])
    report = R.build_report(conn, source="counter")
    assert report.notes == ["no ratings of --source counter yet: the scores are empty (rate on "
                            "`evaluate.py serve`, or try another --source)"]


def test_module_imports_stay_light():
    code = ("import sys, library.evaluate.report; "
            "print(sorted(m for m in ('numpy', 'scipy', 'matplotlib', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- the README's example

def readme_example_database(conn):
    """The README's worked example: a base model and a LoRA at two steps on 3 prompts × 4 seeds, rated by
    ann (every image) and bob (seeds 1 and 2), with a CLIP-like metric."""
    prompts = ["a photo of a hand", "a hand waving", "a hand holding a cup"]
    rng = np.random.default_rng(7)
    for run, step, good in (("base", None, 0.3), ("hands-lora", 500, 0.45), ("hands-lora", 1000, 0.6)):
        for prompt in prompts:
            for seed in (1, 2, 3, 4):
                image = add_image(conn, run, prompt, seed, negative="blurry", step=step,
                                  loras=[["hands", 1.0]] if run != "base" else None)
                quality = good + 0.1 * (prompt == prompts[0]) + rng.normal(0, 0.2)
                score = R.NO_HAND if quality < 0.05 else 1.0 if quality > 0.6 else 0.5 if quality > 0.3 else 0.0
                rate(conn, image, "ann", score)
                if seed <= 2:
                    second = quality + rng.normal(0, 0.15)
                    rate(conn, image, "bob", R.NO_HAND if second < 0.05 else 1.0 if second > 0.6
                         else 0.5 if second > 0.3 else 0.0)
                conn.execute("INSERT INTO metrics (image_id, name, value) VALUES (?, 'clip_score', ?)",
                             (image, float(0.2 + 0.05 * quality + rng.normal(0, 0.01))))


def test_the_readme_example_is_this_code_s_output(conn, tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    readme_example_database(conn)
    report = R.build_report(conn)
    section = readme[readme.index("### report — "):]
    tables = [line for line in R.render_markdown(report).splitlines() if line.startswith("|")]
    assert len(tables) == 15  # four tables' headers and rules; four runs' rows, a pair, a kappa, a metric
    for line in tables:
        assert line in section, f"README's worked example is out of date: {line}"
