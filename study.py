#!/usr/bin/env python
"""A whole study from one study file: train every row, sample every checkpoint, judge, report.

    python study.py --config dataset_configs/study_sd15.toml --plan        # what it will do, nothing run
    python study.py --config dataset_configs/study_sd15.toml               # dev seeds
    python study.py --config dataset_configs/study_sd15.toml --seeds test  # fresh seeds, for the final table
    python study.py --config my_study.toml --rows base,lora_r4             # some rows only
    python study.py --config my_study.toml --reset lora_r4                 # train and sample that row again

Run the same command again after a crash or Ctrl-C: complete steps are skipped (library/study/runner.py).
With judge = "ratings" it stops after sampling and says how many images await `evaluate.py serve`; run it
again once they are rated to write the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.cli import run_main


def main(argv: list[str]) -> int:
    from library.study.plan import SEED_SETS, load_study
    from library.study.runner import describe_plan, reset_row, run_study

    parser = argparse.ArgumentParser(prog="study.py", description="Run a study file: train, sample, judge, report.")
    parser.add_argument("--config", required=True, help="the study file (TOML)")
    parser.add_argument("--out", help="output folder (default: the study file's [study] out, else study_<name>)")
    parser.add_argument("--seeds", choices=SEED_SETS, default="dev", help="which seeds to sample (default: dev)")
    parser.add_argument("--rows", help="only these rows, comma-separated (default: all)")
    parser.add_argument("--plan", action="store_true", help="print what the study would do and how long it "
                        "would take, and stop")
    parser.add_argument("--reset", metavar="ROW", help="forget a row (its training, images and their ratings) so "
                        "that the next run trains and samples it again")
    parser.add_argument("--force", action="store_true", help="with --reset: delete people's ratings of the row too")
    args = parser.parse_args(argv)
    study = load_study(args.config)
    if args.plan:
        print(describe_plan(study, args.seeds))
        return 0
    out = Path(args.out) if args.out else study.out
    if args.reset:
        removed = reset_row(study, args.reset, out, args.force)
        print(f"study: forgot row {args.reset}: " + ("; ".join(removed) or "nothing was there"))
        return 0
    only = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else ()
    run_study(study, out, args.seeds, only)
    return 0


if __name__ == "__main__":
    run_main(main)
