"""evaluate.py train-classifier and score: the classifier learns a separable toy problem from the ratings
(held out by whole prompt × seed cells, well above chance), its files are safetensors + JSON, `score`
fills `predictions` for the unrated images, and broken inputs give the exact messages."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from library.errors import ConfigError
from library.evaluate import classifier
from library.evaluate.db import connect
from support import write_tiny_clip


def draw(path, good: bool, rng: random.Random, size=32, by="shape"):
    """A good image is a disc, a bad one a square (by='shape'); or red vs blue (by='colour')."""
    bg = tuple(rng.randrange(200, 256) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if by == "shape":
        colour = tuple(rng.randrange(0, 120) for _ in range(3))
        (d.ellipse if good else d.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        colour = (rng.randrange(150, 255), rng.randrange(0, 60), rng.randrange(0, 60)) if good else \
            (rng.randrange(0, 60), rng.randrange(0, 60), rng.randrange(150, 255))
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def build_db(tmp_path, cells=24, unrated=8, by="shape", seed=0):
    """Two runs of the same prompt × seed cells (near-duplicate twins share a label), all rated by a human;
    plus unrated images in a third run. Returns (db, {image id: good?})."""
    rng = random.Random(seed)
    db = tmp_path / "ratings.sqlite"
    conn = connect(db)
    truth = {}

    def add(run, name, prompt, seed_, good):
        path = tmp_path / "img" / run / f"{name}.png"
        draw(path, good, rng, by=by)
        cur = conn.execute("INSERT INTO images (sha256, path, run, prompt, seed) VALUES (?, ?, ?, ?, ?)",
                           (f"{run}/{name}", str(path), run, prompt, seed_))
        truth[cur.lastrowid] = good
        return cur.lastrowid

    for c in range(cells):
        good = c % 2 == 0
        for run in ("a", "b"):
            image_id = add(run, str(c), f"a hand, cell {c}", c, good)
            conn.execute("INSERT INTO ratings (image_id, rater, score) VALUES (?, 'ann', ?)", (image_id, float(good)))
    for u in range(unrated):
        add("new", str(u), f"a new hand {u}", 100 + u, u % 2 == 0)
    conn.close()
    return db, truth


def parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def train(argv):
    return classifier.run_train(parse(classifier.add_train_arguments, [*argv, "--device", "cpu"]))


def score(argv):
    return classifier.run_score(parse(classifier.add_score_arguments, [*argv, "--device", "cpu"]))


def test_labels_leave_out_half_credit_disagreement_and_no_hand(tmp_path):
    db, _ = build_db(tmp_path, cells=2, unrated=0)
    conn = connect(db)
    ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY id")]
    conn.execute("INSERT INTO ratings (image_id, rater, score) VALUES (?, 'bob', 0.5)", (ids[0],))  # disagrees
    conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand) VALUES (?, 'bob', NULL, 1)", (ids[1],))
    conn.execute("INSERT INTO ratings (image_id, rater, score, source) VALUES (?, 'counter', 0, 'counter')", (ids[2],))
    items, left_out = classifier.labelled_images(conn, db, "human", None)
    assert {it.image_id: it.label for it in items} == {ids[2]: 0, ids[3]: 0}
    assert left_out == {"half credit or raters disagree": 1, "no hand": 1}
    items, _ = classifier.labelled_images(conn, db, "counter", None)
    assert [(it.image_id, it.label) for it in items] == [(ids[2], 0)]
    # human 0 and counter 0 agree: kept with --source all; the two twins of a cell share one cell key
    items, _ = classifier.labelled_images(conn, db, "all", None)
    assert {it.image_id for it in items} == {ids[2], ids[3]} and items[0].cell == items[1].cell == ("a hand, cell 1", 1)


def test_split_keeps_whole_cells_on_one_side_and_is_seeded():
    items = [classifier.Labelled(i, None, i % 2, ("p", i // 3)) for i in range(30)]  # 10 cells of 3
    train, test = classifier.split_by_cell(items, 0.2, seed=7)
    assert len(test) == 6 and len(train) == 24  # two whole cells: 6 ≥ 20 % of 30
    assert not {it.cell for it in train} & {it.cell for it in test}
    assert classifier.split_by_cell(items, 0.2, seed=7) == (train, test)
    assert classifier.split_by_cell(items, 0.2, seed=8)[1] != test


def test_cnn_learns_discs_from_squares_and_score_fills_predictions(tmp_path, capsys):
    db, truth = build_db(tmp_path, cells=24, unrated=8)
    out = tmp_path / "clf"
    assert train(["--db", str(db), "--out", str(out), "--image-size", "32", "--epochs", "20", "--batch-size", "8",
                  "--held-out", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "classifier.safetensors"]
    config = json.loads((out / "classifier.json").read_text())
    assert config["kind"] == "cnn" and config["name"] == "clf" and config["trained_on"]["images"] == 36
    held = config["held_out"]
    assert held["images"] == 12 and held["cells"] == 6 and held["majority_baseline"] <= 4 / 6
    assert held["accuracy"] >= 0.9, held  # chance is 0.5
    assert f"held-out accuracy {held['accuracy']:.3f} ({held['correct']}/12 images in 6 prompt × seed cells" in printed

    # the held-out images' cells have no twin in training, and the saved model gives the reported accuracy
    conn = connect(db)
    cell = {r["id"]: (r["prompt"], r["seed"]) for r in conn.execute("SELECT * FROM images")}
    rated = {r[0] for r in conn.execute("SELECT image_id FROM ratings")}
    test_ids = set(config["held_out_images"])
    assert not {cell[i] for i in test_ids} & {cell[i] for i in rated - test_ids}
    scorer = classifier.Scorer(out, "cpu")
    paths = [r["path"] for r in conn.execute(f"SELECT * FROM images WHERE id IN ({','.join(map(str, test_ids))}) "
                                             "ORDER BY id")]
    prob = scorer.probabilities([Path(p) for p in paths], 8)
    correct = sum(int((p >= 0.5) == truth[i]) for p, i in zip(prob.tolist(), sorted(test_ids)))
    assert correct == held["correct"]

    assert score(["--db", str(db), "--classifier", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["image_id"]: r["score"] for r in conn.execute("SELECT * FROM predictions WHERE model = 'clf'")}
    unrated = set(truth) - rated
    assert set(rows) == unrated  # only images without a human rating
    assert all(0 <= v <= 1 for v in rows.values())
    assert sum((rows[i] >= 0.5) == truth[i] for i in unrated) >= 7  # of 8 new images
    assert "score: 8 predictions stored as model 'clf'" in printed and "  new: 8 images" in printed
    assert score(["--db", str(db), "--classifier", str(out), "--all"]) == 0
    assert conn.execute("SELECT COUNT(*) FROM predictions WHERE model = 'clf'").fetchone()[0] == len(truth)
    # training again into the same folder replaces it
    assert train(["--db", str(db), "--out", str(out), "--image-size", "32", "--epochs", "1", "--name", "v2"]) == 0
    assert json.loads((out / "classifier.json").read_text())["name"] == "v2"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """The tiny random CLIP (support.write_tiny_clip)."""
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_backbone_features_and_logistic_head_learn_red_from_blue(tmp_path, clip_folder, capsys):
    db, truth = build_db(tmp_path, cells=20, unrated=6, by="colour")
    out = tmp_path / "clf-clip"
    assert train(["--db", str(db), "--out", str(out), "--backbone", str(clip_folder)]) == 0
    config = json.loads((out / "classifier.json").read_text())
    assert config["kind"] == "backbone-logistic" and config["backbone_type"] == "clip" and config["features"] == 16
    assert config["held_out"]["accuracy"] >= 0.9, config["held_out"]
    from safetensors.torch import load_file

    assert sorted(load_file(str(out / "classifier.safetensors"))) == ["feature_mean", "feature_std", "head.bias",
                                                                      "head.weight"]
    assert score(["--db", str(db), "--classifier", str(out)]) == 0
    conn = connect(db)
    rows = {r["image_id"]: r["score"] for r in conn.execute("SELECT * FROM predictions")}
    assert len(rows) == 6 and sum((rows[i] >= 0.5) == truth[i] for i in rows) >= 5
    # a moved backbone folder is named, and --backbone points at its new place
    moved = tmp_path / "moved-clip"
    clip_folder.rename(moved)
    try:
        with pytest.raises(ConfigError) as e:
            score(["--db", str(db), "--classifier", str(out)])
        assert str(e.value) == (f"--classifier {out}: classifier.json backbone {clip_folder}: no such folder; "
                                "give the folder the classifier was trained with as --backbone DIR")
        assert score(["--db", str(db), "--classifier", str(out), "--backbone", str(moved)]) == 0
    finally:
        moved.rename(clip_folder)


def test_train_and_score_refuse_what_they_cannot_use(tmp_path):
    db, _ = build_db(tmp_path, cells=6, unrated=0)

    def error(fn, argv):
        with pytest.raises(ConfigError) as e:
            fn(argv)
        return str(e.value)

    few, _ = build_db(tmp_path / "few", cells=3, unrated=0)  # cells 0 and 2 good, 1 bad; two runs each
    assert error(train, ["--db", str(few), "--out", str(tmp_path / "c")]) == (
        f"--db {few}: 2 images rated 0 and 4 rated 1 (ratings from --source human); a classifier needs at least "
        "4 of each: rate more images with `evaluate.py serve`")
    assert error(train, ["--db", str(db), "--out", str(tmp_path / "c"), "--source", "counter"]) == (
        f"--db {db}: 0 images rated 0 and 0 rated 1 (ratings from --source counter); a classifier needs at least "
        "4 of each: rate more images with `evaluate.py serve`")
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert error(train, ["--db", str(db), "--out", str(mine)]) == (
        f"--out {mine}: exists and is not a classifier folder (no classifier.json); choose a new folder, nothing "
        "in this one is replaced")
    assert (mine / "notes.txt").read_text() == "keep me"
    assert error(train, ["--db", str(db), "--out", str(tmp_path / "c"), "--backbone", str(tmp_path / "none")]) == (
        f"--backbone {tmp_path / 'none'}: no such folder; expected a vision model (CLIP or ViT) folder written by "
        "save_pretrained (config.json, model.safetensors)")

    clf = tmp_path / "clf"
    assert error(score, ["--db", str(db), "--classifier", str(clf)]) == (
        f"--classifier {clf}: no classifier.json there; train a classifier with "
        f"`python evaluate.py train-classifier --db DB --out {clf}`")
    train(["--db", str(db), "--out", str(clf), "--image-size", "16", "--epochs", "1", "--held-out", "0.3"])
    weights = clf / "classifier.safetensors"
    weights.write_bytes(b"\x00" * 12)
    assert error(score, ["--db", str(db), "--classifier", str(clf)]).startswith(
        f"--classifier {weights}: not a readable safetensors file (")
    (clf / "classifier.json").write_text('{"format": "something else"}')
    assert error(score, ["--db", str(db), "--classifier", str(clf)]) == (
        f"--classifier {clf}: classifier.json is not a pentadactyl rating classifier (format 'something else')")


def test_evaluate_py_turns_a_bad_classifier_folder_into_one_line_and_exit_2(tmp_path, capsys):
    import evaluate

    db, _ = build_db(tmp_path, cells=2, unrated=1)
    assert evaluate.main(["score", "--db", str(db), "--classifier", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evaluate.py score: error: --classifier {tmp_path / 'nope'}: no classifier.json there; train a "
                   f"classifier with `python evaluate.py train-classifier --db DB --out {tmp_path / 'nope'}`"]
