"""A held-out validation split: images kept out of training, scored at fixed timesteps and noise.

`hold_out(dataset, fraction)` removes a deterministic share of each dataset's training images from
training; `validation_batches(dataset, held)` encodes them once (centre crop, no flip, no caption
dropout or shuffle) into batches the loop scores the same way every time.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from library.dataset.buckets import crop_offset
from library.dataset.cache import encode_pixels
from library.dataset.captions import CaptionOptions, fill_template, process_caption
from library.dataset.sources import ImageEntry
from library.errors import DatasetError


def hold_out(dataset, fraction: float) -> list[int]:
    """Entry indices moved from training to validation: round(fraction × images), at least 1 per dataset."""
    held: list[int] = []
    for d, ds in enumerate(dataset.configs):
        train = sorted((i for i, e in enumerate(dataset.entries)
                        if e.dataset == d and not e.is_reg and i not in dataset._removed),
                       key=lambda i: str(dataset.entries[i].path))
        count = max(1, round(fraction * len(train)))
        if count >= len(train):
            raise DatasetError(f"{ds.where}: validation_split = {fraction} would hold out all {len(train)} training "
                               "images; lower it or add images.")
        order = np.random.default_rng([dataset.seed, 97, d]).permutation(len(train))
        held += [train[k] for k in sorted(order[:count])]
    dataset._removed.update(held)
    dataset._rebuild()
    return held


def _caption(dataset, e: ImageEntry) -> str:
    sub = dataset._subset_of(e)
    base = e.caption
    if base is None:
        templates = sub.caption_templates or dataset.caption_templates
        token = sub.class_tokens if sub.class_tokens is not None else (dataset.template_token or "")
        base = fill_template(templates[0], token) if templates else (sub.class_tokens or "")
    fixed = CaptionOptions(separator=sub.caption.separator, prefix=sub.caption.prefix, suffix=sub.caption.suffix)
    return process_caption(base, fixed, np.random.default_rng(0), epoch=1, replacements=dataset.caption_replacements)


def validation_batches(dataset, held: list[int], vae: torch.nn.Module, device, batch_size: int) -> list[dict]:
    """Batches (grouped by bucket) of the held-out images with latents × scaling_factor and fixed captions."""
    from library.dataset.dataset import SampleDraws

    by_bucket: dict[tuple[int, int], list[ImageEntry]] = defaultdict(list)
    for i in held:
        by_bucket[dataset.entries[i].choice.bucket].append(dataset.entries[i])
    batches = []
    with torch.no_grad():
        for bucket, entries in sorted(by_bucket.items()):
            for k in range(0, len(entries), batch_size):
                chunk = entries[k:k + batch_size]
                pixels = [dataset._pixels(e, SampleDraws(False, crop_offset(e.choice.resized, bucket, None), 0.0, 0))[0]
                          for e in chunk]
                latents = encode_pixels(vae, torch.stack(pixels), device, torch.float32)
                batches.append({"latents": latents * float(vae.config.scaling_factor),
                                "captions": [_caption(dataset, e) for e in chunk],
                                "loss_weights": torch.ones(len(chunk)),
                                "image_paths": [str(e.path) for e in chunk]})
    return batches
