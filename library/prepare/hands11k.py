"""`prepare_dataset.py 11k-hands`: 11K-Hands (HandInfo.csv + Hands/) as a captioned training folder.

    python prepare_dataset.py 11k-hands --csv HandInfo.csv --images Hands/ --out data/11k_hands --holdout 0.1

HandInfo.csv has one row per image under the header

    id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities

(id: the person; age in years; gender male|female; skinColor very fair|fair|medium|dark; accessories,
nailPolish, irregularities: 0|1; aspectOfHand dorsal|palmar + right|left; imageName such as Hand_0000002.jpg).
A UTF-8 byte-order mark and Windows line endings are accepted; vocabulary is matched ignoring case and
surrounding spaces. A row that cannot be used is reported by its line number and left out, the rest is
written: a wrong field count, an id or age that is not a whole number, an age outside 1–120, a word outside
the vocabulary, a flag other than 0/1, an imageName that is not a plain file name or that an earlier row
already listed, an image file that is missing or cannot be decoded. Rows with irregularities = 1 (11K-Hands'
own mark for unusual hands and photos) are left out unless `--keep-irregular`. A wrong header is one
error naming the first column that differs and the expected header.

The caption grammar (`caption`) is the study's (§3.1: 'front'|'back' 'of' 'fair'|'medium'|'dark'
'-skinned' ['elderly'] 'male'|'female' 'left'|'right' 'hand' ['with' 'nail polish'|'accessories'|'nail polish
and accessories']), one rule per field, in this order, words exactly as written:

    field                 value                 words
    aspectOfHand (view)   dorsal                "back of"
                          palmar                "front of"          (the palm side)
    skinColor             very fair, fair       "fair-skinned"      (the study's grammar has three skin
                                                                     words; the summary counts very fair apart)
                          medium                "medium-skinned"
                          dark                  "dark-skinned"
    age                   60 and over           "elderly"           (under 60: nothing)
    gender                male                  "male"
                          female                "female"
    aspectOfHand (side)   right                 "right hand"
                          left                  "left hand"
    nailPolish            1                     "with nail polish"  (0: nothing)
    accessories           1                     "with accessories"  (0: nothing; 11K-Hands' accessories are
                                                                     rings, bracelets and watches)
                                                both 1: "with nail polish and accessories"

    "back of fair-skinned elderly male right hand with nail polish"
    "front of dark-skinned female left hand with nail polish and accessories"
    "front of medium-skinned male left hand"

Like the study's, the captions never say how many fingers a hand has.

Held-out split (`--holdout SHARE`, default 0: every person trains): that share of the PERSONS (ids), rounded,
at least one and never all, drawn with `random.Random(--seed)` from the sorted ids of the usable rows, goes
with all of its images to OUT_holdout/N_concept beside OUT (data/11k_hands_holdout/1_hand for
data/11k_hands), so that no person is in both halves and training on OUT never sees them. The same CSV,
flags and seed give the same split.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from library.errors import ConfigError
from library.prepare.output import (
    HOLDOUT,
    TRAIN,
    Dropped,
    Item,
    Plan,
    add_output_arguments,
    check_replaceable,
    input_order,
    options_from_args,
    report,
    write_plan,
)

HEADER = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName",
          "irregularities")

# ---------------------------------------------------------------------------- the caption grammar
# one table or function per field; `caption` only puts their words together

VIEW_WORDS = {"dorsal": "back of", "palmar": "front of"}
SKIN_WORDS = {"very fair": "fair-skinned", "fair": "fair-skinned", "medium": "medium-skinned",
              "dark": "dark-skinned"}
AGES = (1, 120)  # a whole number of years in this range, else the row is reported (a typo in the CSV)
ELDERLY_FROM, ELDERLY_WORD = 60, "elderly"
# the summary's age bands: (first age, label)
AGE_BANDS = ((AGES[0], "under 60"), (ELDERLY_FROM, "60 and over"))
GENDER_WORDS = {"male": "male", "female": "female"}
SIDE_WORDS = {"right": "right hand", "left": "left hand"}
NAIL_POLISH_WORDS = "nail polish"
ACCESSORY_WORDS = "accessories"
GENDERS = tuple(GENDER_WORDS)
ASPECTS = tuple(f"{view} {side}" for view in VIEW_WORDS for side in SIDE_WORDS)


@dataclass(frozen=True)
class HandRow:
    """One usable row of HandInfo.csv."""

    line: int
    person: int
    age: int
    gender: str          # "male" | "female"
    skin: str            # "very fair" | "fair" | "medium" | "dark"
    accessories: bool
    nail_polish: bool
    view: str            # "dorsal" | "palmar"
    side: str            # "right" | "left"
    image_name: str
    irregular: bool


def age_band(age: int) -> str:
    """The summary's label of an age (one of AGE_BANDS)."""
    return [label for first, label in AGE_BANDS if age >= first][-1]


