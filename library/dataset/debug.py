"""The dataset dry run: what training would see, without loading any model.

    python -m library.dataset --config job.toml [--epoch 1] [--batches 4]   (the command: __main__.py)

prints the subsets (images, repeats, where captions came from), skipped files and warnings, the bucket
table, and the processed captions of the first batches of an epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from library.dataset.dataset import TrainDataset
from library.text_encoding import token_ids


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
                n_tokens = len(token_ids(dataset.tokenizer, caption))
                note = f"  [{n_tokens} tokens{', TRUNCATED' if n_tokens > limit else ''}]"
            out(f"  {Path(path).name}: {marks}{caption!r}{note}")


def _token_limit(tokenizer: Any) -> int | None:
    if tokenizer is None:
        return None
    return int(getattr(tokenizer, "model_max_length", 77)) - 2  # minus start and end tokens
