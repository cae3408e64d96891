"""The hand study in miniature, in one command, on the pretrained toy hand model:

    python -m toy_hands.study                  dev seeds (what the settings were chosen on)
    python -m toy_hands.study --seeds test     fresh seeds: the numbers to report
    python -m toy_hands.study --quick          the same steps at a fraction of the size (the test suite's)

It is the study runner (study.py, library/study/) on dataset_configs/study_toy.toml, after the toy data:
`prepare_dataset.py toy-hands` writes data/toy_hands (clean hands, palms, the base model's generations sorted
by the finger counter) unless it is there already, then every row is trained from its job in
dataset_configs/toy/, sampled at DDIM 30 steps, CFG 7.5, judged by the counter and reported: OUT/<seeds>/
report/study.md (each row at its final weights), report.md (every checkpoint and multiplier, bootstrap
intervals over prompts × seeds, paired differences) and plots/score_by_step.png. Like study.py it is
resumable: run it again after a crash or Ctrl-C and only what was cut short is redone.

--quick derives a smaller study from the same file in code (QUICK below): 4 prompts × 6 seeds, 24 training
steps, its own data (data/toy_hands_quick) and output folder (toy_study_quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from library.schema import load_toml
from library.study.plan import Row, Study, load_study
from toy_hands import prepare

log = logging.getLogger("pentadactyl")

REPO = Path(__file__).resolve().parents[1]
STUDY_FILE = REPO / "dataset_configs" / "study_toy.toml"
DATA = {False: Path("data/toy_hands"), True: Path("data/toy_hands_quick")}


@dataclasses.dataclass(frozen=True)
class Quick:
    """How the quick study differs from the full one."""

    prompts: int = 4
    seeds: int = 6
    sample_steps: int = 12
    train: tuple[tuple[str, Any], ...] = (("max_train_steps", 24), ("train_batch_size", 4))
    dreambooth: tuple[tuple[str, Any], ...] = (("num_class_images", 8), ("class_image_steps", 12),
                                               ("class_image_batch_size", 4))
    checkpoints: tuple[int, ...] = (12,)
    multipliers: tuple[float, ...] = (0.5, 1.0)
    out: str = "toy_study_quick"


QUICK = Quick()


def _repoint(value: Any, old: str, new: str) -> Any:
    """`value` with every path under `old` moved under `new` (lists and tables walked)."""
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old):]
    if isinstance(value, list):
        return [_repoint(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _repoint(v, old, new) for k, v in value.items()}
    return value


def relocate(study: Study, data: Path) -> Study:
    """The study with every row's paths under data/toy_hands (its jobs' data) moved under `data`."""
    old, new = f"{DATA[False].as_posix()}/", f"{Path(data).as_posix()}/"
    if old == new:
        return study
    rows = []
    for row in study.rows:
        if row.script is not None:
            assert row.job is not None
            job = {**load_toml(row.job), **row.overrides}
            moved = {k: v2 for k, v in job.items() if (v2 := _repoint(v, old, new)) != v}
            row = dataclasses.replace(row, overrides={**row.overrides, **moved})
        rows.append(row)
    return dataclasses.replace(study, rows=tuple(rows))


def quick_row(row: Row, quick: Quick = QUICK) -> Row:
    if row.script is None:
        return row
    overrides = dict(quick.train)
    if row.script == "train_dreambooth":
        overrides.update(quick.dreambooth)
    multipliers = quick.multipliers if len(row.multipliers) > 1 else row.multipliers
    return dataclasses.replace(row, overrides={**row.overrides, **overrides},
                               checkpoints=quick.checkpoints if row.checkpoints else (), multipliers=multipliers)


def quick_study(study: Study, quick: Quick = QUICK) -> Study:
    seeds = {name: values[: quick.seeds] for name, values in study.seeds.items()}
    sample = {**study.sample, "prompts": study.prompts[: quick.prompts], "steps": quick.sample_steps,
              "batch_size": quick.seeds}
    return dataclasses.replace(study, name=f"{study.name}-quick", out=Path(quick.out), seeds=seeds, sample=sample,
                               rows=tuple(quick_row(r, quick) for r in study.rows))


def toy_study(quick: bool = False, data: Path | None = None, study_file: Path = STUDY_FILE) -> Study:
    """The toy study file (model and job paths from the repository), or its quick version, reading its
    data from `data` (default: data/toy_hands, with quick data/toy_hands_quick)."""
    study = load_study(study_file, base=REPO)
    study = quick_study(study) if quick else study
    return relocate(study, data or DATA[quick])


def main(argv: list[str]) -> None:
    from library.study.runner import describe_plan, run_study

    parser = argparse.ArgumentParser(prog="python -m toy_hands.study",
                                     description="Run the hand study in miniature on the toy hand model.")
    parser.add_argument("--out", help="results folder (default: toy_study, with --quick toy_study_quick)")
    parser.add_argument("--data", help="the toy data folder (default: data/toy_hands, with --quick "
                        "data/toy_hands_quick); written first when it is not there")
    parser.add_argument("--quick", action="store_true", help="the same study at a fraction of the size (for CI)")
    parser.add_argument("--seeds", choices=("dev", "test"), default="dev",
                        help="evaluation seeds: dev (what the settings were chosen on) or test (fresh, for reporting)")
    parser.add_argument("--rows", help="only these rows, comma-separated (default: all)")
    parser.add_argument("--plan", action="store_true", help="print what it would do and how long it would take")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else DATA[args.quick]
    study = toy_study(args.quick, data)
    if args.plan:
        print(describe_plan(study, args.seeds))
        return
    began = time.perf_counter()
    prepare.prepare_toy_data(data, prepare.QUICK if args.quick else prepare.FULL)
    only = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else ()
    outcome = run_study(study, Path(args.out) if args.out else study.out, args.seeds, only)
    print(f"toy study: {outcome.images} images judged; report in {outcome.report} "
          f"({(time.perf_counter() - began) / 60:.1f} min)")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
