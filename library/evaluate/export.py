"""`evaluate.py export` and `evaluate.py rate-with-counter`: the bad-generation loop's two ends.

    python evaluate.py export --db ratings.sqlite --score 0 --out data/bad_hands     # the negative TI's folder
    python evaluate.py export --db ratings.sqlite --score 1 --out data/good_hands    # its contrastive folder
    python evaluate.py rate-with-counter --db ratings.sqlite                         # toy hands: no person needed

Export: an image's score is the one the report uses (`library.evaluate.report.load_images`): the ratings
of `--source` (human by default) and `--rater`, a rater's latest rating counting once; "no hand" when more
than half of them say so (such images are never exported); otherwise the mean of the scores. `--score S`
exports the images whose score is exactly S, i.e. every counted rating that saw a hand gave S: one rater's
0 against another's ½ (mean 0.25) is neither bad nor half, and stays out of both folders.

The folder is what `dataset_configs/ti_negative_hands.toml` reads as its `image_dir` (and
`contrastive_data_dir`): the PNGs themselves, byte for byte (their A1111 parameters kept), named
`<run>_<sha256 prefix>.png`, with no caption files, so textual inversion gives each its object template
("a photo of a <badhand>"); caption files without the token would teach the embedding nothing.
`export.json` beside them lists every image with its run, prompt, seed, score and ratings. The folder is
written atomically; an existing --out is replaced only when it holds nothing but an earlier export.

rate-with-counter: the toy hand world's finger counter (`library/evaluate/counter.py`) as a rater: five
digits → 1, any other count → 0, no digit at all → no hand (an empty background or a blob such as an
apple or a cup; a star's five points read as five digits, the counter's known blind spot). Its ratings
have rater and source "counter"; images it has rated are left alone, so a second run adds nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from library.errors import ConfigError

MANIFEST = "export.json"
COUNTER = "counter"  # the counter's rater name and source
SCORES = {"0": 0.0, "0.5": 0.5, "1": 1.0}  # --score's choices (also prepare_dataset.py from-ratings)


def exportable(conn, score: float, source: str = "human", raters: tuple[str, ...] = (), runs: tuple[str, ...] = ()):
    """(image record, database row) of every image whose score is `score` (see the module docstring)."""
    from library.evaluate.report import load_images

    records = [r for r in load_images(conn, source, raters) if not runs or r.run in runs]
    chosen = [r for r in records if r.score is not None and abs(r.score - score) < 1e-9]
    if not chosen:
        return [], records
    rows = {row["id"]: row for row in conn.execute("SELECT id, sha256, path, run FROM images")}
    return [(r, rows[r.id]) for r in chosen], records


def _safe_name(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run).strip("-.") or "run"


def export_stem(row) -> str:
    """An exported image's file name without its extension: `<run>_<sha256 prefix>`."""
    return f"{_safe_name(row['run'])}_{row['sha256'][:16]}"


def select_exportable(db: str, score_text: str, source: str = "human", raters: tuple[str, ...] = (),
                      runs: tuple[str, ...] = ()):
    """`exportable` on the database file `db`, with --score given as text: (chosen, every record considered).

    A --run that names no run, or no image with the score, is a ConfigError (nothing gets written).
    """
    from library.evaluate.db import connect

    conn = connect(db, create=False)
    try:
        if runs:
            known = {row[0] for row in conn.execute("SELECT DISTINCT run FROM images")}
            unknown = sorted(set(runs) - known)
            if unknown:
                raise ConfigError(f"--run {', '.join(unknown)}: no such run in {db} "
                                  f"(runs: {', '.join(sorted(known)) or 'none'})")
        chosen, records = exportable(conn, SCORES[score_text], source, raters, runs)
    finally:
        conn.close()
    if not chosen:
        scored = sum(r.score is not None for r in records)
        hint = (" (the counter's ratings count only with --source counter)" if source == "human" else "")
        raise ConfigError(f"--score {score_text}: no image of {db} has that score among {scored} scored "
                          f"image(s) with {source} ratings{hint}; rate more images first "
                          "(`evaluate.py serve`), nothing was written")
    return chosen, records


def check_sources_present(chosen) -> None:
    """Every chosen image's file is where the database says, or a ConfigError before anything is written."""
    missing = [row["path"] for _, row in chosen if not Path(row["path"]).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} image file(s) to export are gone, e.g. {missing[0]}; put them back or "
                          "import their new folder (`evaluate.py import` updates moved paths)")


