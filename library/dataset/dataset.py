"""The training dataset: samples per epoch, bucket-wise batches, captions per step, latents.

Determinism: every random choice comes from a generator seeded with (seed, epoch, purpose, dataset,
sample or bucket), never from a global RNG. `batches(epoch)` therefore yields the same batches each
time it is called, and `batches(epoch, start=k)` yields exactly the batches after the first k, which is
how a run resumes mid-epoch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.buckets import crop_offset, format_bucket_table
from library.dataset.cache import CacheKey, cache_path, encode_pixels, read_cache, vae_identity, write_cache
from library.dataset.captions import CaptionOptions, fill_template, process_caption, tag_frequency
from library.dataset.config import DatasetConfig, SubsetConfig
from library.dataset.images import BadImageError, color_augment, load_rgb, resize_and_crop, to_tensor
from library.dataset.sources import (
    ImageEntry,
    SubsetReport,
    balance_regularisation,
    bucket_list,
    describe_caption_sources,
    scan_subset,
)
from library.errors import DatasetError
from library.fileio import WRITE_ERRORS, write_error_reason

log = logging.getLogger("pentadactyl.dataset")

# Purposes mixed into the random seeds so that the streams never coincide.
_BUCKET_SHUFFLE, _BATCH_ORDER, _IMAGE_DRAWS, _CAPTION_DRAWS = 1, 2, 3, 4
_HUE_RANGE = 0.02  # color_aug: hue rotated by at most ±2% of the colour circle (about ±7 degrees)

# Metadata keys that reveal the training data; a user can ask for them to be left out of files.
DATASET_REVEALING_KEYS = ("ss_dataset_dirs", "ss_tag_frequency", "ss_datasets", "ss_bucket_info")


@dataclass(frozen=True)
class SampleDraws:
    """The random choices for one sample in one epoch."""

    flip: bool
    crop: tuple[int, int]  # top-left corner of the crop in the resized image
    hue_shift: float  # 0 unless color_aug
    template: int  # index into the caption templates


class TrainDataset:
    """All datasets of a job, ready to batch.

    Arguments:
        configs: from `resolve_datasets`.
        seed: the run's seed; with the epoch it fixes every random choice.
        tokenizer: optional CLIP tokenizer, used only to report captions longer than it reads.
        caption_replacements: applied to every processed caption, e.g. {"<hand>": "<hand> <hand1>"}.
        caption_templates: for images without a caption file in subsets without their own templates,
            e.g. ["a photo of a {}"]; {} becomes the subset's class_tokens, or `template_token`.
        template_token: what {} becomes in subsets without class_tokens (textual inversion's token).
        max_train_steps: needed when a token_warmup_step is a fraction of the run; or call
            `set_max_train_steps` once the loop knows it.
        num_workers: threads that load and resize images.
    """

    def __init__(
        self,
        configs: Sequence[DatasetConfig],
        seed: int,
        tokenizer: Any = None,
        caption_replacements: Mapping[str, str] | None = None,
        caption_templates: Sequence[str] | None = None,
        template_token: str | None = None,
        max_train_steps: int | None = None,
        num_workers: int = 2,
    ) -> None:
        if not configs:
            raise DatasetError("no datasets were configured; add a [[datasets]] table or train_data_dir.")
        self.configs = list(configs)
        self.seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF  # SeedSequence takes non-negative integers
        self.tokenizer = tokenizer
        self.caption_replacements = dict(caption_replacements or {})
        self.caption_templates = tuple(caption_templates) if caption_templates else None
        self.template_token = template_token
        self.max_train_steps = max_train_steps
        self.num_workers = num_workers
        self.warnings: list[str] = []
        self.bad_images: list[str] = []

        self._predefined = [bucket_list(ds) for ds in self.configs]
        self.reports: list[list[SubsetReport]] = []
        self.entries: list[ImageEntry] = []
        for d, ds in enumerate(self.configs):
            self.warnings += list(ds.warnings)
            reports = []
            for s, sub in enumerate(ds.subsets):
                report = scan_subset(ds, sub, d, s, self._predefined[d], bool(sub.caption_templates or self.caption_templates))
                self.entries += report.entries
                self.bad_images += report.bad_images
                self.warnings += report.warnings
                reports.append(report)
            self.reports.append(reports)
        for line in self.warnings:
            log.warning(line)
        for line in self.bad_images:
            log.warning("skipped: %s", line)
        for d, ds in enumerate(self.configs):
            for sub, report in zip(ds.subsets, self.reports[d]):
                log.info(describe_caption_sources(report, sub, bool(self.caption_templates)))

        self._removed: set[int] = set()
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._scaling_factor: float | None = None
        self._vae: tuple[torch.nn.Module, torch.device | str, torch.dtype] | None = None
        self._checked = False
        self._rebuild()

    # ---- structure ------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        """Repeats, samples and buckets from the usable entries (again after bad images are dropped)."""
        self._samples: list[list[int]] = []  # per dataset: entry index of each sample slot
        self._buckets: list[dict[tuple[int, int], list[int]]] = []  # per dataset: bucket -> sample ids
        for d, ds in enumerate(self.configs):
            mine = [i for i, e in enumerate(self.entries) if e.dataset == d and i not in self._removed]
            for i in mine:
                self.entries[i].repeats = ds.subsets[self.entries[i].subset].num_repeats
            train_samples = sum(self.entries[i].repeats for i in mine if not self.entries[i].is_reg)
            reg = [self.entries[i] for i in mine if self.entries[i].is_reg]
            if train_samples == 0:
                raise DatasetError(f"{ds.where}: no usable training images (only regularisation images, or all "
                                   "skipped as unreadable); add a subset with is_reg = false.")
            if reg:
                balance_regularisation(train_samples, reg)
            samples = [i for i in mine for _ in range(self.entries[i].repeats)]
            buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
            for sid, i in enumerate(samples):
                buckets[self.entries[i].choice.bucket].append(sid)
            self._samples.append(samples)
            self._buckets.append(dict(sorted(buckets.items())))
        self._plans: dict[int, list[tuple[int, tuple[int, int], list[int]]]] = {}

    def _rng(self, epoch: int, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, *key])

    def _plan(self, epoch: int) -> list[tuple[int, tuple[int, int], list[int]]]:
        """(dataset, bucket, sample ids) of each batch of an epoch, in training order."""
        if epoch not in self._plans:
            batches = []
            for d, buckets in enumerate(self._buckets):
                size = self.configs[d].batch_size
                for b, (bucket, sids) in enumerate(buckets.items()):
                    order = self._rng(epoch, _BUCKET_SHUFFLE, d, b).permutation(len(sids))
                    shuffled = [sids[k] for k in order]
                    batches += [(d, bucket, shuffled[k:k + size]) for k in range(0, len(shuffled), size)]
            order = self._rng(epoch, _BATCH_ORDER).permutation(len(batches))
            self._plans = {epoch: [batches[k] for k in order]}  # keep one epoch: plans can be large
        return self._plans[epoch]

    # ---- counts and statistics ----------------------------------------------------------------------

    def _live(self) -> list[ImageEntry]:
        return [e for i, e in enumerate(self.entries) if i not in self._removed]

    @property
    def num_train_images(self) -> int:
        """Training samples per epoch: images × repeats (what sd-scripts reports as train images)."""
        return sum(e.repeats for e in self._live() if not e.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularisation image files in use (those that balancing gave at least one repeat)."""
        return sum(1 for e in self._live() if e.is_reg and e.repeats > 0)

    @property
    def num_samples(self) -> int:
        """Samples per epoch, training and regularisation."""
        return sum(len(s) for s in self._samples)

    def num_batches(self, epoch: int = 1) -> int:
        """Batches in an epoch. Call cache_latents (or check_images) first: unreadable images found by
        decoding are dropped then, which can change this count."""
        return len(self._plan(epoch))

    def _subset_of(self, e: ImageEntry) -> SubsetConfig:
        return self.configs[e.dataset].subsets[e.subset]

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """{folder name: {"n_repeats", "img_count"}} for ss_dataset_dirs."""
        out: dict[str, dict[str, int]] = {}
        for d, ds in enumerate(self.configs):
            for s, sub in enumerate(ds.subsets):
                count = sum(1 for e in self._live() if e.dataset == d and e.subset == s)
                name = sub.image_dir.name
                while name in out:  # the same folder name in two places
                    name += "'"
                out[name] = {"n_repeats": sub.num_repeats, "img_count": count}
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder name: {tag: images whose caption has it}} for ss_tag_frequency."""
        out: dict[str, dict[str, int]] = {}
        for d, ds in enumerate(self.configs):
            for s, sub in enumerate(ds.subsets):
                caps = [e.caption if e.caption is not None else (sub.class_tokens or "")
                        for e in self._live() if e.dataset == d and e.subset == s]
                merged = out.setdefault(sub.image_dir.name, {})  # one folder in two datasets: counts add up
                for tag, n in tag_frequency(caps, sub.caption.separator).items():
                    merged[tag] = merged.get(tag, 0) + n
        return out

    def bucket_info(self) -> dict[str, Any]:
        """{"buckets": {i: {"resolution": [w, h], "count": samples}}, "mean_img_ar_error": x}."""
        info: dict[str, Any] = {"buckets": {}}
        i = 0
        for buckets in self._buckets:
            for (w, h), sids in buckets.items():
                info["buckets"][i] = {"resolution": [w, h], "count": len(sids)}
                i += 1
        live = self._live()
        info["mean_img_ar_error"] = float(np.mean([abs(e.choice.ar_error) for e in live])) if live else 0.0
        return info

    def training_metadata(self) -> dict[str, str]:
        """ss_* metadata values (JSON strings) describing the data; see DATASET_REVEALING_KEYS."""
        import json

        datasets = []
        for d, ds in enumerate(self.configs):
            datasets.append({
                "resolution": list(ds.resolution), "batch_size": ds.batch_size, "enable_bucket": ds.enable_bucket,
                "min_bucket_reso": ds.min_bucket_reso, "max_bucket_reso": ds.max_bucket_reso,
                "bucket_reso_steps": ds.bucket_reso_steps, "bucket_no_upscale": ds.bucket_no_upscale,
                "subsets": [{"image_dir": s.image_dir.name, "num_repeats": s.num_repeats, "is_reg": s.is_reg,
                             "class_tokens": s.class_tokens, "shuffle_caption": s.caption.shuffle,
                             "keep_tokens": s.caption.keep_tokens, "flip_aug": s.flip_aug} for s in ds.subsets],
            })
        return {
            "ss_num_train_images": str(self.num_train_images),
            "ss_num_reg_images": str(self.num_reg_images),
            "ss_num_batches_per_epoch": str(self.num_batches()),
            "ss_dataset_dirs": json.dumps(self.dataset_dirs()),
            "ss_tag_frequency": json.dumps(self.tag_frequency()),
            "ss_bucket_info": json.dumps(self.bucket_info()),
            "ss_datasets": json.dumps(datasets),
        }

    def bucket_table(self) -> str:
        """Printable: each bucket's resolution, images and samples per epoch."""
        rows = []
        for d, buckets in enumerate(self._buckets):
            for bucket, sids in buckets.items():
                images = len({self._samples[d][sid] for sid in sids})
                rows.append((f"#{d + 1}", bucket, images, len(sids)))
        return format_bucket_table(rows)

    def summary(self) -> str:
        """Printable: datasets, subsets, counts, caption sources, skipped files."""
        lines = []
        for d, ds in enumerate(self.configs):
            mode = ("buckets off" if not ds.enable_bucket else
                    f"buckets {ds.min_bucket_reso}-{ds.max_bucket_reso} step {ds.bucket_reso_steps}"
                    + (", no upscale" if ds.bucket_no_upscale else ""))
            lines.append(f"dataset #{d + 1}: resolution {ds.resolution[0]}×{ds.resolution[1]}, batch size "
                         f"{ds.batch_size}, {mode}, {len(self._samples[d])} samples/epoch")
            for s, (sub, report) in enumerate(zip(ds.subsets, self.reports[d])):
                live = [e for e in self._live() if e.dataset == d and e.subset == s]
                repeats = sorted({e.repeats for e in live})
                rep = str(repeats[0]) if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]} (balanced)"
                kind = "regularisation" if sub.is_reg else "training"
                lines.append(f"  {sub.image_dir}: {len(live)} {kind} images × {rep} repeats"
                             + (f", class_tokens '{sub.class_tokens}'" if sub.class_tokens else ""))
                lines.append("    " + describe_caption_sources(report, sub, bool(self.caption_templates)).split(": ", 1)[1])
                opts = [k for k in ("flip_aug", "color_aug", "random_crop") if getattr(sub, k)]
                if sub.caption.shuffle:
                    opts.append(f"shuffle_caption (keep_tokens {sub.caption.keep_tokens})")
                if opts:
                    lines.append("    options: " + ", ".join(opts))
        lines.append(f"total: {self.num_train_images} training samples, {self.num_reg_images} regularisation images, "
                     f"{self.num_batches()} batches per epoch")
        if self.bad_images:
            lines.append(f"skipped {len(self.bad_images)} unreadable image(s):")
            lines += [f"  {m}" for m in self.bad_images]
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  {m}" for m in self.warnings]
        return "\n".join(lines)

    # ---- random choices and captions ------------------------------------------------------------

    def set_max_train_steps(self, steps: int) -> None:
        self.max_train_steps = steps

    def _caption_options(self, sub: SubsetConfig) -> CaptionOptions:
        if 0 < sub.token_warmup_step < 1:
            if self.max_train_steps is None:
                raise DatasetError(f"{sub.where}: token_warmup_step = {sub.token_warmup_step} is a fraction of the run, "
                                   "but the run length is unknown; give it in steps (1 or more).")
            return replace(sub.caption, token_warmup_step=int(sub.token_warmup_step * self.max_train_steps))
        return sub.caption

    def _draws(self, epoch: int, d: int, sid: int) -> SampleDraws:
        e = self.entries[self._samples[d][sid]]
        sub = self._subset_of(e)
        r = self._rng(epoch, _IMAGE_DRAWS, d, sid).random(5)  # always five draws: options stay independent
        crop = crop_offset(e.choice.resized, e.choice.bucket, (r[1], r[2]) if sub.random_crop else None)
        templates = sub.caption_templates or self.caption_templates or ()
        return SampleDraws(
            flip=sub.flip_aug and r[0] < 0.5,
            crop=crop,
            hue_shift=(r[3] * 2 - 1) * _HUE_RANGE if sub.color_aug else 0.0,
            template=int(r[4] * len(templates)) if templates else 0,
        )

    def caption_for(self, epoch: int, d: int, sid: int, step: int, draws: SampleDraws | None = None) -> str:
        """The processed caption of sample `sid` of dataset `d` at this epoch and global step."""
        e = self.entries[self._samples[d][sid]]
        sub = self._subset_of(e)
        draws = draws or self._draws(epoch, d, sid)
        base = e.caption
        if base is None:
            templates = sub.caption_templates or self.caption_templates
            token = sub.class_tokens if sub.class_tokens is not None else (self.template_token or "")
            base = fill_template(templates[draws.template], token) if templates else (sub.class_tokens or "")
        return process_caption(base, self._caption_options(sub), self._rng(epoch, _CAPTION_DRAWS, d, sid),
                               epoch=epoch, step=step, replacements=self.caption_replacements)

    def full_captions(self) -> Iterator[tuple[Path, str]]:
        """(image path, caption) for every usable image and each of its templates, with every tag kept: the
        longest text each sample can be trained with (what a caption-length check needs)."""
        for i, e in enumerate(self.entries):
            if i in self._removed:
                continue
            sub = self._subset_of(e)
            if e.caption is not None:
                bases = [e.caption]
            else:
                templates = sub.caption_templates or self.caption_templates
                token = sub.class_tokens if sub.class_tokens is not None else (self.template_token or "")
                bases = [fill_template(t, token) for t in templates] if templates else [sub.class_tokens or ""]
            whole = replace(sub.caption, dropout_rate=0.0, tag_dropout_rate=0.0, dropout_every_n_epochs=0,
                            token_warmup_step=0, shuffle=False)
            for base in bases:
                yield e.path, process_caption(base, whole, self._rng(1, _CAPTION_DRAWS), epoch=1,
                                              replacements=self.caption_replacements)

    # ---- pixels and latents ---------------------------------------------------------------------

    def _pixels(self, e: ImageEntry, draws: SampleDraws, also_flipped: bool = False) -> list[torch.Tensor]:
        """The sample's crop as [3, H, W] in [-1, 1] (and its mirror image when asked)."""
        ds = self.configs[e.dataset]
        img = load_rgb(e.path, ds.max_image_pixels, min_size=e.choice.resized)
        img = resize_and_crop(img, e.choice.resized, e.choice.bucket, draws.crop)
        if draws.hue_shift:
            img = color_augment(img, draws.hue_shift)
        out = [to_tensor(img, draws.flip)]
        if also_flipped:
            out.append(to_tensor(img, not draws.flip))
        return out

    def _executor(self) -> ThreadPoolExecutor | None:
        return ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 else None

    @staticmethod
    def _submit(jobs: list, pool: ThreadPoolExecutor | None) -> list:
        """Start `jobs` (callables) on the pool, or run them here without one. Gather with `_gather`."""
        def safe(job):
            try:
                return job()
            except BadImageError as exc:  # reported per file by the caller, not raised from a thread
                return exc
        if pool is None:
            return [safe(j) for j in jobs]
        return [pool.submit(safe, j) for j in jobs]

    @staticmethod
    def _gather(started: list) -> list:
        return [f.result() if isinstance(f, Future) else f for f in started]

    def _drop_bad(self, bad: list[tuple[int, str]]) -> None:
        if not bad:
            return
        strict = any(not self.configs[self.entries[i].dataset].skip_bad_images for i, _ in bad)
        if strict:
            raise DatasetError(f"{bad[0][1]} (skip_bad_images = false; set it to true to skip such files).")
        for i, msg in bad:
            log.warning("skipped: %s", msg)
            self.bad_images.append(msg)
            self._removed.add(i)
        self._rebuild()

    def check_images(self) -> None:
        """Decode every image once so that unreadable ones are dropped before the first epoch is planned
        (cache_latents does this as it goes; training without a cache needs it separately)."""
        if self._checked:
            return
        todo = [i for i in range(len(self.entries)) if i not in self._removed and i not in self._latents]
        bad = []
        pool = self._executor()
        try:
            with tqdm(total=len(todo), desc="checking images", unit="img", disable=not todo) as bar:
                for start in range(0, len(todo), 16):
                    chunk = todo[start:start + 16]
                    jobs = [lambda e=self.entries[i]: load_rgb(e.path, self.configs[e.dataset].max_image_pixels,
                                                               min_size=e.choice.resized).size for i in chunk]
                    for i, res in zip(chunk, self._gather(self._submit(jobs, pool))):
                        if isinstance(res, BadImageError):
                            bad.append((i, str(res)))
                    bar.update(len(chunk))
        finally:
            if pool:
                pool.shutdown()
        self._drop_bad(bad)
        self._checked = True

    def use_vae(self, vae: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
        """The VAE that encodes images not in the latent cache while batching."""
        self._check_vae_grid(vae)
        self._vae = (vae, device, dtype)
        self._scaling_factor = float(vae.config.scaling_factor)

    def _check_vae_grid(self, vae: torch.nn.Module) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        for buckets in self._buckets:
            for w, h in buckets:
                if w % factor or h % factor:
                    raise DatasetError(f"bucket {w}×{h} is not a multiple of the VAE's {factor} pixels per latent; "
                                       f"use a bucket_reso_steps that is a multiple of {factor}.")

    def cache_latents(self, vae: torch.nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32,
                      to_disk: bool = False, batch_size: int = 1) -> None:
        """Encode every image once (centre or fixed crop, and its mirror image with flip_aug).

        With `to_disk`, a matching `<image>.latents.safetensors` beside each image is read instead of
        encoding, and a missing or stale one is (re)written. Refused when color_aug or random_crop is on,
        since their pixels change every epoch.
        """
        for ds in self.configs:
            for sub in ds.subsets:
                for key in ("color_aug", "random_crop"):
                    if getattr(sub, key):
                        raise DatasetError(f"{sub.where}: cannot cache latents with {key} = true (the pixels change "
                                           f"every epoch); set cache_latents = false or {key} = false.")
        self.use_vae(vae, device, dtype)
        identity = vae_identity(vae) if to_disk else ""
        todo: dict[tuple[int, int], list[tuple[int, CacheKey]]] = defaultdict(list)
        hits = 0
        for i, e in enumerate(self.entries):
            if i in self._removed or i in self._latents:
                continue
            flip = self._subset_of(e).flip_aug
            key = CacheKey(e.file_size, e.mtime_ns, e.choice.bucket, e.choice.resized,
                           crop_offset(e.choice.resized, e.choice.bucket, None), flip, identity)
            if to_disk:
                got = read_cache(cache_path(e.path), key)
                if got is not None:
                    self._latents[i] = got
                    hits += 1
                    continue
            todo[e.choice.bucket].append((i, key))
        chunks = [items[k:k + batch_size] for items in todo.values() for k in range(0, len(items), batch_size)]
        total = sum(len(c) for c in chunks)
        bad: list[tuple[int, str]] = []
        pool = self._executor()
        try:
            started = self._load_chunk(chunks[0], pool) if chunks else []
            with tqdm(total=total, desc="caching latents", unit="img", disable=total == 0) as bar:
                for n, chunk in enumerate(chunks):
                    pixels = self._gather(started)
                    # the threads load the next chunk while the VAE encodes this one
                    started = self._load_chunk(chunks[n + 1], pool) if n + 1 < len(chunks) else []
                    self._encode_chunk(chunk, pixels, to_disk, bad)
                    bar.update(len(chunk))
        finally:
            if pool:
                pool.shutdown()
        log.info("latents: %d encoded, %d read from the disk cache", total - len(bad), hits)
        self._checked = True
        self._drop_bad(bad)

    def _load_chunk(self, chunk: list[tuple[int, CacheKey]], pool: ThreadPoolExecutor | None) -> list:
        centred = SampleDraws(False, (0, 0), 0.0, 0)
        jobs = [lambda i=i, key=key: self._pixels(self.entries[i], replace(centred, crop=key.crop), also_flipped=key.flipped)
                for i, key in chunk]
        return self._submit(jobs, pool)

    def _encode_chunk(self, chunk: list[tuple[int, CacheKey]], pixels: list, to_disk: bool, bad: list) -> None:
        good = [(i, key, px) for (i, key), px in zip(chunk, pixels) if not isinstance(px, BadImageError)]
        bad += [(i, str(px)) for (i, _), px in zip(chunk, pixels) if isinstance(px, BadImageError)]
        if not good:
            return
        stacked = torch.stack([t for _, _, px in good for t in px])
        vae, device, dtype = self._vae
        latents = encode_pixels(vae, stacked, device, dtype)
        k = 0
        for i, key, px in good:
            lat = latents[k]
            flipped = latents[k + 1] if key.flipped else None
            k += len(px)
            if not torch.isfinite(lat).all() or (flipped is not None and not torch.isfinite(flipped).all()):
                raise DatasetError(f"{self.entries[i].path}: the VAE returned NaN/inf latents for this image. This is "
                                   "usually the SD1.x VAE overflowing in half precision: encode in float32 "
                                   "(no_half_vae / a float32 VAE) or use a VAE fixed for fp16.")
            self._latents[i] = (lat, flipped)
            if to_disk:
                try:
                    write_cache(cache_path(self.entries[i].path), key, lat, flipped)
                except WRITE_ERRORS as exc:
                    raise DatasetError(f"{cache_path(self.entries[i].path)}: cannot write the latent cache "
                                       f"({write_error_reason(exc)}); "
                                       "make the image folder writable or set cache_latents_to_disk = false.") from None

    # ---- batches --------------------------------------------------------------------------------

    def _all_cached(self) -> bool:
        return all(i in self._latents for i in range(len(self.entries)) if i not in self._removed)

    def batch_plan(self, epoch: int, start: int = 0, global_step: int = 0, accumulation_steps: int = 1) -> Iterator[dict]:
        """Like `batches` without pixels or latents: what each batch holds (for dry runs and tests)."""
        plan = self._plan(epoch)
        for n in range(start, len(plan)):
            d, bucket, sids = plan[n]
            step = global_step + (n - start) // accumulation_steps
            draws = [self._draws(epoch, d, sid) for sid in sids]
            entries = [self.entries[self._samples[d][sid]] for sid in sids]
            weight = self.configs[d].prior_loss_weight
            yield {
                "epoch": epoch,
                "index": n,
                "step": step,
                "dataset": d,
                "bucket": bucket,
                "sample_ids": list(sids),
                "image_paths": [str(e.path) for e in entries],
                "captions": [self.caption_for(epoch, d, sid, step, dr) for sid, dr in zip(sids, draws)],
                "flipped": [dr.flip for dr in draws],
                "loss_weights": torch.tensor([weight if e.is_reg else 1.0 for e in entries], dtype=torch.float32),
                "is_reg": torch.tensor([e.is_reg for e in entries], dtype=torch.bool),
                "_draws": draws,
                "_entries": [self._samples[d][sid] for sid in sids],
            }

    def batches(self, epoch: int, start: int = 0, global_step: int = 0, accumulation_steps: int = 1) -> Iterator[dict]:
        """The batches of `epoch`, from batch number `start` on (to resume mid-epoch).

        Token warm-up needs the global step of each batch: batch n gets
        `global_step + (n - start) // accumulation_steps`, so pass the step the loop is at when batch
        `start` is drawn. Each batch dict holds:
            latents       float32 [B, 4, H/8, W/8] on the CPU, already × the VAE's scaling_factor
            captions      list[str], processed for this epoch and step
            loss_weights  float32 [B]: 1.0, or prior_loss_weight for regularisation images
            is_reg        bool [B]
            image_paths   list[str]
            bucket        (width, height); flipped list[bool]; epoch, index, step, dataset, sample_ids
        """
        if not self._all_cached():
            if self._vae is None:
                raise RuntimeError("TrainDataset.batches: call cache_latents(...) or use_vae(...) first.")
            self.check_images()
        pool = self._executor() if not self._all_cached() else None
        try:
            metas = self.batch_plan(epoch, start, global_step, accumulation_steps)
            meta = next(metas, None)
            started = self._load_uncached(meta, pool) if meta is not None else []
            while meta is not None:
                pixels = self._gather(started)
                nxt = next(metas, None)
                # the threads load the next batch's images while this one trains
                started = self._load_uncached(nxt, pool) if nxt is not None else []
                yield self._finish(meta, self._latents_for(meta, pixels))
                meta = nxt
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)

    def _load_uncached(self, meta: dict, pool: ThreadPoolExecutor | None) -> list:
        jobs = [(lambda: None) if i in self._latents else (lambda e=self.entries[i], dr=dr: self._pixels(e, dr)[0])
                for i, dr in zip(meta["_entries"], meta["_draws"])]
        return self._submit(jobs, pool)

    def _latents_for(self, meta: dict, pixels: list) -> torch.Tensor:
        for px in pixels:
            if isinstance(px, BadImageError):  # readable when checked, unreadable now: changed during the run
                raise DatasetError(f"{px} (it could be read when the run started).")
        missing = [k for k, px in enumerate(pixels) if px is not None]
        out: list[torch.Tensor | None] = [None] * len(pixels)
        if missing:
            vae, device, dtype = self._vae
            encoded = encode_pixels(vae, torch.stack([pixels[k] for k in missing]), device, dtype)
            for k, lat in zip(missing, encoded):
                if not torch.isfinite(lat).all():
                    raise DatasetError(f"{meta['image_paths'][k]}: the VAE returned NaN/inf latents; encode in float32.")
                out[k] = lat
        for k, (i, dr) in enumerate(zip(meta["_entries"], meta["_draws"])):
            if out[k] is None:
                lat, flipped = self._latents[i]
                out[k] = flipped if dr.flip else lat
        return torch.stack(out) * self._scaling_factor

    @staticmethod
    def _finish(meta: dict, latents: torch.Tensor) -> dict:
        batch = {k: v for k, v in meta.items() if not k.startswith("_")}
        batch["latents"] = latents
        return batch
