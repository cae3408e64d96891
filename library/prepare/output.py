"""What every `prepare_dataset.py` command writes, and how: all of it or nothing.

Layout (what folder mode's `train_data_dir = OUT` and a subset's `image_dir = OUT/1_hand` both read):

    OUT/<repeats>_<concept>/<name>.jpg   the images (`--format png`: .png)
    OUT/<repeats>_<concept>/<name>.txt   one caption per image, one line of UTF-8
    OUT/summary.md                        counts per attribute and split, what was dropped and why
    OUT/summary.json                      the same as data, with the list of every file written
    OUT_holdout/<repeats>_<concept>/…     `11k-hands --holdout`: the held-out persons, beside OUT, never inside
                                          it (folder mode would otherwise train on them); its own summary.json

Images are decoded as clean RGB (library.dataset.images.load_rgb: EXIF rotation applied, transparency on
white) and scaled with Lanczos so that the SHORT side is `--resolution`, the aspect ratio kept: the buckets
choose their crops at training time, so nothing is cut off here. An image whose short side is already
smaller is kept at its size (never enlarged: upscaling adds no detail and teaches blur) and counted in the
summary. They are saved as JPEG quality 95 without chroma subsampling by default: the sources of 11K-Hands
are JPEG photos already, and at 512 px the difference from PNG is invisible while the folder is several
times smaller (~11,000 images); `--format png` keeps them lossless.

All or nothing: each folder is built in a hidden temporary sibling (`.OUT.XXXXXXXX`, library.fileio.atomic_dir)
and renamed onto OUT at the end, so an error, a bad input, Ctrl-C or a full disk leaves no half-written
folder, and the previous OUT (if any) intact. An OUT that holds files is replaced only with `--overwrite`,
and even then only when every file in it is one that summary.json lists (an earlier run's output): the
tool never deletes a file it did not write (the rule of library.evaluate.export.check_replaceable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from library.errors import ConfigError

log = logging.getLogger("pentadactyl")

MANIFEST = "summary.json"
SUMMARY = "summary.md"
WRITTEN_BY = "prepare_dataset.py"
TRAIN, HOLDOUT = "training", "held out"
FORMATS = {"jpg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}
JPEG_QUALITY = 95
WHERE_SHOWN = 30  # how many places summary.md lists per reason (summary.json lists them all)


@dataclass
class Item:
    """One image to write."""

    source: Path
    name: str                       # its file name in the output, without extension
    caption: str
    where: str                      # how messages name it: "HandInfo.csv line 7", "palms/a.jpg"
    split: str = TRAIN
    person: int | None = None       # 11K-Hands' person id: the summary counts persons per split
    attributes: dict[str, str] = field(default_factory=dict)  # counted per split in the summary
    record: dict[str, object] = field(default_factory=dict)   # provenance kept in summary.json


@dataclass
class Dropped:
    """An input left out, and why."""

    where: str
    reason: str                     # the category the summary counts: "irregular", "image file missing", …
    detail: str                     # one line: what is wrong and what would fix it


@dataclass
class Plan:
    """What a command found: the images to write and the inputs it left out."""

    command: str
    items: list[Item]
    dropped: list[Dropped]
    attribute_order: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # lines for summary.md (e.g. how the split was made)
    extra: dict[str, object] = field(default_factory=dict)  # more data for summary.json
    value_order: dict[str, tuple[str, ...]] = field(default_factory=dict)  # attribute → its values in table order


@dataclass
class Options:
    """The options every command shares (add_output_arguments)."""

    out: Path
    concept: str = "hand"
    repeats: int = 1
    resolution: int = 512
    format: str = "jpg"
    overwrite: bool = False
    workers: int = 1
    command_line: str = ""

    @property
    def folder_name(self) -> str:
        return f"{self.repeats}_{self.concept}"

    @property
    def holdout_out(self) -> Path:
        return self.out.with_name(self.out.name + "_holdout")


@dataclass
class Result:
    written: dict[str, list[Item]]
    dropped: list[Dropped]
    kept_smaller: int
    summary: dict


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def add_output_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--resolution", type=int, default=512,
                        help="the short side of the written images in pixels (default 512); smaller images are "
                             "kept as they are, never enlarged")
    parser.add_argument("--repeats", type=int, default=1, help="N of the OUT/N_concept folder (default 1)")
    parser.add_argument("--concept", default="hand", help="the concept of the OUT/N_concept folder (default hand)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="jpg",
                        help="jpg: quality 95, no chroma subsampling (default); png: lossless, several times larger")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an OUT that an earlier run wrote (refused if it holds any other file)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"images decoded and written at once (default {default_workers()})")


def options_from_args(args: argparse.Namespace) -> Options:
    """The shared options, checked: a bad value is one ConfigError naming the flag."""
    if args.resolution < 8:
        raise ConfigError(f"--resolution {args.resolution}: give the short side in pixels, e.g. 512")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: give 1 or more (the N of the N_concept folder)")
    concept = " ".join(args.concept.split())
    if not concept or concept.startswith(".") or any(c in concept for c in "/\\"):
        raise ConfigError(f"--concept {args.concept!r}: give a plain word such as hand (no slash, not starting "
                          "with a dot): it names the N_concept folder")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give 1 or more")
    out = Path(args.out).expanduser()
    if out.name in ("", ".", ".."):
        raise ConfigError(f"--out {args.out}: give the folder to write by its name, e.g. data/11k_hands")
    argv = getattr(args, "argv", None)
    line = shlex.join(["prepare_dataset.py", *argv]) if argv is not None else ""
    return Options(out=out, concept=concept, repeats=args.repeats, resolution=args.resolution, format=args.format,
                   overwrite=args.overwrite, workers=args.workers, command_line=line)


def one_line(text: str | None) -> str:
    """A caption as one line with single spaces (a caption file's first line is all training reads)."""
    return " ".join((text or "").split())


def unique_names(items: list[Item]) -> None:
    """Give items that would share a file name in one folder (case-insensitively) a suffix _2, _3, …"""
    taken: set[tuple[str, str]] = set()
    for item in items:
        name, n = item.name, 1
        while (item.split, name.lower()) in taken:
            n += 1
            name = f"{item.name}_{n}"
        taken.add((item.split, name.lower()))
        item.name = name


# ------------------------------------------------------------------------------------ images


def training_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) with the short side `resolution` and the aspect ratio kept; a smaller image keeps its size."""
    w, h = size
    if min(w, h) <= resolution:
        return w, h
    if w <= h:
        return resolution, max(1, round(h * resolution / w))
    return max(1, round(w * resolution / h)), resolution


def write_image(image, path: Path, fmt: str) -> None:
    """Save one image (the one place an image file is written: tests replace it to simulate a crash)."""
    kind, _ = FORMATS[fmt]
    if kind == "JPEG":
        image.save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        image.save(path, "PNG")


def _write_one(item: Item, folder: Path, options: Options) -> tuple[Item, tuple[int, int] | None, Dropped | None, bool]:
    """Decode, resize and write one image and its caption: (item, written size, why dropped, kept smaller)."""
    from PIL import Image

    from library.dataset.images import BadImageError, load_rgb

    try:
        # JPEG draft decoding at 1/2, 1/4… while both sides stay ≥ resolution: the short side is never cut below it
        image = load_rgb(item.source, min_size=(options.resolution, options.resolution))
    except BadImageError as exc:
        return item, None, Dropped(item.where, "broken image", f"{item.where}: {exc} Replace the file or leave it "
                                                               "out."), False
    except OSError as exc:  # a file that vanished or cannot be opened for reading
        return item, None, Dropped(item.where, "broken image", f"{item.where}: {item.source} cannot be read "
                                                               f"({exc.strerror or exc})."), False
    size = training_size(image.size, options.resolution)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    write_image(image, folder / f"{item.name}{FORMATS[options.format][1]}", options.format)
    (folder / f"{item.name}.txt").write_text(item.caption + "\n", encoding="utf-8")
    return item, size, None, min(size) < options.resolution


def _in_order(work: Callable, items: list, workers: int) -> Iterator:
    """work(item) for each item, `workers` at a time, results in the items' order.

    Close the generator (contextlib.closing) when stopping early: it then cancels what has not started and
    waits for what has, so no thread still writes into a folder that is being removed.
    """
    if workers <= 1:
        for item in items:
            yield work(item)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        queue = iter(items)
        pending = [pool.submit(work, item) for _, item in zip(range(2 * workers), queue)]
        while pending:
            result = pending.pop(0).result()
            following = next(queue, None)
            if following is not None:
                pending.append(pool.submit(work, following))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------ replacing OUT


def _files_in(folder: Path) -> list[str]:
    """Every file (and link) under `folder`, as paths relative to it with '/'."""
    found = []
    for root, dirs, names in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [(base / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [(base / n).as_posix() for n in names]
    return sorted(found)


def _listed_files(out: Path) -> set[str] | None:
    """The files an earlier run says it wrote in `out` (its summary.json), or None when no run wrote `out`."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("written_by") != WRITTEN_BY:
            return None
        return set(manifest["files"]) | {MANIFEST, SUMMARY}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_replaceable(out: Path, overwrite: bool, what: str = "--out") -> None:
    """OUT may be new or empty; one that holds files must hold only what a run wrote, and needs --overwrite."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"{what} {out}: a file or link of that name is in the way; choose a folder name")
    files = _files_in(out)
    if not files:
        return
    listed = _listed_files(out)
    if listed is None:
        raise ConfigError(f"{what} {out} holds files that prepare_dataset.py did not write ({files[0]}, …); "
                          "choose a new folder (this tool never deletes files it did not write)")
    others = [f for f in files if f not in listed]
    if others:
        raise ConfigError(f"{what} {out}: files were added after prepare_dataset.py wrote it "
                          f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}); move them away or choose "
                          "another folder: --overwrite would replace the whole folder")
    if not overwrite:
        raise ConfigError(f"{what} {out} already holds an earlier prepare_dataset.py output; add --overwrite to "
                          "replace it, or choose a new folder")


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# ------------------------------------------------------------------------------------ writing


def write_plan(plan: Plan, options: Options, holdout: bool = False) -> Result:
    """Write OUT (and, with `holdout`, OUT_holdout) from the plan, atomically; the summary is printed by the caller.

    Raises ConfigError when nothing usable is left (nothing is written then) or a write fails (a full disk:
    nothing is written either, the previous OUT is kept).
    """
    from tqdm import tqdm

    from library.fileio import WRITE_ERRORS, atomic_dir, write_error_reason

    check_replaceable(options.out, options.overwrite)
    if holdout:
        check_replaceable(options.holdout_out, options.overwrite, "--out's holdout folder")
    if not plan.items:
        raise ConfigError(no_usable_message(plan.dropped))
    unique_names(plan.items)
    written: dict[str, list[Item]] = {TRAIN: [], HOLDOUT: []}
    dropped = list(plan.dropped)
    kept_smaller = 0
    targets = {TRAIN: options.out, **({HOLDOUT: options.holdout_out} if holdout else {})}
    try:
        with contextlib.ExitStack() as stack:
            temporaries = {split: stack.enter_context(atomic_dir(path)) for split, path in targets.items()}
            folders = {split: tmp / options.folder_name for split, tmp in temporaries.items()}
            for folder in folders.values():
                folder.mkdir()

            def work(item: Item):
                return _write_one(item, folders[item.split], options)

            bar = tqdm(total=len(plan.items), desc=f"writing {options.out.name}", unit="img")
            with bar, contextlib.closing(_in_order(work, plan.items, options.workers)) as results:
                for item, size, why, smaller in results:
                    bar.update()
                    if why is not None:
                        dropped.append(why)
                        continue
                    item.record["size"] = list(size)
                    written[item.split].append(item)
                    kept_smaller += smaller
            dropped.sort(key=input_order)
            if not written[TRAIN]:
                raise ConfigError(no_usable_message(dropped))
            summary = make_summary(plan, options, written, dropped, kept_smaller, holdout)
            for split, tmp in temporaries.items():
                files = [f"{options.folder_name}/{item.name}{ext}" for item in written[split]
                         for ext in (FORMATS[options.format][1], ".txt")]
                manifest = summary if split == TRAIN else {
                    "written_by": WRITTEN_BY, "command": summary["command"], "part": f"the held-out split of {options.out}",
                    "summary": str(options.out / SUMMARY)}
                (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=1, ensure_ascii=False)
                                            + "\n", encoding="utf-8")
            (temporaries[TRAIN] / SUMMARY).write_text(render_summary(summary), encoding="utf-8")
    except WRITE_ERRORS as exc:
        where = getattr(exc, "filename", None)
        raise ConfigError(f"--out {options.out}: could not write{f' {where}' if where else ''} "
                          f"({write_error_reason(exc)}); nothing was written and an earlier {options.out} is kept: "
                          "free space or fix the permissions, then run again") from None
    return Result(written, dropped, kept_smaller, summary)


def input_order(dropped: Dropped) -> tuple[str, int]:
    """Where an input was, as a sort key: "HandInfo.csv line 12" after "… line 9", paths by name."""
    place, _, number = dropped.where.rpartition(" line ")
    return (place, int(number)) if place and number.isdigit() else (dropped.where, 0)


def no_usable_message(dropped: list[Dropped]) -> str:
    reasons = Counter(d.reason for d in dropped)
    if not reasons:
        return "no input image was found; nothing was written"
    parts = []
    for reason, count in reasons.most_common(3):
        first = next(d for d in dropped if d.reason == reason)
        parts.append(f"{count} {reason} (e.g. {first.detail})" if reason != "irregular" else
                     f"{count} irregular (--keep-irregular keeps them)")
    return f"no usable image among {len(dropped)} input(s): {'; '.join(parts)}; nothing was written"


# ------------------------------------------------------------------------------------ the summary


def make_summary(plan: Plan, options: Options, written: dict[str, list[Item]], dropped: list[Dropped],
                 kept_smaller: int, holdout: bool) -> dict:
    splits = [TRAIN, HOLDOUT] if holdout else [TRAIN]
    folders = {TRAIN: options.out / options.folder_name, HOLDOUT: options.holdout_out / options.folder_name}
    split_rows = {}
    for split in splits:
        persons = {item.person for item in written[split] if item.person is not None}
        split_rows[split] = {"folder": str(folders[split]), "images": len(written[split]),
                             **({"persons": len(persons)} if persons else {})}
    attributes: dict[str, dict[str, dict[str, int]]] = {}
    names = plan.attribute_order or sorted({k for items in written.values() for i in items for k in i.attributes})
    for name in names:
        table: dict[str, dict[str, int]] = {}
        for split in splits:
            for item in written[split]:
                value = item.attributes.get(name, "")
                table.setdefault(value, {s: 0 for s in splits})[split] += 1
        order = plan.value_order.get(name, ())
        attributes[name] = {v: table[v] for v in sorted(table, key=lambda v: (
            order.index(v) if v in order else len(order), v))}
    reasons: dict[str, dict] = {}
    for d in dropped:
        entry = reasons.setdefault(d.reason, {"count": 0, "where": []})
        entry["count"] += 1
        entry["where"].append(d.where)
    images = [{"file": f"{options.folder_name}/{item.name}{FORMATS[options.format][1]}", "split": split,
               "caption": item.caption, "source": str(item.source), **item.record}
              for split in splits for item in written[split]]
    return {
        "written_by": WRITTEN_BY, "command": options.command_line, "kind": plan.command,
        "resolution": options.resolution, "format": options.format, "splits": split_rows,
        "kept_smaller": kept_smaller, "attributes": attributes, "dropped": reasons,
        "dropped_details": [d.detail for d in dropped], "notes": plan.notes, **plan.extra, "images": images,
    }


def _count(n: int) -> str:
    return f"{n:,}"


def render_summary(summary: dict) -> str:
    """summary.md: what was written where, the counts per attribute and split, what was dropped and why."""
    splits = list(summary["splits"])
    lines = [f"# {Path(summary['splits'][TRAIN]['folder']).parent.name}: written by prepare_dataset.py "
             f"{summary['kind']}", ""]
    if summary["command"]:
        lines += [f"`{summary['command']}`", ""]
    with_persons = any("persons" in row for row in summary["splits"].values())
    lines += ["| split | folder | images |" + (" persons |" if with_persons else ""),
              "|---|---|---|" + ("---|" if with_persons else "")]
    for split, row in summary["splits"].items():
        lines.append(f"| {split} | `{row['folder']}` | {_count(row['images'])} |"
                     + (f" {_count(row.get('persons', 0))} |" if with_persons else ""))
    fmt = "JPEG quality 95" if summary["format"] == "jpg" else "PNG"
    lines += ["", f"Images: short side {summary['resolution']} px (Lanczos, aspect ratio kept), {fmt}, one .txt "
              f"caption each; {_count(summary['kept_smaller'])} image(s) were smaller and kept at their size."]
    if summary["notes"]:
        lines += ["", *summary["notes"]]
    lines += ["", "## Counts", ""]
    for name, table in summary["attributes"].items():
        lines += [f"| {name} | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        for value, counts in table.items():
            lines.append(f"| {value or '—'} | " + " | ".join(_count(counts[s]) for s in splits) + " |")
        lines.append("")
    lines += ["## Dropped", ""]
    if not summary["dropped"]:
        lines += ["Nothing was dropped.", ""]
    else:
        lines += ["| reason | count | where |", "|---|---|---|"]
        for reason, entry in summary["dropped"].items():
            shown = ", ".join(entry["where"][:WHERE_SHOWN]) + (", …" if len(entry["where"]) > WHERE_SHOWN else "")
            lines.append(f"| {reason} | {_count(entry['count'])} | {shown} |")
        lines += ["", "Each one (the first 200; summary.json has them all):", ""]
        lines += [f"- {detail}" for detail in summary["dropped_details"][:200]]
        lines.append("")
    return "\n".join(lines)


def report(result: Result, options: Options, shown: int = 20) -> None:
    """The lines a command prints: each dropped input (the first `shown`; irregular rows only counted), then one
    line saying what was written where."""
    details = [d for d in result.dropped if d.reason != "irregular"]
    for d in details[:shown]:
        log.warning(f"skipped: {d.detail}")
    if len(details) > shown:
        log.warning(f"… and {len(details) - shown} more skipped (all in {options.out / SUMMARY})")
    parts = []
    for split, row in result.summary["splits"].items():
        persons = f", {row['persons']:,} person(s)" if "persons" in row else ""
        parts.append(f"{row['images']:,} image(s) with captions to {row['folder']}{persons}")
    dropped = Counter(d.reason for d in result.dropped)
    left_out = (f"; left out {sum(dropped.values()):,}: " + ", ".join(f"{n:,} {r}" for r, n in dropped.most_common())
                if dropped else "; nothing left out")
    smaller = f"; {result.kept_smaller:,} smaller than {options.resolution} px kept at their size" \
        if result.kept_smaller else ""
    print(f"wrote {' and '.join(parts)}{left_out}{smaller}; summary: {options.out / SUMMARY}")


def images_under(folder: Path, exclude: Iterable[Path] = ()) -> Iterator[Path]:
    """Every file under `folder`, sorted, hidden files and folders (names starting with '.') passed over, and
    so are the folders in `exclude` (the output itself when it lies inside the input)."""
    excluded = [p.resolve() for p in exclude]
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d).resolve() not in excluded)
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root, name)
