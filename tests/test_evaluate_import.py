"""evaluate.py's command line and `import`: what lands in the database, read back with plain sqlite3."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from library.evaluate.importer import split_lora_tags, training_step_from_name
from library.sampling.infotext import a1111_parameters, parse_parameters, prompt_with_lora_tags, save_png_atomic

REPO = Path(__file__).resolve().parent.parent


def evaluate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=120)


def rows(db: Path, query: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(query)]
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- parser


def test_parse_parameters_reads_back_what_the_writer_writes():
    text = a1111_parameters(
        prompt_with_lora_tags("a hand, photo", {"my:hands": 0.75, "style": 1}), "ugly, blurry\nsecond line",
        steps=30, sampler="DPM++ 2M Karras", cfg_scale=7.5, seed=-7, width=64, height=96, model_hash="6ce0161689",
        model_name='v1: "odd", name', lora_hashes={"myhands": "0123456789ab"}, extra={"Training step": "300"})
    prompt, negative, fields = parse_parameters(text)
    assert prompt == "a hand, photo <lora:myhands:0.75> <lora:style:1>"
    assert negative == "ugly, blurry\nsecond line"
    assert fields == {"Steps": "30", "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": "-7",
                      "Size": "64x96", "Model hash": "6ce0161689", "Model": 'v1: "odd", name',
                      "Lora hashes": "myhands: 0123456789ab", "Training step": "300"}


def test_parse_parameters_of_texts_without_a_fields_line():
    # a prompt that looks like one field is a prompt; a multi-line prompt stays whole
    assert parse_parameters("style: ink drawing") == ("style: ink drawing", "", {})
    assert parse_parameters("line one\nline two") == ("line one\nline two", "", {})
    assert parse_parameters("a hand\nSteps: 20") == ("a hand", "", {"Steps": "20"})
    # a broken quote: not a fields line, so all of it is prompt
    assert parse_parameters('a hand\nSteps: 20, Model: "open, Seed: 3')[2] == {}


def test_lora_tags_leave_the_prompt_and_become_a_list():
    assert split_lora_tags("a hand <lora:hands:0.75> <lora:style:1>") == ("a hand", [("hands", 0.75), ("style", 1.0)])
    assert split_lora_tags("<lora:hands:-0.5>, a hand, photo") == ("a hand, photo", [("hands", -0.5)])
    assert split_lora_tags("a <lora:plain> hand") == ("a hand", [("plain", 1.0)])
    assert split_lora_tags("a hand <lora:x:0.6:0.2>") == ("a hand", [("x", 0.6)])  # WebUI's te:unet form
    assert split_lora_tags("a hand") == ("a hand", [])


def test_training_step_from_the_training_sample_name():
    assert training_step_from_name(Path("hands_e000003_s000300_000_1234.png")) == 300
    assert training_step_from_name(Path("hands_e000000_s000000_002_-1.png")) == 0
    assert training_step_from_name(Path("hands_000_1234.png")) is None


# --------------------------------------------------------------------------------------------- import


def hand_png(path: Path, colour: tuple[int, int, int], parameters: str | None, size=(64, 64)) -> Path:
    return save_png_atomic(Image.new("RGB", size, colour), path, parameters)


@pytest.fixture
def samples(tmp_path) -> Path:
    """A folder like a sampling run's, with the things import must pass over."""
    folder = tmp_path / "lora-r64"
    params = a1111_parameters(prompt_with_lora_tags("palm of a hand", {"hands": 0.75}), "extra fingers",
                              steps=20, sampler="DDIM", cfg_scale=7.5, seed=11, width=64, height=64,
                              model_hash="0123456789")
    hand_png(folder / "hands_e000002_s000200_000_11.png", (200, 10, 10), params)
    hand_png(folder / "deeper" / "plain.png", (10, 200, 10), None, size=(48, 32))
    hand_png(folder / "stepped.png", (10, 10, 200),
             a1111_parameters("a hand", "", steps=5, sampler="Euler a", cfg_scale=1, seed=3, width=64, height=64,
                              extra={"Training step": "1500"}))
    hand_png(folder / "hands_grid.png", (0, 0, 0), params)
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "photo.png", format="JPEG")  # a JPEG named .png
    good = (folder / "stepped.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / ".hidden.png.abcdefgh.tmp").write_bytes(good)
    return folder


def test_import_stores_parameters_skips_the_rest_and_is_idempotent(tmp_path, samples):
    db = tmp_path / "ratings.sqlite"
    first = evaluate("import", "--db", str(db), str(samples))
    assert first.returncode == 0, first.stderr
    summary = first.stdout.splitlines()[0]
    assert summary.startswith(f"added 3 image(s) to {db} (lora-r64: 3); 0 already there; skipped 4 (")
    for reason in ("1 not a PNG", "1 a grid of many images", "2 unreadable PNG"):
        assert reason in summary
    assert "notes.txt: not a PNG" in first.stdout and "photo.png: unreadable PNG (a JPEG file named .png)" in first.stdout

    got = {Path(r["path"]).name: r for r in rows(db, "SELECT * FROM images")}
    assert sorted(got) == ["hands_e000002_s000200_000_11.png", "plain.png", "stepped.png"]
    lora = got["hands_e000002_s000200_000_11.png"]
    assert {k: lora[k] for k in ("run", "prompt", "negative_prompt", "seed", "sampler", "steps", "cfg_scale",
                                 "width", "height", "model_hash", "training_step")} == {
        "run": "lora-r64", "prompt": "palm of a hand", "negative_prompt": "extra fingers", "seed": 11,
        "sampler": "DDIM", "steps": 20, "cfg_scale": 7.5, "width": 64, "height": 64, "model_hash": "0123456789",
        "training_step": 200}
    assert json.loads(lora["loras"]) == [["hands", 0.75]]
    assert lora["sha256"] == hashlib.sha256((samples / "hands_e000002_s000200_000_11.png").read_bytes()).hexdigest()
    assert Path(lora["path"]).is_absolute() and Path(lora["path"]).is_file()
    assert "<lora:hands:0.75>" in lora["parameters"]
    plain = got["plain.png"]  # no parameters: the fields are empty, the size is the image's
    assert (plain["prompt"], plain["seed"], plain["loras"], plain["parameters"], plain["width"], plain["height"]) == \
        (None, None, None, None, 48, 32)
    assert (got["stepped.png"]["training_step"], got["stepped.png"]["loras"]) == (1500, None)

    again = evaluate("import", "--db", str(db), str(samples), "--run", "other")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"added 0 image(s) to {db}; 3 already there; skipped 4")
    assert len(rows(db, "SELECT id FROM images")) == 3
    assert {r["run"] for r in rows(db, "SELECT run FROM images")} == {"lora-r64"}  # the first label stays


