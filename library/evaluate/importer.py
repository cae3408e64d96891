"""`evaluate.py import`: register generated PNGs in the rating database.

    python evaluate.py import --db ratings.sqlite samples/base samples/lora --run lora-r64

Each PNG becomes one `images` row keyed by the sha256 of its bytes, so importing a folder twice (or the
same file from two folders) adds nothing; a file that moved since it was imported gets its new path.
What its A1111 `parameters` text says is stored in columns: prompt (with the `<lora:name:multiplier>` tags
taken out, into `loras`, so that the same prompt × seed cell compares across runs), negative prompt, seed,
sampler, steps, CFG scale, model hash and the training step: the `Training step` field, else the name
training-time sampling gives its files (`<output_name>_e<epoch>_s<step>_<n>_<seed>.png`). Width and height
are the image's own. A PNG without parameters is imported with those fields empty.

Folders are searched recursively; hidden files and folders (names starting with '.', such as unfinished
atomic writes) are passed over. Other files are reported and skipped: non-PNG files, unreadable PNGs and
grids (`*_grid.png`, `grid-*.png`: a sheet of many images, not one generation). The run label is `--run`,
else the name of the folder given on the command line (a file given directly: its folder's name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import ConfigError
from library.lora_tags import LORA_TAG, split_lora_tags  # noqa: F401 (part of this module's surface)

# what library/sampling/training.py names its files: <output_name>_e<epoch:06d>_s<step:06d>_<n>_<seed>.png
TRAINING_SAMPLE_NAME = re.compile(r"_e(\d{6,})_s(\d{6,})_\d+_-?\d+$")
GRID_NAME = re.compile(r"(^grid-\d*|_grid)$")
_HASH_BLOCK = 1 << 20
COMMIT_EVERY = 200


def training_step_from_name(path: Path) -> int | None:
    found = TRAINING_SAMPLE_NAME.search(path.stem)
    return int(found.group(2)) if found else None


@dataclass
class ImageInfo:
    """What goes into one `images` row (besides sha256, path and run)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    loras: str | None = None
    training_step: int | None = None
    parameters: str | None = None


def _number(text: str | None, kind: type):
    if text is None or text == "":
        return None
    try:
        return kind(text)
    except ValueError:
        return None


