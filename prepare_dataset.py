#!/usr/bin/env python
"""Preparing the study's datasets: raw image sets in, sd-scripts training folders with captions out.

    python prepare_dataset.py 11k-hands --csv HandInfo.csv --images Hands/ --out data/11k_hands --holdout 0.1
    python prepare_dataset.py folder --images Palms/ --caption "a photo of a palm" --out data/palms
    python prepare_dataset.py from-ratings --db ratings.sqlite --score 0 --out data/bad_hands_captioned
    python prepare_dataset.py toy-hands --out data/toy_hands              # the toy study's data (its own layout)
    python prepare_dataset.py --help                                       # every command

Each writes OUT/<repeats>_<concept>/ (default 1_hand) with the images, their short side --resolution,
and one .txt caption per image, plus OUT/summary.md and summary.json (counts per attribute, what was left
out and why); the folder appears whole or not at all (library/prepare/output.py). Each command lives in a
module of `library/prepare/` that exposes `COMMANDS`: {name: (help, add_arguments(parser), run(args))}.
A user mistake (a wrong CSV header, a missing folder, an --out holding other files) is one line on stderr
and exit code 2; a bad row or image is named on stderr and left out, the rest is written.
"""

from __future__ import annotations

import argparse
import importlib

from library.cli import run_main

# The modules whose COMMANDS make up the command line, in the order `--help` lists them.
COMMAND_MODULES = (
    "library.prepare.hands11k",  # 11k-hands
    "library.prepare.folder",    # folder
    "library.prepare.ratings",   # from-ratings
    "toy_hands.prepare",         # toy-hands: the toy study's datasets
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_dataset.py", description="Write the study's datasets as training folders with captions.",
        epilog="`python prepare_dataset.py COMMAND --help` shows a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        for name, (help_text, add_arguments, run) in importlib.import_module(module_name).COMMANDS.items():
            sub = commands.add_parser(name, help=help_text, description=help_text)
            add_arguments(sub)
            sub.set_defaults(run_command=run)  # not `run`: from-ratings has a --run flag
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # the command line, for the summary
    return int(args.run_command(args) or 0)


if __name__ == "__main__":
    run_main(main)
