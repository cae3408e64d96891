"""prepare_dataset.py: 11K-Hands' HandInfo.csv, a plain folder and a rating database as training folders.

The 11K-Hands data here is synthetic: the real header and vocabulary, a few persons, generated JPEGs."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import prepare_dataset
from library.cli import run_main

REPO = Path(__file__).resolve().parent.parent
HEADER = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities"

# (CSV row, the caption it must get: None when the row is left out); line n + 2 of the CSV
ROWS = [
    ("0,23,male,very fair,0,0,dorsal right,Hand_0000001.jpg,0", "back of fair-skinned male right hand"),
    ("0,23,male,very fair,0,1,palmar left,Hand_0000002.jpg,0", "front of fair-skinned male left hand with nail polish"),
    ("1,60,female,dark,1,0,palmar right,Hand_0000003.jpg,0",
     "front of dark-skinned elderly female right hand with accessories"),
    ("1,60,female,dark,1,1,dorsal left,Hand_0000004.jpg,0",
     "back of dark-skinned elderly female left hand with nail polish and accessories"),
    ("2,59,female,medium,0,0,dorsal left,Hand_0000005.jpg,0", "back of medium-skinned female left hand"),
    ("2,59,female,fair,0,0,palmar right,Hand_0000006.jpg,1", None),  # irregularities = 1
    ("3,75,male,fair,0,1,dorsal right,Hand_0000007.jpg,0",
     "back of fair-skinned elderly male right hand with nail polish"),
]
# source sizes: landscape, portrait, one smaller than the resolution, the rest square
SIZES = {"Hand_0000001.jpg": (160, 120), "Hand_0000002.jpg": (90, 151), "Hand_0000003.jpg": (40, 30)}
RESOLUTION = 48


def write_hands(folder: Path, rows: list[str], sizes: dict[str, tuple[int, int]] | None = None,
                header: str = HEADER) -> tuple[Path, Path]:
    """folder/HandInfo.csv with `rows` under `header`, and folder/Hands/ with a JPEG per imageName."""
    images = folder / "Hands"
    images.mkdir(parents=True, exist_ok=True)
    for n, row in enumerate(rows):
        name = next((field for field in row.split(",") if field.endswith(".jpg")), None)
        if name and not (images / name).exists():
            size = (sizes or SIZES).get(name, (100, 100))
            Image.new("RGB", size, (40 * (n % 6), 120, 200 - 10 * (n % 9))).save(images / name, "JPEG")
    csv_path = folder / "HandInfo.csv"
    csv_path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return csv_path, images


def prepare(*argv: str) -> int:
    """prepare_dataset.py in this process (exceptions propagate)."""
    return prepare_dataset.main([str(a) for a in argv])


def prepare_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """prepare_dataset.py as its command line runs it: (exit status, stdout, stderr)."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as stop:
        run_main(prepare_dataset.main, [str(a) for a in argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def hands(tmp_path: Path, *extra: str, rows=None, out: Path | None = None) -> Path:
    csv_path, images = write_hands(tmp_path / "src", [r for r, _ in ROWS] if rows is None else rows)
    out = out or tmp_path / "data" / "11k_hands"
    assert prepare("11k-hands", "--csv", csv_path, "--images", images, "--out", out, "--resolution", RESOLUTION,
                   "--workers", "2", *extra) == 0
    return out


def captions(folder: Path) -> dict[str, str]:
    """{image stem: its caption file's text} of an N_concept folder."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def manifest(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def no_temporaries(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


# ---- the caption grammar ----------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [
    ("5,30,male,fair,0,0,dorsal right,a.jpg,0", "back of fair-skinned male right hand"),              # view: dorsal
    ("5,30,male,fair,0,0,palmar right,a.jpg,0", "front of fair-skinned male right hand"),             # view: palmar
    ("5,30,male,very fair,0,0,palmar right,a.jpg,0", "front of fair-skinned male right hand"),        # very fair
    ("5,30,male,Medium,0,0,palmar right,a.jpg,0", "front of medium-skinned male right hand"),         # medium
    ("5,30,male,dark,0,0,palmar right,a.jpg,0", "front of dark-skinned male right hand"),             # dark
    ("5,59,male,dark,0,0,palmar right,a.jpg,0", "front of dark-skinned male right hand"),             # 59: no word
    ("5,60,male,dark,0,0,palmar right,a.jpg,0", "front of dark-skinned elderly male right hand"),     # 60: elderly
    ("5,30,female,dark,0,0,palmar right,a.jpg,0", "front of dark-skinned female right hand"),         # gender
    ("5,30,female,dark,0,0,palmar left,a.jpg,0", "front of dark-skinned female left hand"),           # side
    ("5,30,female,dark,0,1,palmar left,a.jpg,0", "front of dark-skinned female left hand with nail polish"),
    ("5,30,female,dark,1,0,palmar left,a.jpg,0", "front of dark-skinned female left hand with accessories"),
    ("5,66,female,dark,1,1,palmar left,a.jpg,0",
     "front of dark-skinned elderly female left hand with nail polish and accessories"),
    ("5,30,female,dark,0,0,palmar left,a.jpg,1", "front of dark-skinned female left hand"),           # irregular: same
])
def test_each_field_gives_its_words_of_the_study_grammar(row, expected):
    from library.prepare.hands11k import caption, parse_row

    assert caption(parse_row(row.split(","), 2)) == expected


def test_the_readme_and_preset_example_captions_are_what_their_rows_give():
    from library.prepare.hands11k import caption, parse_row

    row = parse_row("5,66,female,dark,0,1,palmar left,Hand_0000100.jpg,0".split(","), 2)
    assert caption(row) == "front of dark-skinned elderly female left hand with nail polish"
    row = parse_row("3,23,male,very fair,0,0,dorsal right,Hand_0000101.jpg,0".split(","), 3)
    assert caption(row) == "back of fair-skinned male right hand"


# ---- 11k-hands ------------------------------------------------------------------------------------------

def test_11k_hands_writes_captions_resized_images_and_a_summary(tmp_path):
    out = hands(tmp_path)
    folder = out / "1_hand"
    expected = {Path(r.split(",")[-2]).stem: c + "\n" for r, c in ROWS if c is not None}
    assert captions(folder) == expected                              # the irregular row is left out
    assert sorted(p.name for p in folder.glob("*.jpg")) == sorted(f"{s}.jpg" for s in expected)
    assert sorted(p.name for p in out.iterdir()) == ["1_hand", "summary.json", "summary.md"]
    assert not (tmp_path / "data" / "11k_hands_holdout").exists() and no_temporaries(out.parent)
    summary = manifest(out)
    assert summary["splits"]["training"]["images"] == 6 and summary["splits"]["training"]["persons"] == 4
    assert summary["dropped"] == {"irregular": {"count": 1, "where": ["HandInfo.csv line 7"]}}
    assert summary["attributes"]["skin colour"] == {"very fair": {"training": 2}, "medium": {"training": 1},
                                                    "dark": {"training": 2}, "fair": {"training": 1}}
    assert summary["attributes"]["age"] == {"under 60": {"training": 3}, "60 and over": {"training": 3}}
    assert summary["kept_smaller"] == 1
    assert sorted(summary["files"]) == sorted(f"1_hand/{s}{e}" for s in expected for e in (".jpg", ".txt"))
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| irregular | 1 | HandInfo.csv line 7 |" in md and "| very fair | 2 |" in md


def test_images_get_the_resolution_as_short_side_with_their_aspect_ratio(tmp_path):
    out = hands(tmp_path)
    for name, (w, h) in {**SIZES, "Hand_0000004.jpg": (100, 100)}.items():
        with Image.open(out / "1_hand" / name) as written:
            got = written.size
        if min(w, h) <= RESOLUTION:
            assert got == (w, h)                                       # never enlarged
            continue
        assert min(got) == RESOLUTION
        long_side = max(w, h) * RESOLUTION / min(w, h)
        assert abs(max(got) - long_side) <= 1 and (got[0] >= got[1]) == (w >= h)
    assert [i["size"] for i in manifest(out)["images"] if i["imageName"] == "Hand_0000002.jpg"] == [[48, 81]]


def test_irregular_rows_are_kept_with_the_switch(tmp_path):
    out = hands(tmp_path, "--keep-irregular")
    assert captions(out / "1_hand")["Hand_0000006"] == "front of fair-skinned female right hand\n"
    summary = manifest(out)
    assert summary["dropped"] == {} and summary["splits"]["training"]["images"] == 7
    assert summary["attributes"]["irregularities"] == {"yes": {"training": 1}, "no": {"training": 6}}


def person_rows(persons: int, per_person: int = 3) -> list[str]:
    views = ["dorsal right", "palmar left", "dorsal left", "palmar right"]
    return [f"{p},{20 + p},{'male' if p % 2 else 'female'},medium,0,0,{views[i % 4]},"
            f"Hand_{p * 10 + i:07d}.jpg,0" for p in range(persons) for i in range(per_person)]


def split_ids(out: Path) -> dict[str, set[int]]:
    split = {"training": set(), "held out": set()}
    for image in manifest(out)["images"]:
        split[image["split"]].add(image["id"])
    return split


def test_the_holdout_splits_by_person_deterministically(tmp_path):
    rows = person_rows(20)
    first = hands(tmp_path, "--holdout", "0.25", "--seed", "3", rows=rows, out=tmp_path / "a" / "hands")
    ids = split_ids(first)
    assert not ids["training"] & ids["held out"] and len(ids["training"] | ids["held out"]) == 20
    assert len(ids["held out"]) == 5                                   # 25 % of 20 persons
    held_folder = tmp_path / "a" / "hands_holdout" / "1_hand"
    assert len(list(held_folder.glob("*.jpg"))) == 15 and len(list((first / "1_hand").glob("*.jpg"))) == 45
    assert manifest(first)["persons"]["held out"] == sorted(ids["held out"])
    assert manifest(held_folder.parent)["part"].startswith("the held-out split of")
    again = hands(tmp_path, "--holdout", "0.25", "--seed", "3", rows=rows, out=tmp_path / "b" / "hands")
    assert split_ids(again) == ids                                     # same CSV, same seed: same split
    other = hands(tmp_path, "--holdout", "0.25", "--seed", "4", rows=rows, out=tmp_path / "c" / "hands")
    assert split_ids(other) != ids and len(split_ids(other)["held out"]) == 5


def test_bad_rows_are_named_by_line_and_the_rest_is_written(tmp_path, caplog):
    rows = [r for r, _ in ROWS[:2]] + [
        "4,40,male,purple,0,0,dorsal right,Hand_0000010.jpg,0",       # line 4: unknown skinColor
        "4,40,male,fair,0,0,dorsal right,Hand_0000011.jpg",           # line 5: a field short
        "4,forty,male,fair,0,0,dorsal right,Hand_0000012.jpg,0",      # line 6: age not a number
        "4,40,male,fair,0,2,dorsal right,Hand_0000013.jpg,0",         # line 7: flag 2
        "4,40,male,fair,0,0,sideways right,Hand_0000014.jpg,0",       # line 8: unknown aspectOfHand
        "4,40,male,fair,0,0,dorsal right,Hand_0000001.jpg,0",         # line 9: imageName listed twice
        "4,40,male,fair,0,0,dorsal right,Hand_0000015.jpg,0",         # line 10: file missing
        "4,40,male,fair,0,0,dorsal right,Hand_0000016.jpg,0",         # line 11: not a JPEG at all
        "4,40,male,fair,0,0,dorsal right,Hand_0000017.jpg,0",         # line 12: truncated JPEG
        "",                                                           # a blank line: nothing
        "4,41,male,dark,0,0,dorsal left,Hand_0000018.jpg,0",          # line 14: fine
    ]
    csv_path, images = write_hands(tmp_path / "src", rows, {"Hand_0000017.jpg": (400, 300)})
    (images / "Hand_0000015.jpg").unlink()
    (images / "Hand_0000016.jpg").write_bytes(b"not an image")
    whole = (images / "Hand_0000017.jpg").read_bytes()
    (images / "Hand_0000017.jpg").write_bytes(whole[: len(whole) // 3])
    out = tmp_path / "out"
    assert prepare("11k-hands", "--csv", csv_path, "--images", images, "--out", out, "--resolution", RESOLUTION) == 0
    assert sorted(captions(out / "1_hand")) == ["Hand_0000001", "Hand_0000002", "Hand_0000018"]
    dropped = manifest(out)["dropped"]
    assert {reason: entry["where"] for reason, entry in dropped.items()} == {
        "unknown skinColor": ["HandInfo.csv line 4"], "wrong number of fields": ["HandInfo.csv line 5"],
        "age not a whole number": ["HandInfo.csv line 6"], "nailPolish not 0 or 1": ["HandInfo.csv line 7"],
        "unknown aspectOfHand": ["HandInfo.csv line 8"], "imageName listed twice": ["HandInfo.csv line 9"],
        "image file missing": ["HandInfo.csv line 10"],
        "broken image": ["HandInfo.csv line 11", "HandInfo.csv line 12"]}
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped: ")]
    assert len(warned) == 9 and all(f"HandInfo.csv line {n}" in w for n, w in zip((4, 5, 6, 7, 8, 9, 10, 11, 12),
                                                                                  warned))
    assert "skinColor 'purple' is not one of: very fair, fair, medium, dark" in warned[0]
    assert "already listed on line 2" in warned[5]


# ---- user mistakes, interruptions, the all-or-nothing write --------------------------------------------

def one_error_line(code: int, err: str, after_progress: bool = False) -> str:
    """The single `error: …` line a user mistake prints (exit status 2, no traceback); `after_progress`: it came
    while writing, after the progress bar."""
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    if after_progress:
        assert all(line.startswith("writing ") for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_user_mistakes_are_one_line_with_exit_status_2_and_write_nothing(tmp_path, capsys):
    csv_path, images = write_hands(tmp_path / "src", [r for r, _ in ROWS])
    out = tmp_path / "out"
    args = ["11k-hands", "--csv", csv_path, "--images", images, "--out", out]
    bad = tmp_path / "bad.csv"
    bad.write_text(csv_path.read_text().replace("skinColor", "skin", 1), encoding="utf-8")
    line = one_error_line(*prepare_cli(capsys, "11k-hands", "--csv", bad, "--images", images, "--out", out)[::2])
    assert f"{bad}: line 1 is not 11K-Hands' header (column 4 is 'skin' where 'skinColor' belongs)" in line
    assert HEADER in line
    line = one_error_line(*prepare_cli(capsys, *args[:4], tmp_path / "Nope", *args[5:])[::2])
    assert f"--images {tmp_path / 'Nope'}: no such folder" in line
    line = one_error_line(*prepare_cli(capsys, "11k-hands", "--csv", tmp_path / "no.csv", *args[3:])[::2])
    assert f"--csv {tmp_path / 'no.csv'}: no such file" in line
    line = one_error_line(*prepare_cli(capsys, *args, "--holdout", "1")[::2])
    assert "--holdout 1: give the share of persons" in line
    only_irregular = tmp_path / "irregular"
    irregular_csv, irregular_images = write_hands(only_irregular, [ROWS[5][0]])
    line = one_error_line(*prepare_cli(capsys, "11k-hands", "--csv", irregular_csv, "--images", irregular_images,
                                       "--out", out)[::2])
    assert "no usable image among 1 input(s): 1 irregular (--keep-irregular keeps them)" in line
    line = one_error_line(*prepare_cli(capsys, "folder", "--images", tmp_path / "Nope", "--caption", "a hand",
                                       "--out", out)[::2])
    assert "--images" in line and "no such folder" in line
    line = one_error_line(*prepare_cli(capsys, "folder", "--images", images, "--caption", "  ", "--out", out)[::2])
    assert "--caption is empty" in line
    line = one_error_line(*prepare_cli(capsys, "from-ratings", "--db", tmp_path / "r.sqlite", "--score", "0",
                                       "--out", out)[::2])
    assert "no such rating database" in line and not (tmp_path / "r.sqlite").exists()
    assert not out.exists() and no_temporaries(tmp_path)


def test_an_out_holding_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    csv_path, images = write_hands(tmp_path / "src", [r for r, _ in ROWS])
    theirs = tmp_path / "photos"
    (theirs / "1_hand").mkdir(parents=True)
    (theirs / "1_hand" / "holiday.jpg").write_bytes(b"the user's own photo")
    args = ["11k-hands", "--csv", csv_path, "--images", images, "--resolution", RESOLUTION]
    for extra in ((), ("--overwrite",)):
        line = one_error_line(*prepare_cli(capsys, *args, "--out", theirs, *extra)[::2])
        assert f"--out {theirs} holds files that prepare_dataset.py did not write (1_hand/holiday.jpg" in line
    assert [p.relative_to(theirs).as_posix() for p in theirs.rglob("*")] == ["1_hand", "1_hand/holiday.jpg"]
    assert (theirs / "1_hand" / "holiday.jpg").read_bytes() == b"the user's own photo"

    out = tmp_path / "out"
    assert prepare(*args, "--out", out) == 0
    line = one_error_line(*prepare_cli(capsys, *args, "--out", out)[::2])
    assert "already holds an earlier prepare_dataset.py output; add --overwrite" in line
    assert prepare(*args, "--out", out, "--overwrite", "--concept", "palm") == 0  # an earlier run: replaced
    assert sorted(p.name for p in out.iterdir()) == ["1_palm", "summary.json", "summary.md"]
    (out / "1_palm" / "mine.txt").write_text("notes", encoding="utf-8")
    line = one_error_line(*prepare_cli(capsys, *args, "--out", out, "--overwrite")[::2])
    assert "files were added after prepare_dataset.py wrote it (1_palm/mine.txt)" in line
    assert (out / "1_palm" / "mine.txt").read_text(encoding="utf-8") == "notes"
    file_in_the_way = tmp_path / "a_file"
    file_in_the_way.write_text("x")
    assert "a file or link of that name is in the way" in one_error_line(
        *prepare_cli(capsys, *args, "--out", file_in_the_way)[::2])


def failing_writer(monkeypatch, after: int, error: BaseException) -> None:
    """Make the image writer raise `error` once `after` images have been written."""
    from library.prepare import output

    real, calls = output.write_image, []

    def write(image, path, fmt):
        if len(calls) >= after:
            raise error
        calls.append(path)
        real(image, path, fmt)

    monkeypatch.setattr(output, "write_image", write)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_interrupted_run_leaves_no_half_folder(tmp_path, capsys, monkeypatch, workers):
    csv_path, images = write_hands(tmp_path / "src", person_rows(4))
    out = tmp_path / "data" / "hands"
    failing_writer(monkeypatch, 3, KeyboardInterrupt())
    code, _, err = prepare_cli(capsys, "11k-hands", "--csv", csv_path, "--images", images, "--out", out,
                               "--holdout", "0.5", "--workers", workers)
    assert code == 130 and "interrupted" in err
    assert list(out.parent.iterdir()) == []                           # no OUT, no OUT_holdout, no temporaries


def test_a_failed_write_keeps_the_earlier_output(tmp_path, capsys, monkeypatch):
    csv_path, images = write_hands(tmp_path / "src", [r for r, _ in ROWS])
    args = ["11k-hands", "--csv", csv_path, "--images", images, "--resolution", RESOLUTION, "--out"]
    out = tmp_path / "data" / "hands"
    assert prepare(*args, out) == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    failing_writer(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    line = one_error_line(*prepare_cli(capsys, *args, out, "--overwrite", "--keep-irregular")[::2],
                          after_progress=True)
    assert f"--out {out}: could not write (No space left on device); nothing was written" in line
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.parent.iterdir()] == ["hands"]


# ---- folder ----------------------------------------------------------------------------------------------

def test_folder_captions_every_image_and_names_what_it_left_out(tmp_path, caplog):
    images = tmp_path / "Palms"
    for name, size in (("left/a.jpg", (120, 80)), ("left/b.png", (64, 64)), ("right/a.jpg", (80, 120)),
                       ("top.bmp", (50, 40)), (".hidden.jpg", (64, 64)), (".cache/c.png", (64, 64))):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 150, 100)).save(images / name)
    (images / "notes.txt").write_text("where these came from", encoding="utf-8")
    (images / "anim.gif").write_bytes(b"GIF89a")
    (images / "right" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = images / "prepared"                                         # inside the input: never read back in
    for extra in ((), ("--overwrite",)):
        assert prepare("folder", "--images", images, "--caption", "  a photo  of a palm ", "--out", out,
                       "--resolution", "40", "--repeats", "10", "--concept", "palm", *extra) == 0
        folder = out / "10_palm"
        assert captions(folder) == {n: "a photo of a palm\n" for n in ("left_a", "left_b", "right_a", "top")}
    with Image.open(folder / "right_a.jpg") as written:
        assert written.size == (40, 60)
    summary = manifest(out)
    assert summary["attributes"]["sub-folder"] == {"(top level)": {"training": 1}, "left": {"training": 2},
                                                   "right": {"training": 1}}
    assert {r: e["where"] for r, e in summary["dropped"].items()} == {
        "unsupported image format": ["anim.gif"], "not an image": ["notes.txt"], "broken image": ["right/broken.png"]}
    assert any("anim.gif: .gif is not read; convert it" in r.getMessage() for r in caplog.records)


def test_folder_names_that_would_collide_get_a_number(tmp_path):
    images = tmp_path / "gen"
    images.mkdir()
    for name in ("a.png", "a.jpg", "A.bmp"):
        Image.new("RGB", (32, 32), (0, 0, 0)).save(images / name)
    assert prepare("folder", "--images", images, "--caption", "a hand", "--out", tmp_path / "out") == 0
    assert sorted(captions(tmp_path / "out" / "1_hand")) == ["A", "a_2", "a_3"]


# ---- from-ratings ----------------------------------------------------------------------------------------

def rated_database(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """A rating database of five generated PNGs in two runs, imported and rated as a person would; {name: row}."""
    from library.evaluate.db import connect
    from library.evaluate.importer import find_files, import_files
    from library.sampling.infotext import a1111_parameters, save_png_atomic

    prompts = {"run_a/bad": "a hand <lora:hands:0.8>, close-up", "run_a/mixed": "a hand",
               "run_b/good": "a photo of a hand", "run_b/bare": None, "run_b/nohand": "an apple"}
    for n, (name, prompt) in enumerate(prompts.items()):
        params = None if prompt is None else a1111_parameters(prompt, "blurry", steps=20, sampler="DDIM",
                                                              cfg_scale=7.5, seed=n, width=64, height=64)
        save_png_atomic(Image.new("RGB", (64, 48), (30 * n, 90, 160)), tmp_path / f"{name}.png", params)
    db = tmp_path / "ratings.sqlite"
    conn = connect(db)
    try:
        import_files(conn, find_files([tmp_path / "run_a", tmp_path / "run_b"], None), progress=False)
        rows = {f"{r['run']}/{Path(r['path']).stem}": dict(r) for r in conn.execute("SELECT * FROM images")}
        ratings = [("run_a/bad", "alice", 0.0), ("run_a/mixed", "alice", 0.0), ("run_a/mixed", "bob", 0.5),
                   ("run_b/good", "alice", 1.0), ("run_b/bare", "alice", 0.0), ("run_b/nohand", "alice", None)]
        for n, (name, rater, score) in enumerate(ratings):
            conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand, rated_at) VALUES (?, ?, ?, ?, ?)",
                         (rows[name]["id"], rater, score, int(score is None), f"2026-01-01T00:00:{n:02d}.000Z"))
    finally:
        conn.close()
    return db, rows


def test_from_ratings_writes_the_images_with_the_score_captioned(tmp_path, capsys):
    from library.evaluate.export import export_stem

    db, rows = rated_database(tmp_path / "gen")
    stem = {name: export_stem(row) for name, row in rows.items()}
    out = tmp_path / "bad"
    assert prepare("from-ratings", "--db", db, "--score", "0", "--out", out, "--resolution", "32") == 0
    assert captions(out / "1_hand") == {stem["run_a/bad"]: "a hand, close-up\n"}  # its stored prompt, tags out
    assert manifest(out)["dropped"]["no prompt stored"]["where"] == [rows["run_b/bare"]["path"]]
    with Image.open(out / "1_hand" / f"{stem['run_a/bad']}.jpg") as written:
        assert written.size == (43, 32)

    given = tmp_path / "bad_captioned"
    assert prepare("from-ratings", "--db", db, "--score", "0", "--caption", "a deformed hand", "--out", given,
                   "--format", "png") == 0
    assert captions(given / "1_hand") == {stem["run_a/bad"]: "a deformed hand\n", stem["run_b/bare"]: "a deformed hand\n"}
    assert sorted(p.suffix for p in (given / "1_hand").iterdir()) == [".png", ".png", ".txt", ".txt"]
    assert manifest(given)["attributes"]["run"] == {"run_a": {"training": 1}, "run_b": {"training": 1}}

    good = tmp_path / "good"
    assert prepare("from-ratings", "--db", db, "--score", "1", "--run", "run_b", "--out", good) == 0
    assert captions(good / "1_hand") == {stem["run_b/good"]: "a photo of a hand\n"}
    line = one_error_line(*prepare_cli(capsys, "from-ratings", "--db", db, "--score", "0.5",
                                       "--out", tmp_path / "half")[::2])
    assert "--score 0.5: no image of" in line and not (tmp_path / "half").exists()
    line = one_error_line(*prepare_cli(capsys, "from-ratings", "--db", db, "--score", "0", "--run", "run_c",
                                       "--out", tmp_path / "c")[::2])
    assert "--run run_c: no such run" in line


# ---- the training side reads it --------------------------------------------------------------------------

def test_the_written_folder_is_what_the_dataset_loader_reads(tmp_path):
    from library.dataset import TrainDataset, resolve_datasets

    out = hands(tmp_path, "--repeats", "3", "--resolution", "64")
    configs = resolve_datasets({"train_data_dir": str(out), "resolution": 64, "min_bucket_reso": 64,
                                "max_bucket_reso": 128}, None, "test", tmp_path)
    data = TrainDataset(configs, seed=0)
    assert data.num_train_images == 6 * 3 and data.dataset_dirs() == {"3_hand": {"n_repeats": 3, "img_count": 6}}
    read = {Path(e.path).stem: data.base_caption(e) for e in data.entries}
    assert read == {Path(r.split(",")[-2]).stem: c for r, c in ROWS if c is not None}


# ---- the command line ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_command_line_answers_and_writes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "prepare_dataset.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)

    shown = run("--help")
    assert shown.returncode == 0 and all(c in shown.stdout for c in ("11k-hands", "folder", "from-ratings"))
    csv_path, images = write_hands(tmp_path / "src", [r for r, _ in ROWS])
    bad = tmp_path / "bad.csv"
    bad.write_text("id;age\n", encoding="utf-8")
    refused = run("11k-hands", "--csv", bad, "--images", images, "--out", "data/hands")
    assert one_error_line(refused.returncode, refused.stderr).startswith(f"error: {bad}: line 1 is not 11K-Hands'")
    done = run("11k-hands", "--csv", csv_path, "--images", images, "--out", "data/hands", "--resolution", 32)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote 6 image(s) with captions to data/hands/1_hand, 4 person(s); left out 1: "
                                  "1 irregular")
    assert "writing hands" in done.stderr                              # the progress bar
    assert len(list((tmp_path / "data" / "hands" / "1_hand").glob("*.txt"))) == 6