def describe(path: Path, parameters: str | None, size: tuple[int, int]) -> ImageInfo:
    """The columns of one PNG from its parameters text (None: it has none) and its pixel size."""
    from library.sampling.infotext import parse_parameters

    info = ImageInfo(width=size[0], height=size[1], training_step=training_step_from_name(path))
    if parameters is None:
        return info
    prompt, negative, fields = parse_parameters(parameters)
    prompt, loras = split_lora_tags(prompt)
    info.parameters = parameters
    info.prompt, info.negative_prompt = prompt, negative
    info.seed = _number(fields.get("Seed"), int)
    info.sampler = fields.get("Sampler") or None
    info.steps = _number(fields.get("Steps"), int)
    info.cfg_scale = _number(fields.get("CFG scale"), float)
    info.model_hash = fields.get("Model hash") or None
    info.loras = json.dumps([[name, m] for name, m in loras]) if loras else None
    step = _number(fields.get("Training step"), int)
    if step is not None:
        info.training_step = step
    return info


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_png(path: Path) -> tuple[str | None, tuple[int, int]]:
    """(parameters text or None, (width, height)); raises ValueError naming what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"a {image.format} file named .png")
            image.load()  # a truncated file fails here, not at rating time
            text = image.info.get("parameters")
            return (str(text) if text is not None else None), image.size
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot be read ({exc})") from None


@dataclass
class ImportSummary:
    added: Counter = field(default_factory=Counter)  # run → images added
    already: int = 0
    moved: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)

    def lines(self, db: str) -> list[str]:
        runs = ", ".join(f"{run}: {n}" for run, n in sorted(self.added.items()))
        head = f"added {sum(self.added.values())} image(s) to {db}" + (f" ({runs})" if runs else "")
        head += f"; {self.already} already there"
        if self.moved:
            head += f" ({self.moved} with a new path)"
        reasons = Counter(reason.split(" (")[0] for _, reason in self.skipped)
        head += f"; skipped {len(self.skipped)}"
        if reasons:
            head += " (" + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) + ")"
        out = [head]
        for path, reason in self.skipped[:10]:
            out.append(f"  skipped {path}: {reason}")
        if len(self.skipped) > 10:
            out.append(f"  … and {len(self.skipped) - 10} more")
        return out


def find_files(folders: list[str | Path], run: str | None) -> list[tuple[Path, str]]:
    """(file, run label) for every visible file under the folders (a file given directly counts too)."""
    if run is not None and not run.strip():
        raise ConfigError("--run: the label is empty; give a name such as --run lora-r64, or leave --run out "
                          "to label each folder by its name")
    found: list[tuple[Path, str]] = []
    for given in folders:
        path = Path(given)
        if not path.exists():
            raise ConfigError(f"{given}: no such folder; give the folders of generated PNGs to import")
        label = run.strip() if run is not None else (path.resolve().parent.name if path.is_file()
                                                     else path.resolve().name)
        if path.is_file():
            found.append((path, label))
            continue
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path).parts
            if file.is_file() and not any(part.startswith(".") for part in relative):
                found.append((file, label))
    return found


def import_files(conn: sqlite3.Connection, files: list[tuple[Path, str]], progress: bool = True) -> ImportSummary:
    from tqdm import tqdm

    summary = ImportSummary()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for done, (path, run) in enumerate(tqdm(files, desc="importing", unit="file",
                                                disable=not progress or len(files) < 2)):
            if done and done % COMMIT_EVERY == 0:  # short transactions: a rating server keeps writing meanwhile
                conn.execute("COMMIT")
                conn.execute("BEGIN IMMEDIATE")
            _import_one(conn, path, run, summary)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")  # what was committed stays; a second import picks up the rest
        raise
    return summary


def _import_one(conn: sqlite3.Connection, path: Path, run: str, summary: ImportSummary) -> None:
    if path.suffix.lower() != ".png":
        summary.skipped.append((path, "not a PNG"))
        return
    if GRID_NAME.search(path.stem):
        summary.skipped.append((path, "a grid of many images"))
        return
    try:
        parameters, size = read_png(path)
    except ValueError as exc:
        summary.skipped.append((path, f"unreadable PNG ({exc})"))
        return
    sha = file_sha256(path)
    stored = str(path.resolve())
    row = conn.execute("SELECT id, path FROM images WHERE sha256 = ?", (sha,)).fetchone()
    if row is not None:
        summary.already += 1
        if row["path"] != stored and not Path(row["path"]).is_file():
            conn.execute("UPDATE images SET path = ? WHERE id = ?", (stored, row["id"]))
            summary.moved += 1
        return
    info = describe(path, parameters, size)
    conn.execute(
        "INSERT INTO images (sha256, path, run, prompt, negative_prompt, seed, sampler, steps, cfg_scale, "
        "width, height, model_hash, loras, training_step, parameters) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (sha, stored, run, info.prompt, info.negative_prompt, info.seed, info.sampler, info.steps,
         info.cfg_scale, info.width, info.height, info.model_hash, info.loras, info.training_step,
         info.parameters))
    summary.added[run] += 1


# --------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (SQLite; made when missing)")
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="folders of generated PNGs (searched "
                        "recursively; single PNG files work too)")
    parser.add_argument("--run", default=None, metavar="NAME",
                        help="the run label of these images (default: each folder's name)")


def run(args: argparse.Namespace) -> int:
    from library.evaluate.db import connect

    files = find_files(args.folders, args.run)  # before the database is made: a typo makes no empty file
    conn = connect(args.db)
    try:
        summary = import_files(conn, files)
    finally:
        conn.close()
    for line in summary.lines(args.db):
        print(line)
    return 0


COMMANDS = {"import": ("register generated PNGs (content hash, path, A1111 parameters) in the database",
                       add_arguments, run)}
