"""The dataset dry run: what training would see, without loading any model.

    python -m library.dataset --config job.toml [--epoch 1] [--batches 4]

prints the subsets (images, repeats, where captions came from), skipped files and warnings, the bucket
table, and the processed captions of the first batches of an epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from library.dataset.dataset import TrainDataset
from library.errors import PentadactylError


def debug_dataset(dataset: TrainDataset, epoch: int = 1, batches: int = 4, out: Callable[[str], None] = print) -> None:
    """Print the summary, the bucket table and the captions of the first `batches` batches."""
    out(dataset.summary())
    out("")
    out(dataset.bucket_table())
    out("")
    out(f"epoch {epoch}, first {batches} batches (captions as trained at that step):")
    limit = _token_limit(dataset.tokenizer)
    for n, batch in enumerate(dataset.batch_plan(epoch)):
        if n >= batches:
            break
        w, h = batch["bucket"]
        out(f"batch {batch['index']}  bucket {w}×{h}")
        for path, caption, flip, reg in zip(batch["image_paths"], batch["captions"], batch["flipped"], batch["is_reg"].tolist()):
            marks = ("reg " if reg else "") + ("flipped " if flip else "")
            note = ""
            if limit:
                n_tokens = len(dataset.tokenizer(caption, add_special_tokens=False)["input_ids"])
                note = f"  [{n_tokens} tokens{', TRUNCATED' if n_tokens > limit else ''}]"
            out(f"  {Path(path).name}: {marks}{caption!r}{note}")


def _token_limit(tokenizer: Any) -> int | None:
    if tokenizer is None:
        return None
    return int(getattr(tokenizer, "model_max_length", 77)) - 2  # minus start and end tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library.dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the job TOML of a training script")
    parser.add_argument("--script", default="train_network", help="whose job it is (default train_network)")
    parser.add_argument("--epoch", type=int, default=1, help="which epoch's batches to show (from 1)")
    parser.add_argument("--batches", type=int, default=4, help="how many batches to show")
    parser.add_argument("--seed", type=int, default=None, help="overrides the job's seed")
    args = parser.parse_args(argv)
    try:
        from library.config import load_job
        from library.models.tokenizer import load_tokenizer

        job = load_job(args.script, ["--config", args.config])
        dataset = TrainDataset(job.datasets, seed=job.seed if args.seed is None else args.seed,
                               tokenizer=load_tokenizer(), num_workers=job.max_data_loader_n_workers)
        debug_dataset(dataset, args.epoch, args.batches)
    except PentadactylError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
