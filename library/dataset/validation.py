"""A held-out validation split: images kept out of training, scored at fixed timesteps and noise.

`hold_out(dataset, fraction)` removes a deterministic share of each dataset's training images from
training; `validation_batches(dataset, held)` encodes them once (centre crop, no flip, the first
template, no caption dropout or shuffle; wildcards chosen once, by a fixed generator) into batches the loop scores the same way every time.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from library.dataset.cache import encode_pixels
from library.dataset.captions import CaptionOptions, process_caption
from library.dataset.dataset import TrainDataset
from library.dataset.sources import ImageEntry
from library.errors import DatasetError

_HOLD_OUT = 97  # mixed into the seed of the choice: a stream none of the epochs' draws uses


def hold_out(dataset: TrainDataset, fraction: float) -> list[int]:
    """Entry indices moved from training to validation: round(fraction × images), at least 1 per dataset."""
    held: list[int] = []
    for d, ds in enumerate(dataset.configs):
        train = sorted((i for i in dataset.usable_indices()
                        if dataset.entries[i].dataset == d and not dataset.entries[i].is_reg),
                       key=lambda i: str(dataset.entries[i].path))
        count = max(1, round(fraction * len(train)))
        if count >= len(train):
            raise DatasetError(f"{ds.where}: validation_split = {fraction} would hold out all {len(train)} training "
                               "images; lower it or add images.")
        order = np.random.default_rng([dataset.seed, _HOLD_OUT, d]).permutation(len(train))
        held += [train[k] for k in sorted(order[:count])]
    dataset.remove(held)
    return held


def _caption(dataset: TrainDataset, e: ImageEntry) -> str:
    options = dataset.subset_of(e).caption
    fixed = CaptionOptions(separator=options.separator, prefix=options.prefix, suffix=options.suffix,
                           keep_tokens_separator=options.keep_tokens_separator,
                           secondary_separator=options.secondary_separator, wildcard=options.wildcard)
    return process_caption(dataset.base_caption(e), fixed, np.random.default_rng(0), epoch=1,
                           replacements=dataset.caption_replacements)


def validation_batches(dataset: TrainDataset, held: list[int], vae: torch.nn.Module, device,
                       batch_size: int) -> list[dict]:
    """Batches (grouped by bucket) of the held-out images with latents × scaling_factor and fixed captions."""
    by_bucket: dict[tuple[int, int], list[ImageEntry]] = defaultdict(list)
    for i in held:
        by_bucket[dataset.entries[i].choice.bucket].append(dataset.entries[i])
    batches = []
    with torch.no_grad():
        for bucket, entries in sorted(by_bucket.items()):
            for k in range(0, len(entries), batch_size):
                chunk = entries[k:k + batch_size]
                pixels = [dataset.pixels_of(e) for e in chunk]
                latents = encode_pixels(vae, torch.stack(pixels), device, torch.float32)
                batches.append({"latents": latents * float(vae.config.scaling_factor),
                                "captions": [_caption(dataset, e) for e in chunk],
                                "loss_weights": torch.ones(len(chunk)),
                                "image_paths": [str(e.path) for e in chunk]})
    return batches
