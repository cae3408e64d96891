"""`prepare_dataset.py from-ratings`: the rated images with one score as a captioned training folder.

    python prepare_dataset.py from-ratings --db ratings.sqlite --score 0 --out data/bad_hands_captioned
    python prepare_dataset.py from-ratings --db ratings.sqlite --score 1 --caption "a photo of a hand" --out data/good

Which images have the score is `evaluate.py export`'s decision, made by the same code
(library.evaluate.export.select_exportable: the report's score of each image under --source and --rater,
exactly equal to --score; no-hand images never), and its refusals are the same: an unknown --run, no image
with the score, image files that are gone. What differs is the folder: export copies the PNGs byte for
byte without captions (textual inversion's object templates caption them); this writes the N_concept
folder of prepare_dataset.py, resized, with a caption file per image: `--caption`, else the image's own
prompt as the database stores it (its <lora:…> tags already taken out by the import). An image without a
stored prompt is left out and named when there is no --caption. Files are named `<run>_<sha256 prefix>`,
as export names them; the summary counts the images per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.errors import ConfigError
from library.evaluate.export import (
    SCORES, add_selection_arguments, check_sources_present, export_stem, select_exportable,
)
from library.prepare.output import (
    Dropped,
    Item,
    Plan,
    add_output_arguments,
    check_replaceable,
    one_line,
    options_from_args,
    report,
    write_plan,
)


def plan_from_ratings(db: str, score: str, source: str = "human", raters: tuple[str, ...] = (),
                      runs: tuple[str, ...] = (), caption: str | None = None) -> Plan:
    from library.evaluate.db import DatabaseError

    try:
        chosen, records = select_exportable(db, score, source, raters, runs)
    except DatabaseError as exc:
        raise ConfigError(str(exc)) from None
    check_sources_present(chosen)
    items: list[Item] = []
    dropped: list[Dropped] = []
    for record, row in chosen:
        where = f"{row['path']}"
        text = caption or one_line(record.prompt)
        if not text:
            dropped.append(Dropped(where, "no prompt stored",
                                   f"{where} (run {record.run}): the database stores no prompt for it (a PNG without "
                                   "parameters); give --caption to caption every image"))
            continue
        items.append(Item(source=Path(row["path"]), name=export_stem(row), caption=text, where=where,
                          attributes={"run": record.run},
                          record={"sha256": row["sha256"], "run": record.run, "prompt": record.prompt,
                                  "seed": record.seed, "score": record.score, "ratings": record.ratings}))
    how = f"captioned {caption!r}" if caption else "each captioned with its stored prompt"
    notes = [f"The images of {db} with score {score} ({source} ratings{', raters ' + ', '.join(raters) if raters else ''}"
             f"{', runs ' + ', '.join(runs) if runs else ''}; {len(records)} image(s) considered), {how}."]
    return Plan("from-ratings", items, dropped, ["run"], notes, {"score": SCORES[score], "ratings_from": source})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (SQLite)")
    parser.add_argument("--score", required=True, choices=sorted(SCORES),
                        help="the images with this score (as `evaluate.py export --score`): 0, 0.5 or 1")
    add_output_arguments(parser, "the training folder to write, e.g. data/bad_hands_captioned")
    parser.add_argument("--caption", default=None,
                        help="the caption of every image (default: each image's prompt from the database)")
    add_selection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    caption = None
    if args.caption is not None:
        caption = one_line(args.caption)
        if not caption:
            raise ConfigError("--caption is empty; give a caption, or leave --caption out to use each image's prompt")
    check_replaceable(options.out, options.overwrite)
    plan = plan_from_ratings(args.db, args.score, args.source, tuple(args.rater), tuple(args.run), caption)
    result = write_plan(plan, options)
    report(result, options)
    return 0


COMMANDS = {
    "from-ratings": ("the rated images with one score (as `evaluate.py export` picks them) as a captioned training "
                     "folder", add_arguments, run),
}
