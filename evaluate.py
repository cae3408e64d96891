#!/usr/bin/env python
"""Judging generated images: register them, rate them blind, measure them, and feed the bad ones back.

    python evaluate.py import --db ratings.sqlite samples/base samples/lora   # register PNGs (idempotent)
    python evaluate.py serve --db ratings.sqlite                               # rate them in a browser
    python evaluate.py report --db ratings.sqlite --out report/                # tables and plots
    python evaluate.py export --db ratings.sqlite --score 0 --out data/bad_hands
    python evaluate.py --help                                                  # every command

Each command lives in a module of `library/evaluate/` that exposes `COMMANDS`: {name: (help,
add_arguments(parser), run(args) -> exit code)}. Their top levels import only light modules, so that
`--help` answers at once; torch and friends are imported when a command runs. A user mistake (a missing
folder, a bad flag value, a file that is not a rating database) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# The modules whose COMMANDS make up the command line, in the order `--help` lists them.
COMMAND_MODULES = (
    "library.evaluate.importer",   # import
    "library.evaluate.server",     # serve
    "library.evaluate.report",     # report
    "library.evaluate.metrics",    # metrics
    "library.evaluate.classifier", # train-classifier, score
    "library.evaluate.export",     # export, rate-with-counter
)


def command_table() -> dict[str, tuple]:
    """{command: (help, add_arguments, run)} over COMMAND_MODULES; a name defined twice is a bug."""
    table: dict[str, tuple] = {}
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for name, entry in module.COMMANDS.items():
            if name in table:
                raise RuntimeError(f"evaluate.py: command {name!r} is defined twice ({module_name})")
            table[name] = entry
    return table


def build_parser(table: dict[str, tuple] | None = None) -> argparse.ArgumentParser:
    table = command_table() if table is None else table
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description="Judge generated images: import, rate (blind), measure, report, export.",
        epilog="`python evaluate.py COMMAND --help` shows a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in table.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run_command=run)  # not `run`: commands have a --run flag
    return parser


def main(argv: list[str] | None = None) -> int:
    from library.errors import PentadactylError
    from library.evaluate.db import DatabaseError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run_command(args) or 0)
    except (PentadactylError, DatabaseError) as exc:
        print(f"evaluate.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evaluate.py {args.command}: interrupted; everything committed so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
