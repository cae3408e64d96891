"""Epoch planning: which samples an epoch has, how they are batched, and each sample's random choices.

Pure: nothing here reads a file or holds a tensor. Every random choice comes from a generator seeded
with (seed, epoch, purpose, dataset, sample or bucket), never from a global RNG, so a plan is a function
of its arguments: the same epoch is planned identically every time, which is what makes resuming
mid-epoch exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from library.dataset.buckets import BucketChoice, crop_offset
from library.dataset.config import DatasetConfig, SubsetConfig
from library.dataset.sources import ImageEntry
from library.errors import DatasetError

# Purposes mixed into the random seeds so that the streams never coincide.
BUCKET_SHUFFLE, BATCH_ORDER, IMAGE_DRAWS, CAPTION_DRAWS = 1, 2, 3, 4
HUE_RANGE = 0.02  # color_aug: hue rotated by at most ±2% of the colour circle (about ±7 degrees)

Bucket = tuple[int, int]


def rng(seed: int, epoch: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *key])


def caption_rng(seed: int, epoch: int, *sample: int) -> np.random.Generator:
    """The generator of a sample's caption processing; `sample` is (dataset, sample id)."""
    return rng(seed, epoch, CAPTION_DRAWS, *sample)


@dataclass(frozen=True)
class SampleDraws:
    """The random choices for one sample in one epoch."""

    flip: bool
    crop: tuple[int, int]  # top-left corner of the crop in the resized image
    hue_shift: float  # 0 unless color_aug
    template: int  # index into the caption templates


def centred_draws(choice: BucketChoice) -> SampleDraws:
    """No flip, the centre crop, no colour shift, the first template: what cached and validation latents
    are made from (a cached latent must be the same whatever the epoch)."""
    return SampleDraws(False, crop_offset(choice.resized, choice.bucket, None), 0.0, 0)


def draw_sample(seed: int, epoch: int, dataset: int, sample_id: int, choice: BucketChoice, sub: SubsetConfig,
                template_count: int) -> SampleDraws:
    """The random choices of sample `sample_id` of `dataset` in `epoch`; `template_count`: 0 without templates."""
    r = rng(seed, epoch, IMAGE_DRAWS, dataset, sample_id).random(5)  # always five draws: options stay independent
    return SampleDraws(
        flip=sub.flip_aug and r[0] < 0.5,
        crop=crop_offset(choice.resized, choice.bucket, (r[1], r[2]) if sub.random_crop else None),
        hue_shift=(r[3] * 2 - 1) * HUE_RANGE if sub.color_aug else 0.0,
        template=int(r[4] * template_count) if template_count else 0,
    )


def balanced_repeats(train_samples: int, reg_repeats: Sequence[int]) -> list[int]:
    """Repeats of each reg image (in order) so that reg samples per epoch match the training samples.

    The sd-scripts rule: walk the reg images in order, first giving each its subset's repeats, then one
    more each round, until the total reaches the training samples. Reg images not reached in the first
    round get 0 repeats (there were more of them than training samples).
    """
    out = [0] * len(reg_repeats)
    total, first_round = 0, True
    while total < train_samples and out:
        for k, base in enumerate(reg_repeats):
            if first_round:
                out[k] = base
                total += base
            else:
                out[k] += 1
                total += 1
            if total >= train_samples:
                break
        first_round = False
    return out


@dataclass(frozen=True)
class SampleLayout:
    """The samples of every epoch: what repeats and regularisation balancing make of the usable images."""

    repeats: dict[int, int]  # entry index -> samples per epoch
    samples: list[list[int]]  # per dataset: the entry index of each sample id
    buckets: list[dict[Bucket, list[int]]]  # per dataset: bucket -> its sample ids, buckets in sorted order


def lay_out_samples(configs: Sequence[DatasetConfig], entries: Sequence[ImageEntry], usable: Iterable[int]) -> SampleLayout:
    """Sample ids and buckets of the `usable` entries (indices into `entries`)."""
    usable = sorted(usable)
    repeats: dict[int, int] = {}
    all_samples, all_buckets = [], []
    for d, ds in enumerate(configs):
        mine = [i for i in usable if entries[i].dataset == d]
        for i in mine:
            repeats[i] = ds.subsets[entries[i].subset].num_repeats
        train_samples = sum(repeats[i] for i in mine if not entries[i].is_reg)
        if train_samples == 0:
            raise DatasetError(f"{ds.where}: no usable training images (only regularisation images, or all "
                               "skipped as unreadable); add a subset with is_reg = false.")
        reg = [i for i in mine if entries[i].is_reg]
        repeats.update(zip(reg, balanced_repeats(train_samples, [repeats[i] for i in reg])))
        samples = [i for i in mine for _ in range(repeats[i])]
        buckets: dict[Bucket, list[int]] = defaultdict(list)
        for sid, i in enumerate(samples):
            buckets[entries[i].choice.bucket].append(sid)
        all_samples.append(samples)
        all_buckets.append(dict(sorted(buckets.items())))
    return SampleLayout(repeats, all_samples, all_buckets)


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of an epoch: samples of one dataset and one bucket."""

    dataset: int
    bucket: Bucket
    sample_ids: list[int]


def plan_epoch(layout: SampleLayout, batch_sizes: Sequence[int], seed: int, epoch: int) -> list[PlannedBatch]:
    """The batches of an epoch in training order: each bucket shuffled and cut into batches of its
    dataset's batch size (the last one may be short), then all batches shuffled together."""
    batches = []
    for d, buckets in enumerate(layout.buckets):
        size = batch_sizes[d]
        for b, (bucket, sids) in enumerate(buckets.items()):
            order = rng(seed, epoch, BUCKET_SHUFFLE, d, b).permutation(len(sids))
            shuffled = [sids[k] for k in order]
            batches += [PlannedBatch(d, bucket, shuffled[k:k + size]) for k in range(0, len(shuffled), size)]
    order = rng(seed, epoch, BATCH_ORDER).permutation(len(batches))
    return [batches[k] for k in order]