def caption(row: HandRow) -> str:
    """The caption of one row in the study's grammar (the module docstring's table)."""
    words = [VIEW_WORDS[row.view], SKIN_WORDS[row.skin]]
    if row.age >= ELDERLY_FROM:
        words.append(ELDERLY_WORD)
    words += [GENDER_WORDS[row.gender], SIDE_WORDS[row.side]]
    extras = [w for w, present in ((NAIL_POLISH_WORDS, row.nail_polish), (ACCESSORY_WORDS, row.accessories))
              if present]
    if extras:
        words += ["with", " and ".join(extras)]
    return " ".join(words)


def attributes(row: HandRow, with_irregular: bool) -> dict[str, str]:
    """What the summary counts for a row."""
    counted = {"aspect": row.view, "side": row.side, "skin colour": row.skin, "gender": row.gender,
               "age": age_band(row.age), "nail polish": "yes" if row.nail_polish else "no",
               "accessories": "yes" if row.accessories else "no"}
    if with_irregular:
        counted["irregularities"] = "yes" if row.irregular else "no"
    return counted


# ---------------------------------------------------------------------------- reading HandInfo.csv


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _whole(value: str, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _BadRow(f"{column} not a whole number", f"{column} {value!r} is not a whole number") from None


def _word(value: str, column: str, vocabulary: tuple[str, ...]) -> str:
    word = " ".join(value.split()).lower()
    if word not in vocabulary:
        raise _BadRow(f"unknown {column}", f"{column} {value!r} is not one of: {', '.join(vocabulary)}")
    return word


def _flag(value: str, column: str) -> bool:
    if value.strip() not in ("0", "1"):
        raise _BadRow(f"{column} not 0 or 1", f"{column} {value!r} is not 0 or 1")
    return value.strip() == "1"


def parse_row(fields: list[str], line: int) -> HandRow:
    """A HandRow from one CSV record; _BadRow saying what is wrong."""
    if len(fields) != len(HEADER):
        raise _BadRow("wrong number of fields", f"{len(fields)} field(s), the header has {len(HEADER)}")
    value = dict(zip(HEADER, fields))
    person = _whole(value["id"].strip(), "id")
    age = _whole(value["age"].strip(), "age")
    if not AGES[0] <= age <= AGES[1]:
        raise _BadRow("age out of range", f"age {age} is not an age in years ({AGES[0]}–{AGES[1]})")
    view, side = _word(value["aspectOfHand"], "aspectOfHand", ASPECTS).split()
    name = value["imageName"].strip()
    if not name or name in (".", "..") or any(c in name for c in "/\\"):
        raise _BadRow("bad imageName", f"imageName {value['imageName']!r} is not a plain file name")
    return HandRow(line=line, person=person, age=age, gender=_word(value["gender"], "gender", GENDERS),
                   skin=_word(value["skinColor"], "skinColor", tuple(SKIN_WORDS)),
                   accessories=_flag(value["accessories"], "accessories"),
                   nail_polish=_flag(value["nailPolish"], "nailPolish"), view=view, side=side, image_name=name,
                   irregular=_flag(value["irregularities"], "irregularities"))


def check_header(header: list[str] | None, csv_path: Path) -> None:
    """ConfigError naming the first column that differs from 11K-Hands' header (spaces around names are fine)."""
    found = [h.strip() for h in header or []]
    if found == list(HEADER):
        return
    if not found:
        problem = "the file is empty"
    else:
        column = next((i for i, (a, b) in enumerate(zip(found, HEADER)) if a != b), min(len(found), len(HEADER)))
        if column < min(len(found), len(HEADER)):
            problem = f"column {column + 1} is {found[column]!r} where {HEADER[column]!r} belongs"
        else:
            problem = f"it has {len(found)} column(s) instead of {len(HEADER)}"
    raise ConfigError(f"{csv_path}: line 1 is not 11K-Hands' header ({problem}); expected {','.join(HEADER)}; "
                      "give 11K-Hands' own HandInfo.csv, or fix its first line")


def read_hand_info(csv_path: Path) -> tuple[list[HandRow], list[Dropped]]:
    """The usable rows of HandInfo.csv and the others (by line); ConfigError for a missing file or a wrong header."""
    if not csv_path.is_file():
        raise ConfigError(f"--csv {csv_path}: no such file; give the HandInfo.csv that ships with 11K-Hands")
    rows: list[HandRow] = []
    dropped: list[Dropped] = []
    first_line: dict[str, int] = {}
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            check_header(next(reader, None), csv_path)
            for fields in reader:
                line = reader.line_num
                if not fields or all(not v.strip() for v in fields):
                    continue  # a blank line (often the last one)
                where = f"{csv_path.name} line {line}"
                try:
                    row = parse_row(fields, line)
                    key = row.image_name.lower()
                    if key in first_line:
                        raise _BadRow("imageName listed twice",
                                      f"imageName {row.image_name} was already listed on line {first_line[key]}")
                    first_line[key] = line
                except _BadRow as bad:
                    dropped.append(Dropped(where, bad.reason, f"{where}: {bad.detail}; fix the row or delete it"))
                    continue
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give 11K-Hands' own "
                          "HandInfo.csv, or re-save it as UTF-8") from None
    except csv.Error as exc:
        raise ConfigError(f"{csv_path}: not a readable CSV file ({exc}); give 11K-Hands' own HandInfo.csv") from None
    return rows, dropped