def test_run_label_moved_files_and_a_single_file(tmp_path):
    db = tmp_path / "r.sqlite"
    a = hand_png(tmp_path / "base" / "a.png", (1, 2, 3), None)
    hand_png(tmp_path / "base" / "b.png", (4, 5, 6), None)
    result = evaluate("import", "--db", str(db), str(tmp_path / "base"), "--run", "baseline")
    assert result.returncode == 0 and "(baseline: 2)" in result.stdout
    moved = tmp_path / "elsewhere" / "a.png"
    moved.parent.mkdir()
    a.rename(moved)
    result = evaluate("import", "--db", str(db), str(moved))
    assert result.stdout.startswith(f"added 0 image(s) to {db}; 1 already there (1 with a new path)")
    assert rows(db, "SELECT path, run FROM images WHERE path LIKE '%elsewhere%'") == \
        [{"path": str(moved.resolve()), "run": "baseline"}]
    c = hand_png(tmp_path / "loose" / "c.png", (7, 8, 9), None)
    assert "(loose: 1)" in evaluate("import", "--db", str(db), str(c)).stdout


def test_user_mistakes_are_one_line_and_exit_2(tmp_path):
    db = tmp_path / "r.sqlite"
    missing = evaluate("import", "--db", str(db), str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"evaluate.py import: error: {tmp_path / 'nope'}: no such folder; give the folders of generated PNGs to import"]
    assert not db.exists()  # a typo makes no empty database
    (tmp_path / "folder").mkdir()
    empty_run = evaluate("import", "--db", str(db), str(tmp_path / "folder"), "--run", " ")
    assert empty_run.returncode == 2 and "--run: the label is empty" in empty_run.stderr
    not_db = tmp_path / "notes.sqlite"
    not_db.write_text("this is not SQLite " * 100)
    bad = evaluate("import", "--db", str(not_db), str(tmp_path / "folder"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"evaluate.py import: error: --db {not_db}: not a usable SQLite rating database")


def test_help_lists_the_commands_without_importing_heavy_libraries():
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, evaluate; names = list(evaluate.command_table()); "
         "evaluate.build_parser(); heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'diffusers') "
         "if m in sys.modules]; print(names, heavy)"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert probe.returncode == 0, probe.stderr
    names, heavy = probe.stdout.strip().rsplit("] [", 1)
    assert heavy == "]", f"imported at --help time: {heavy}"
    for command in ("import", "serve", "export", "rate-with-counter", "report", "metrics", "train-classifier", "score"):
        assert f"'{command}'" in names
    helped = evaluate("--help")
    assert helped.returncode == 0 and "rate-with-counter" in helped.stdout


def test_parser_agrees_with_the_independent_reader_of_the_tests():
    import support

    texts = [
        a1111_parameters("a hand", "", steps=20, sampler="DDIM", cfg_scale=7, seed=1, width=64, height=64),
        a1111_parameters(prompt_with_lora_tags("palm, open", {"a": 0.5}), "bad, worse", steps=3, sampler="Euler a",
                         cfg_scale=1.5, seed=2**31, width=512, height=768, model_hash="abcdef0123",
                         model_name="m: 1", clip_skip=2, lora_hashes={"a": "0123456789ab", "b": "ba9876543210"},
                         ti_hashes={"neg": "111111111111"}),
    ]
    for text in texts:
        assert parse_parameters(text) == support.parse_parameters(text)
