"""`python -m library.dataset --config job.toml`: the dataset dry run (see library/dataset/debug.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from library.dataset.dataset import TrainDataset
from library.dataset.debug import debug_dataset
from library.config import load_job
from library.errors import PentadactylError
from library.models.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library.dataset",
                                     description="The dataset dry run: what training would see, without loading any model.")
    parser.add_argument("--config", required=True, help="the job TOML of a training script")
    parser.add_argument("--script", default="train_network", help="whose job it is (default train_network)")
    parser.add_argument("--epoch", type=int, default=1, help="which epoch's batches to show (from 1)")
    parser.add_argument("--batches", type=int, default=4, help="how many batches to show")
    parser.add_argument("--seed", type=int, default=None, help="overrides the job's seed")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.script, ["--config", args.config])
        dataset = TrainDataset(job.datasets, seed=job.seed if args.seed is None else args.seed,
                               tokenizer=load_tokenizer(), num_workers=job.max_data_loader_n_workers)
        debug_dataset(dataset, args.epoch, args.batches)
    except PentadactylError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # the summary repeats every warning, so the log shows only errors here
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    sys.exit(main())
