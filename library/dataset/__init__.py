"""The dataset pipeline: image folders and captions in, batches of latents and captions out.

Files:
    config.py      dataset keys (DATASET_JOB_FIELDS), layered value resolution, folder mode → DatasetConfig
    sources.py     finding images, reading sizes and captions, choosing each image's bucket
    buckets.py     the bucket algorithm (pure)
    captions.py    caption files, the base-caption rule, per-step caption processing (pure)
    images.py      decoding any image to clean RGB, resize and crop
    plan.py        per-epoch planning (pure): repeats and reg balancing, buckets, batch order, random draws
    latents.py     pixels of a sample, the loader threads, cached or on-the-fly latents
    cache.py       the latent disk cache (`<image>.latents.safetensors`) and the VAE fingerprint
    describe.py    ss_* metadata parts, the bucket table and the summary (pure)
    dataset.py     TrainDataset: the façade the training loop holds
    validation.py  the held-out validation split
    debug.py       the dry run's printout; `python -m library.dataset --config job.toml` (__main__.py)

How the training loop uses it:

    # relative image_dirs are taken from the working folder, as load_job does
    configs = resolve_datasets(job, dataset_tables, where=str(job_path), base_dir=Path.cwd())
    data = TrainDataset(configs, seed, tokenizer, caption_replacements=..., caption_templates=...)
    print(data.bucket_table())
    held = hold_out(data, fraction)            # optional (validation.py): held-out images leave training
    data.prepare_latents(vae, device, dtype, cache=job_value(job, "cache_latents"),
                         to_disk=job_value(job, "cache_latents_to_disk"),
                         batch_size=job_value(job, "vae_batch_size"))
    # (or by hand: cache_latents(...), or use_vae(...) + check_images() to encode as batches are drawn)
    data.set_max_train_steps(...)              # only needed for a fractional token_warmup_step
    for epoch in range(first_epoch, epochs + 1):          # epochs count from 1, as in sd-scripts
        for batch in data.batches(epoch, start=skip, global_step=step, accumulation_steps=accum):
            ...

Decisions the loop can rely on:
* `batch["latents"]` are float32 CPU tensors [B, 4, H/8, W/8], already multiplied by the VAE's
  `scaling_factor`: the loop adds noise to them directly. They are the mean of the VAE's latent
  distribution (not a sample), cached or not.
* `batch["captions"]` are final: dropout, shuffle, warm-up, prefix/suffix and replacements applied.
  Token warm-up depends on the global step: batch n of `batches(epoch, start, global_step,
  accumulation_steps)` is processed at step `global_step + (n - start) // accumulation_steps`.
  `caption_for(epoch, dataset, sample_id, step)` recomputes one caption for another step.
* `batch["loss_weights"]` [B] float32: 1.0 for training images, prior_loss_weight for reg images;
  `batch["is_reg"]` [B] bool; `batch["image_paths"]` list[str]. Also `bucket` (w, h), `flipped`,
  `epoch`, `index` (batch number within the epoch), `step`, `dataset`, `sample_ids`.
* Determinism: every random choice is a function of (seed, epoch, sample); `batches(epoch)` repeated
  yields identical batches and `batches(epoch, start=k)` equals the tail after k batches.
* `num_batches(epoch)` is the same for every epoch. Call `prepare_latents` first (or `cache_latents`, or
  `check_images` when not caching): images that cannot be decoded are dropped then, which can change
  the count.
* Counts: `num_train_images` = training images × repeats (what sd-scripts reports),
  `num_reg_images` = regularisation image files. `training_metadata()` gives the ss_* strings
  (ss_dataset_dirs, ss_tag_frequency, ss_bucket_info, ss_datasets, ...); DATASET_REVEALING_KEYS
  names those a user may want left out.
* Warnings (missing captions, orphan caption files, skipped images) go to the "pentadactyl.dataset"
  logger and are kept in `data.warnings` / `data.bad_images`; `data.summary()` prints them all.
* The images in use are `data.usable_indices()` (indices into `data.entries`); `data.remove(indices)`
  takes some out (validation's hold_out does) and re-plans. `data.layout` gives each dataset's samples
  and buckets; `subset_of(entry)`, `base_caption(entry)`, `pixels_of(entry)` and `cached_latents(index)`
  answer per image. Nothing outside the package needs an underscore name.

Interpretation of "bucket_reso_steps must suit the latent factor": a multiple of 8 (the VAE's pixels
per latent) is required; a multiple of 64 (latent sides divisible by the U-Net's 2³ downsampling) is
recommended, and other multiples of 8 only warn, as in sd-scripts.
"""

from library.dataset.buckets import BucketChoice, make_bucket_resolutions, select_bucket
from library.dataset.captions import CaptionOptions, process_caption
from library.dataset.config import (
    DATASET_FIELDS,
    DATASET_JOB_FIELDS,
    SUBSET_FIELDS,
    SUBSET_ONLY_FIELDS,
    UNSUPPORTED_DATASET_KEYS,
    DatasetConfig,
    SubsetConfig,
    job_value,
    resolve_datasets,
)
from library.dataset.dataset import DATASET_REVEALING_KEYS, TrainDataset
from library.dataset.debug import debug_dataset

__all__ = [
    "BucketChoice",
    "CaptionOptions",
    "DATASET_FIELDS",
    "DATASET_JOB_FIELDS",
    "DATASET_REVEALING_KEYS",
    "DatasetConfig",
    "SUBSET_FIELDS",
    "SUBSET_ONLY_FIELDS",
    "SubsetConfig",
    "TrainDataset",
    "UNSUPPORTED_DATASET_KEYS",
    "debug_dataset",
    "job_value",
    "make_bucket_resolutions",
    "process_caption",
    "resolve_datasets",
    "select_bucket",
]