def check_replaceable(out: Path) -> None:
    """--out may be new, empty, or an earlier export with nothing added: anything else is the user's."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: a file of that name is in the way; choose a folder name")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    listed: set[str] = set()
    try:
        listed = {item["file"] for item in json.loads((out / MANIFEST).read_text(encoding="utf-8"))["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--out {out}: the folder holds files that no export wrote ({sorted(entries)[0]}, …); "
                          "choose a new folder, or move them away first (export replaces the whole folder)") from None
    others = sorted(entries - listed - {MANIFEST})
    if others:
        raise ConfigError(f"--out {out}: files were added after the last export ({', '.join(others[:3])}); "
                          "move them away or choose another folder: export replaces the whole folder")


def write_export(chosen, out: Path, score: float, source: str) -> list[dict]:
    from tqdm import tqdm

    from library.fileio import atomic_dir, write_text_atomic

    listing = []
    check_sources_present(chosen)
    with atomic_dir(out) as tmp:
        for record, row in tqdm(chosen, desc="exporting", unit="img", disable=len(chosen) < 50):
            name = f"{export_stem(row)}.png"
            shutil.copyfile(row["path"], tmp / name)
            listing.append({"file": name, "sha256": row["sha256"], "run": row["run"], "prompt": record.prompt,
                            "negative_prompt": record.negative_prompt, "seed": record.seed,
                            "training_step": record.training_step, "loras": record.loras,
                            "score": record.score, "ratings": record.ratings, "source": row["path"]})
        write_text_atomic(tmp / MANIFEST, json.dumps(
            {"score": score, "ratings_from": source, "images": listing}, indent=1, ensure_ascii=False) + "\n")
    return listing


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (SQLite)")
    parser.add_argument("--score", required=True, choices=sorted(SCORES),
                        help="export the images with this score: 0 (the bad ones, for a negative embedding), "
                             "1 (the good ones, for the contrastive mode) or 0.5")
    parser.add_argument("--out", required=True, help="the folder to write (replaced only when it is an earlier "
                                                     "export)")
    add_selection_arguments(parser)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """--source, --rater and --run: which ratings and images count (export, and prepare_dataset.py from-ratings)."""
    parser.add_argument("--source", choices=("human", COUNTER, "all"), default="human",
                        help="whose ratings count: human raters (default), the finger counter, or all")
    parser.add_argument("--rater", action="append", default=[], metavar="NAME",
                        help="count only this rater's ratings (repeat for several)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME",
                        help="only images of this run (repeat for several)")


def run_export(args: argparse.Namespace) -> int:
    score = SCORES[args.score]
    out = Path(args.out)
    check_replaceable(out)
    chosen, records = select_exportable(args.db, args.score, args.source, tuple(args.rater), tuple(args.run))
    listing = write_export(chosen, out, score, args.source)
    runs = sorted({item["run"] for item in listing})
    print(f"wrote {len(listing)} image(s) with score {args.score} to {out} (runs: {', '.join(runs)}; "
          f"{len(records)} image(s) considered); the list is {out / MANIFEST}")
    return 0


# --------------------------------------------------------------------------------------------- counter


def counter_rating(image) -> tuple[float | None, bool]:
    """(score, no_hand) that the finger counter gives an image: 5 digits → 1, none → no hand, else 0."""
    from library.evaluate.counter import count_fingers

    count = count_fingers(image)
    if count == 0:
        return None, True
    return (1.0 if count == 5 else 0.0), False


def rate_with_counter(conn, runs: tuple[str, ...] = (), progress: bool = True) -> dict[str, int]:
    from PIL import Image
    from tqdm import tqdm

    query = ("SELECT id, path FROM images WHERE id NOT IN (SELECT image_id FROM ratings WHERE rater = ? AND "
             "source = ?)")
    params: list = [COUNTER, COUNTER]
    if runs:
        query += f" AND run IN ({', '.join('?' * len(runs))})"
        params += list(runs)
    todo = conn.execute(query + " ORDER BY id", params).fetchall()
    counts = {"five": 0, "other": 0, "no hand": 0, "missing": 0}
    counts["already"] = conn.execute("SELECT COUNT(DISTINCT image_id) FROM ratings WHERE rater = ? AND source = ?",
                                     (COUNTER, COUNTER)).fetchone()[0]
    for row in tqdm(todo, desc="counting fingers", unit="img", disable=not progress or len(todo) < 2):
        try:
            with Image.open(row["path"]) as image:
                score, no_hand = counter_rating(image.convert("RGB"))
        except OSError:
            counts["missing"] += 1
            continue
        conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand, source) VALUES (?, ?, ?, ?, ?)",
                     (row["id"], COUNTER, score, int(no_hand), COUNTER))  # autocommit: each one on disk at once
        counts["no hand" if no_hand else "five" if score == 1.0 else "other"] += 1
    return counts


def add_counter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (SQLite)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME",
                        help="rate only images of this run (repeat for several)")


def run_counter(args: argparse.Namespace) -> int:
    from library.evaluate.db import connect

    conn = connect(args.db, create=False)
    try:
        counts = rate_with_counter(conn, tuple(args.run))
    finally:
        conn.close()
    rated = counts["five"] + counts["other"] + counts["no hand"]
    line = (f"the counter rated {rated} image(s): {counts['five']} with five digits (1), {counts['other']} with "
            f"another count (0), {counts['no hand']} without a hand; {counts['already']} rated by it before")
    if counts["missing"]:
        line += f"; {counts['missing']} image file(s) missing or unreadable (re-import their folder)"
    print(line)
    return 0


COMMANDS = {
    "export": ("write the images with one score as a training folder (the bad-generation loop)",
               add_export_arguments, run_export),
    "rate-with-counter": ("toy hands: rate every image with the finger counter (5 digits → 1, else 0)",
                          add_counter_arguments, run_counter),
}