# ---------------------------------------------------------------------------- the split and the plan


def holdout_persons(persons: list[int], share: float, seed: int) -> set[int]:
    """The persons held out: round(share × count), at least 1 and at most count − 1, drawn with `seed`."""
    if share <= 0:
        return set()
    persons = sorted(set(persons))
    if len(persons) < 2:
        raise ConfigError(f"--holdout {share:g}: the usable rows have {len(persons)} person(s); holding persons out "
                          "needs at least two (or give --holdout 0)")
    count = min(len(persons) - 1, max(1, round(share * len(persons))))
    return set(random.Random(seed).sample(persons, count))


def plan_hands(csv_path: Path, images: Path, keep_irregular: bool = False, holdout: float = 0.0,
               seed: int = 0) -> Plan:
    """The images to write, their captions and splits, and the rows left out (not yet the broken images)."""
    if not images.is_dir():
        raise ConfigError(f"--images {images}: no such folder; give the folder holding 11K-Hands' images (Hands/)")
    rows, dropped = read_hand_info(csv_path)
    total = len(rows) + len(dropped)
    present = set(os.listdir(images))
    usable: list[HandRow] = []
    for row in rows:
        where = f"{csv_path.name} line {row.line}"
        if row.irregular and not keep_irregular:
            dropped.append(Dropped(where, "irregular", f"{where}: irregularities = 1 (--keep-irregular keeps it)"))
        elif row.image_name not in present or not (images / row.image_name).is_file():
            dropped.append(Dropped(where, "image file missing",
                                   f"{where}: {images / row.image_name} does not exist; check --images (the folder "
                                   "of 11K-Hands' images) or put the file back"))
        else:
            usable.append(row)
    dropped.sort(key=input_order)
    held = holdout_persons([r.person for r in usable], holdout, seed)
    items = [Item(source=images / row.image_name, name=Path(row.image_name).stem, caption=caption(row),
                  where=f"{csv_path.name} line {row.line}", split=HOLDOUT if row.person in held else TRAIN,
                  person=row.person, attributes=attributes(row, keep_irregular),
                  record={"line": row.line, "id": row.person, "age": row.age, "imageName": row.image_name})
             for row in usable]
    persons = sorted({r.person for r in usable})
    notes = [f"Rows of {csv_path}: {total:,}; irregular rows "
             f"{'kept (--keep-irregular)' if keep_irregular else 'left out'}."]
    if held:
        notes.append(f"Held out: {len(held)} of {len(persons)} persons (--holdout {holdout:g}, --seed {seed}), "
                     f"every image of a person in one split only: ids {', '.join(map(str, sorted(held)))}.")
    extra = {"persons": {TRAIN: [p for p in persons if p not in held], HOLDOUT: sorted(held)}} if held else {}
    yes_no = ("yes", "no")
    order = {"aspect": tuple(VIEW_WORDS), "side": tuple(SIDE_WORDS), "skin colour": tuple(SKIN_WORDS),
             "gender": GENDERS, "age": tuple(label for _, label in AGE_BANDS), "nail polish": yes_no,
             "accessories": yes_no, "irregularities": yes_no}
    return Plan("11k-hands", items, dropped, list(attributes(usable[0], keep_irregular)) if usable else [],
                notes, extra, order)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="11K-Hands' HandInfo.csv")
    parser.add_argument("--images", required=True, help="the folder of 11K-Hands' images (Hands/)")
    add_output_arguments(parser, "the training folder to write, e.g. data/11k_hands (images in OUT/1_hand/)")
    parser.add_argument("--keep-irregular", action="store_true",
                        help="keep the rows with irregularities = 1 (left out by default)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="share of the PERSONS whose images go to OUT_holdout/ instead (default 0), e.g. 0.1")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the held-out draw (default 0)")


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if not 0.0 <= args.holdout < 1.0:
        raise ConfigError(f"--holdout {args.holdout:g}: give the share of persons to hold out, from 0 (none) to "
                          "below 1, e.g. 0.1")
    holdout = args.holdout > 0
    check_replaceable(options.out, options.overwrite)
    if holdout:
        check_replaceable(options.holdout_out, options.overwrite, "--out's holdout folder")
    plan = plan_hands(Path(args.csv).expanduser(), Path(args.images).expanduser(), args.keep_irregular,
                      args.holdout, args.seed)
    result = write_plan(plan, options, holdout=holdout)
    report(result, options)
    if not holdout and options.holdout_out.exists():
        print(f"note: {options.holdout_out} (an earlier --holdout) was left as it was; it does not match "
              f"{options.out} any more: delete it, or run again with --holdout")
    return 0


COMMANDS = {
    "11k-hands": ("11K-Hands (HandInfo.csv + Hands/) as a training folder with study-grammar captions",
                  add_arguments, run),
}
