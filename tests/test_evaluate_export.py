"""The bad-generation loop: rate-with-counter fills ratings, export writes the folders, and the negative
textual-inversion preset trains on them as they are."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from library.evaluate.db import connect
from library.sampling.infotext import a1111_parameters, save_png_atomic

REPO = Path(__file__).resolve().parent.parent


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


# (name, what is drawn, the rating it must get: 1 five digits, 0 another count, None no hand)
TOY_IMAGES = [
    ("five-a", ("hand", 5, "white"), 1.0), ("five-b", ("hand", 5, "black"), 1.0), ("five-c", ("hand", 5, "white", 1.0), 1.0),
    ("six", ("hand", 6, "white"), 0.0), ("seven", ("hand", 7, "black"), 0.0), ("four", ("hand", 4, "white"), 0.0),
    ("apple", ("object", "apple", "red"), None), ("cup", ("object", "cup", "blue"), None),
]


@pytest.fixture
def toy_db(tmp_path) -> tuple[Path, dict[str, str]]:
    """Toy hands whose digit counts are known from how they were drawn, imported; {name: sha256}."""
    import hashlib

    from toy_hands import HandParams, ObjectParams, draw_hand, draw_object

    folder = tmp_path / "generated"
    shas = {}
    for i, (name, what, _) in enumerate(TOY_IMAGES):
        if what[0] == "hand":
            image = draw_hand(HandParams(digits=what[1], background=what[2], spread=what[3] if len(what) > 3 else 0.7), 64)
        else:
            image = draw_object(ObjectParams(kind=what[1], colour=what[2]), 64)
        params = a1111_parameters(f"a hand {name}", "", steps=20, sampler="DDIM", cfg_scale=7.5, seed=i,
                                  width=64, height=64)
        path = save_png_atomic(image, folder / f"{name}.png", params)
        shas[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    db = tmp_path / "ratings.sqlite"
    assert evaluate("import", "--db", str(db), str(folder)).returncode == 0
    return db, shas


def table(db: Path, query: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def test_counter_rates_what_was_drawn_and_a_second_run_adds_nothing(toy_db):
    db, shas = toy_db
    first = evaluate("rate-with-counter", "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == ("the counter rated 8 image(s): 3 with five digits (1), 3 with another count (0), "
                                    "2 without a hand; 0 rated by it before")
    got = {sha: (score, no_hand, rater, source) for sha, score, no_hand, rater, source in table(
        db, "SELECT i.sha256, r.score, r.no_hand, r.rater, r.source FROM ratings r JOIN images i ON i.id = r.image_id")}
    expected = {shas[name]: (want, int(want is None), "counter", "counter") for name, _, want in TOY_IMAGES}
    assert got == expected
    second = evaluate("rate-with-counter", "--db", str(db))
    assert "rated 0 image(s)" in second.stdout and "8 rated by it before" in second.stdout
    assert table(db, "SELECT COUNT(*) FROM ratings") == [(8,)]


def add_rating(db: Path, sha: str, rater: str, score, at: str) -> None:
    conn = connect(db)
    image_id = conn.execute("SELECT id FROM images WHERE sha256 = ?", (sha,)).fetchone()[0]
    conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand, rated_at) VALUES (?, ?, ?, ?, ?)",
                 (image_id, rater, None if score == "n" else score, int(score == "n"), at))
    conn.close()


def exported(folder: Path) -> set[str]:
    listing = json.loads((folder / "export.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(i["file"] for i in listing["images"]), "export.json"])
    return {i["sha256"] for i in listing["images"]}


def test_several_ratings_of_an_image_combine_as_documented(tmp_path, toy_db):
    db, s = toy_db
    t = iter(f"2026-01-01T00:00:{n:02d}.000Z" for n in range(60))
    add_rating(db, s["six"], "alice", 0.0, next(t)); add_rating(db, s["six"], "bob", 0.0, next(t))        # 0
    add_rating(db, s["seven"], "alice", 0.0, next(t)); add_rating(db, s["seven"], "bob", 0.5, next(t))    # 0.25
    add_rating(db, s["four"], "alice", 1.0, next(t)); add_rating(db, s["four"], "alice", 0.0, next(t))    # latest: 0
    add_rating(db, s["apple"], "alice", "n", next(t)); add_rating(db, s["apple"], "bob", "n", next(t))
    add_rating(db, s["apple"], "carol", 0.0, next(t))                                                     # no hand
    add_rating(db, s["cup"], "alice", "n", next(t)); add_rating(db, s["cup"], "bob", 0.0, next(t))        # 0 (1 of 2)
    add_rating(db, s["five-a"], "alice", 1.0, next(t)); add_rating(db, s["five-a"], "bob", 0.5, next(t))  # 0.75
    add_rating(db, s["five-b"], "bob", 1.0, next(t))                                                      # 1
    evaluate("rate-with-counter", "--db", str(db))  # the counter's ratings do not count by default

    bad = evaluate("export", "--db", str(db), "--score", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 0, bad.stderr
    assert exported(tmp_path / "bad") == {s["six"], s["four"], s["cup"]}
    assert exported_files_equal(tmp_path / "bad", db)
    evaluate("export", "--db", str(db), "--score", "1", "--out", str(tmp_path / "good"))
    assert exported(tmp_path / "good") == {s["five-b"]}
    evaluate("export", "--db", str(db), "--score", "0.5", "--out", str(tmp_path / "half"))
    assert not (tmp_path / "half").exists()  # nothing is exactly 0.5: refused, nothing written
    only_bob = evaluate("export", "--db", str(db), "--score", "0", "--out", str(tmp_path / "bob"), "--rater", "bob")
    assert only_bob.returncode == 0 and exported(tmp_path / "bob") == {s["six"], s["cup"]}
    counter = evaluate("export", "--db", str(db), "--score", "1", "--out", str(tmp_path / "c"), "--source", "counter")
    assert counter.returncode == 0, counter.stderr
    assert exported(tmp_path / "c") == {s["five-a"], s["five-b"], s["five-c"]}


def exported_files_equal(folder: Path, db: Path) -> bool:
    """Each exported PNG is the imported file byte for byte (its A1111 parameters kept); no caption files."""
    paths = dict(table(db, "SELECT sha256, path FROM images"))
    listing = json.loads((folder / "export.json").read_text())["images"]
    assert not list(folder.glob("*.txt"))
    return all((folder / i["file"]).read_bytes() == Path(paths[i["sha256"]]).read_bytes() for i in listing)


def test_export_never_overwrites_what_the_user_made(tmp_path, toy_db):
    db, _ = toy_db
    evaluate("rate-with-counter", "--db", str(db))
    out = tmp_path / "bad"
    first = evaluate("export", "--db", str(db), "--score", "0", "--out", str(out), "--source", "counter")
    assert first.returncode == 0 and len(exported(out)) == 3
    again = evaluate("export", "--db", str(db), "--score", "0", "--out", str(out), "--source", "counter")
    assert again.returncode == 0 and len(exported(out)) == 3  # an earlier export is replaced
    (out / "mine.png").write_bytes(b"the user's own file")
    refused = evaluate("export", "--db", str(db), "--score", "0", "--out", str(out), "--source", "counter")
    assert refused.returncode == 2 and "files were added after the last export (mine.png)" in refused.stderr
    assert (out / "mine.png").read_bytes() == b"the user's own file"
    theirs = tmp_path / "photos"
    theirs.mkdir()
    (theirs / "holiday.jpg").write_bytes(b"x")
    refused = evaluate("export", "--db", str(db), "--score", "0", "--out", str(theirs), "--source", "counter")
    assert refused.returncode == 2 and "holds files that no export wrote (holiday.jpg" in refused.stderr
    assert [p.name for p in theirs.iterdir()] == ["holiday.jpg"]
    nothing = evaluate("export", "--db", str(db), "--score", "0", "--out", str(tmp_path / "x"))
    assert nothing.returncode == 2 and "no image of" in nothing.stderr and "--source counter" in nothing.stderr
    typo = evaluate("export", "--db", str(tmp_path / "typo.sqlite"), "--score", "0", "--out", str(tmp_path / "y"))
    assert typo.returncode == 2 and "no such rating database" in typo.stderr and not (tmp_path / "typo.sqlite").exists()


@pytest.mark.slow
def test_exported_folders_train_the_negative_preset_as_they_are(tmp_path, toy_db, tiny_single_file):
    """sample → rate (the counter) → export → train_textual_inversion.py with dataset_configs/ti_negative_hands.toml,
    its contrastive mode included; only paths, sizes and the step count are changed on the command line."""
    from safetensors import safe_open

    db, _ = toy_db
    assert evaluate("rate-with-counter", "--db", str(db)).returncode == 0
    for score, name in (("0", "bad"), ("1", "good")):
        result = evaluate("export", "--db", str(db), "--score", score, "--out", str(tmp_path / name), "--source", "counter")
        assert result.returncode == 0, result.stderr
    out = tmp_path / "embeddings"
    # the preset with its folder edited to the export, as its header says; its contrastive line switched on
    preset = (REPO / "dataset_configs" / "ti_negative_hands.toml").read_text(encoding="utf-8")
    assert 'image_dir = "data/bad_hands"' in preset and '# contrastive_data_dir = "data/good_hands"' in preset
    job = tmp_path / "ti_negative_hands.toml"
    job.write_text(preset.replace('"data/bad_hands"', json.dumps(str(tmp_path / "bad")))
                   .replace('# contrastive_data_dir = "data/good_hands"',
                            f"contrastive_data_dir = {json.dumps(str(tmp_path / 'good'))}"), encoding="utf-8")
    prompts = tmp_path / "prompts.txt"  # the preset's prompts at 512 px, 30 steps would take minutes here
    prompts.write_text("palm of a hand --n <badhand> --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    train = subprocess.run(
        [sys.executable, "train_textual_inversion.py", "--config", str(job),
         "--pretrained_model_name_or_path", str(tiny_single_file), "--output_dir", str(out),
         "--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "64", "--train_batch_size", "2",
         "--max_train_steps", "2", "--mixed_precision", "no", "--sample_prompts", str(prompts),
         "--sample_at_first", "false", "--max_data_loader_n_workers", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    embedding = out / "badhand.safetensors"
    with safe_open(str(embedding), "pt") as f:
        vectors = f.get_tensor("emb_params")
        meta = f.metadata()
    assert vectors.shape[0] == 1 and meta["ss_contrastive_data_dir"] == "good"  # the preset's one vector (the paper's v*)
    # the exported folders as they are: 3 bad and 3 good images, each captioned by the object template
    assert "3 training images" in train.stderr and "contrastive mode: 3 good images" in train.stderr
    assert train.stderr.count("captions: 3 without a caption file (using caption templates)") == 2
