"""TrainDataset: the façade that wires scanning (sources.py), epoch planning (plan.py), latents
(latents.py) and descriptions (describe.py) into one object the training loop holds.

Determinism: every random choice comes from plan.py's generators seeded with (seed, epoch, purpose,
dataset, sample or bucket), never from a global RNG. `batches(epoch)` therefore yields the same batches
each time it is called, and `batches(epoch, start=k)` yields exactly the batches after the first k,
which is how a run resumes mid-epoch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from library.dataset import describe
from library.dataset.captions import (
    CaptionOptions, base_caption, base_captions, longest_wildcard_texts, process_caption,
)
from library.dataset.config import DatasetConfig, SubsetConfig
from library.dataset.latents import Latents, LatentStore
from library.dataset.plan import (  # SampleDraws is also imported from here (bench/bench_dataset.py)
    PlannedBatch,
    SampleDraws,
    SampleLayout,
    caption_rng,
    centred_draws,
    draw_sample,
    lay_out_samples,
    plan_epoch,
)
from library.dataset.sources import ImageEntry, SubsetReport, bucket_list, describe_caption_sources, scan_subset
from library.errors import DatasetError

log = logging.getLogger("pentadactyl.dataset")

def _longest(text: str | None) -> str | None:
    """A one-line text with each wildcard at its longest option."""
    return longest_wildcard_texts(text)[0] if text else text


# Metadata keys that reveal the training data; a user can ask for them to be left out of files.
DATASET_REVEALING_KEYS = ("ss_dataset_dirs", "ss_tag_frequency", "ss_datasets", "ss_bucket_info")


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

        self.reports: list[list[SubsetReport]] = []
        self.entries: list[ImageEntry] = []
        for d, ds in enumerate(self.configs):
            self.warnings += list(ds.warnings)
            predefined = bucket_list(ds)
            reports = []
            for s, sub in enumerate(ds.subsets):
                report = scan_subset(ds, sub, d, s, predefined, bool(self._templates(sub)))
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
        self._store = LatentStore(self.configs, self.entries)
        self._checked = False
        self._rebuild()

    # ---- which images are in use --------------------------------------------------------------------

    def usable_indices(self) -> list[int]:
        """Indices into `entries` of the images trained on: not skipped as unreadable, not held out."""
        return [i for i in range(len(self.entries)) if i not in self._removed]

    def remove(self, indices: Iterable[int]) -> None:
        """Take entries out of training (held out for validation, or unreadable); the samples, their
        repeats (regularisation balancing), the buckets and the batch plans follow."""
        self._removed.update(indices)
        self._rebuild()

    def subset_of(self, entry: ImageEntry) -> SubsetConfig:
        return self.configs[entry.dataset].subsets[entry.subset]

    @property
    def layout(self) -> SampleLayout:
        """The samples of every epoch: per dataset, the entry index of each sample id and the sample ids
        of each bucket."""
        return self._layout

    def _rebuild(self) -> None:
        layout = lay_out_samples(self.configs, self.entries, self.usable_indices())
        for i, repeats in layout.repeats.items():
            self.entries[i].repeats = repeats
        self._layout = layout
        self._plans: dict[int, list[PlannedBatch]] = {}

    def _plan(self, epoch: int) -> list[PlannedBatch]:
        if epoch not in self._plans:
            batch_sizes = [ds.batch_size for ds in self.configs]
            self._plans = {epoch: plan_epoch(self._layout, batch_sizes, self.seed, epoch)}  # one epoch: plans can be large
        return self._plans[epoch]

    def _live(self) -> list[ImageEntry]:
        return [self.entries[i] for i in self.usable_indices()]

    # ---- counts and descriptions --------------------------------------------------------------------

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
        return sum(len(s) for s in self._layout.samples)

    def num_batches(self, epoch: int = 1) -> int:
        """Batches in an epoch. Call cache_latents (or check_images) first: unreadable images found by
        decoding are dropped then, which can change this count."""
        return len(self._plan(epoch))

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """{folder name: {"n_repeats", "img_count"}} for ss_dataset_dirs."""
        return describe.dataset_dirs(self.configs, self._live())

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder name: {tag: images whose caption has it}} for ss_tag_frequency."""
        return describe.folder_tag_frequency(self.configs, self._live())

    def bucket_info(self) -> dict[str, Any]:
        """{"buckets": {i: {"resolution": [w, h], "count": samples}}, "mean_img_ar_error": x}."""
        return describe.bucket_info(self._layout, self._live())

    def training_metadata(self) -> dict[str, str]:
        """ss_* metadata values (JSON strings) describing the data; see DATASET_REVEALING_KEYS."""
        return {
            "ss_num_train_images": str(self.num_train_images),
            "ss_num_reg_images": str(self.num_reg_images),
            "ss_num_batches_per_epoch": str(self.num_batches()),
            "ss_dataset_dirs": json.dumps(self.dataset_dirs()),
            "ss_tag_frequency": json.dumps(self.tag_frequency()),
            "ss_bucket_info": json.dumps(self.bucket_info()),
            "ss_datasets": json.dumps(describe.datasets_metadata(self.configs)),
        }

    def bucket_table(self) -> str:
        """Printable: each bucket's resolution, images and samples per epoch."""
        return describe.bucket_table(self._layout)

    def summary(self) -> str:
        """Printable: datasets, subsets, counts, caption sources, skipped files."""
        totals = (f"total: {self.num_train_images} training samples, {self.num_reg_images} regularisation images, "
                  f"{self.num_batches()} batches per epoch")
        return describe.summary(self.configs, self.reports, self._live(), self._layout,
                                run_templates=bool(self.caption_templates), totals=totals,
                                bad_images=self.bad_images, warnings=self.warnings)

    # ---- random choices and captions ------------------------------------------------------------

    def set_max_train_steps(self, steps: int) -> None:
        self.max_train_steps = steps

    def _templates(self, sub: SubsetConfig) -> Sequence[str] | None:
        """The caption templates of a subset's uncaptioned images: its own, else the run's."""
        return sub.caption_templates or self.caption_templates

    def base_caption(self, entry: ImageEntry, template: int = 0) -> str:
        """The image's text before per-step processing: its caption file's, else a template or class_tokens
        (captions.base_caption)."""
        sub = self.subset_of(entry)
        return base_caption(entry.caption, sub.class_tokens, self._templates(sub), self.template_token, template)

    def _caption_options(self, sub: SubsetConfig) -> CaptionOptions:
        if 0 < sub.token_warmup_step < 1:
            if self.max_train_steps is None:
                raise DatasetError(f"{sub.where}: token_warmup_step = {sub.token_warmup_step} is a fraction of the run, "
                                   "but the run length is unknown; give it in steps (1 or more).")
            return replace(sub.caption, token_warmup_step=int(sub.token_warmup_step * self.max_train_steps))
        return sub.caption

    def _draws(self, epoch: int, d: int, sid: int) -> SampleDraws:
        e = self.entries[self._layout.samples[d][sid]]
        sub = self.subset_of(e)
        return draw_sample(self.seed, epoch, d, sid, e.choice, sub, len(self._templates(sub) or ()))

    def caption_for(self, epoch: int, d: int, sid: int, step: int, draws: SampleDraws | None = None) -> str:
        """The processed caption of sample `sid` of dataset `d` at this epoch and global step."""
        e = self.entries[self._layout.samples[d][sid]]
        sub = self.subset_of(e)
        draws = draws or self._draws(epoch, d, sid)
        return process_caption(self.base_caption(e, draws.template), self._caption_options(sub),
                               caption_rng(self.seed, epoch, d, sid), epoch=epoch, step=step,
                               replacements=self.caption_replacements)

    def full_captions(self) -> Iterator[tuple[Path, str]]:
        """(image path, caption) for every usable image and each of its templates, with every tag kept: the
        longest text each sample can be trained with (what a caption-length check needs). With enable_wildcard,
        each line of the caption with every wildcard at its longest option (the prefix's and suffix's too)."""
        for e in self._live():
            sub = self.subset_of(e)
            whole = replace(sub.caption, dropout_rate=0.0, tag_dropout_rate=0.0, dropout_every_n_epochs=0,
                            token_warmup_step=0, shuffle=False, wildcard=False)
            if sub.caption.wildcard:
                whole = replace(whole, prefix=_longest(whole.prefix), suffix=_longest(whole.suffix))
            for base in base_captions(e.caption, sub.class_tokens, self._templates(sub), self.template_token):
                for text in longest_wildcard_texts(base) if sub.caption.wildcard else [base]:
                    yield e.path, process_caption(text, whole, caption_rng(self.seed, 1), epoch=1,
                                                  replacements=self.caption_replacements)

    # ---- pixels and latents ---------------------------------------------------------------------

    def pixels_of(self, entry: ImageEntry, draws: SampleDraws | None = None) -> torch.Tensor:
        """The image as the VAE gets it: [3, H, W] in [-1, 1], cropped to its bucket (centred unless
        `draws` say otherwise, e.g. a sample's draws of an epoch)."""
        return self._store.pixels(entry, draws or centred_draws(entry.choice))[0]

    def cached_latents(self, index: int) -> Latents | None:
        """(latent, mirrored latent or None) of entry `index`, unscaled; None when not cached."""
        return self._store.cached.get(index)

    def _drop_bad(self, bad: list[tuple[int, str]]) -> None:
        if not bad:
            return
        strict = any(not self.configs[self.entries[i].dataset].skip_bad_images for i, _ in bad)
        if strict:
            raise DatasetError(f"{bad[0][1]} (skip_bad_images = false; set it to true to skip such files).")
        for i, msg in bad:
            log.warning("skipped: %s", msg)
            self.bad_images.append(msg)
        self.remove(i for i, _ in bad)

    def check_images(self) -> None:
        """Decode every image once so that unreadable ones are dropped before the first epoch is planned
        (cache_latents does this as it goes; training without a cache needs it separately)."""
        if self._checked:
            return
        todo = [i for i in self.usable_indices() if i not in self._store.cached]
        self._drop_bad(self._store.unreadable(todo, self.num_workers))
        self._checked = True

    def use_vae(self, vae: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
        """The VAE that encodes images not in the latent cache while batching."""
        self._store.use_vae(vae, device, dtype, [b for buckets in self._layout.buckets for b in buckets])

    def forget_vae(self) -> None:
        """Drop the reference to the VAE once every latent is cached (so that its memory can be freed)."""
        if not self._all_cached():
            raise RuntimeError("TrainDataset.forget_vae: some latents are not cached; they still need the VAE")
        self._store.encoder = None

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
        bad = self._store.cache(self.usable_indices(), to_disk, batch_size, self.num_workers)
        self._checked = True
        self._drop_bad(bad)

    def prepare_latents(self, vae: torch.nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32, *,
                        cache: bool, to_disk: bool = False, batch_size: int = 1) -> bool:
        """Where the latents come from, decided once: with `cache` or `to_disk` (which implies caching)
        every image is encoded now (`cache_latents`); otherwise each batch is encoded as it is drawn
        (`use_vae`), and the images are decoded once now so that unreadable ones are dropped before the
        first epoch is planned. True when cached: batches then no longer need the VAE."""
        if cache or to_disk:
            self.cache_latents(vae, device, dtype, to_disk=to_disk, batch_size=batch_size)
            return True
        self.use_vae(vae, device, dtype)
        self.check_images()
        return False

    # ---- batches --------------------------------------------------------------------------------

    def _all_cached(self) -> bool:
        return all(i in self._store.cached for i in self.usable_indices())

    def batch_plan(self, epoch: int, start: int = 0, global_step: int = 0, accumulation_steps: int = 1) -> Iterator[dict]:
        """Like `batches` without latents: what each batch holds (for dry runs and tests). The "_draws"
        and "_entries" keys (random choices, entry indices) are for `batches`; it drops them."""
        plan = self._plan(epoch)
        for n in range(start, len(plan)):
            d, bucket, sids = plan[n].dataset, plan[n].bucket, plan[n].sample_ids
            step = global_step + (n - start) // accumulation_steps
            draws = [self._draws(epoch, d, sid) for sid in sids]
            indices = [self._layout.samples[d][sid] for sid in sids]
            entries = [self.entries[i] for i in indices]
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
                "_entries": indices,
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
            if self._store.encoder is None:
                raise RuntimeError("TrainDataset.batches: call cache_latents(...) or use_vae(...) first.")
            self.check_images()
        workers = 0 if self._all_cached() else self.num_workers  # cached latents need no loader threads
        yield from self._store.attach(self.batch_plan(epoch, start, global_step, accumulation_steps), workers)
