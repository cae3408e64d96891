"""What a dataset holds, in words and numbers: the ss_* metadata parts, the bucket table, the summary.

Pure: functions of the configs, the scan reports, the entries in use and the sample layout.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from library.dataset.buckets import format_bucket_table
from library.dataset.captions import tag_frequency
from library.dataset.config import DatasetConfig
from library.dataset.plan import SampleLayout
from library.dataset.sources import ImageEntry, SubsetReport, describe_caption_sources


def _of_subset(live: Sequence[ImageEntry], d: int, s: int) -> list[ImageEntry]:
    return [e for e in live if e.dataset == d and e.subset == s]


def dataset_dirs(configs: Sequence[DatasetConfig], live: Sequence[ImageEntry]) -> dict[str, dict[str, int]]:
    """{folder name: {"n_repeats", "img_count"}} for ss_dataset_dirs."""
    out: dict[str, dict[str, int]] = {}
    for d, ds in enumerate(configs):
        for s, sub in enumerate(ds.subsets):
            name = sub.image_dir.name
            while name in out:  # the same folder name in two places
                name += "'"
            out[name] = {"n_repeats": sub.num_repeats, "img_count": len(_of_subset(live, d, s))}
    return out


def folder_tag_frequency(configs: Sequence[DatasetConfig], live: Sequence[ImageEntry]) -> dict[str, dict[str, int]]:
    """{folder name: {tag: images whose caption has it}} for ss_tag_frequency.

    An image without a caption file counts its subset's class_tokens, templates or not (as sd-scripts).
    """
    out: dict[str, dict[str, int]] = {}
    for d, ds in enumerate(configs):
        for s, sub in enumerate(ds.subsets):
            caps = [e.caption if e.caption is not None else (sub.class_tokens or "") for e in _of_subset(live, d, s)]
            merged = out.setdefault(sub.image_dir.name, {})  # one folder in two datasets: counts add up
            also = (sub.caption.keep_tokens_separator, sub.caption.secondary_separator)
            for tag, n in tag_frequency(caps, sub.caption.separator, also).items():
                merged[tag] = merged.get(tag, 0) + n
    return out


def bucket_info(layout: SampleLayout, live: Sequence[ImageEntry]) -> dict[str, Any]:
    """{"buckets": {i: {"resolution": [w, h], "count": samples}}, "mean_img_ar_error": x}."""
    info: dict[str, Any] = {"buckets": {}}
    i = 0
    for buckets in layout.buckets:
        for (w, h), sids in buckets.items():
            info["buckets"][i] = {"resolution": [w, h], "count": len(sids)}
            i += 1
    info["mean_img_ar_error"] = float(np.mean([abs(e.choice.ar_error) for e in live])) if live else 0.0
    return info


def datasets_metadata(configs: Sequence[DatasetConfig]) -> list[dict[str, Any]]:
    """The settings of each dataset and subset, for ss_datasets."""
    return [{
        "resolution": list(ds.resolution), "batch_size": ds.batch_size, "enable_bucket": ds.enable_bucket,
        "min_bucket_reso": ds.min_bucket_reso, "max_bucket_reso": ds.max_bucket_reso,
        "bucket_reso_steps": ds.bucket_reso_steps, "bucket_no_upscale": ds.bucket_no_upscale,
        "subsets": [{"image_dir": s.image_dir.name, "num_repeats": s.num_repeats, "is_reg": s.is_reg,
                     "class_tokens": s.class_tokens, "shuffle_caption": s.caption.shuffle,
                     "keep_tokens": s.caption.keep_tokens,
                     "keep_tokens_separator": s.caption.keep_tokens_separator or "",  # sd-scripts' names and defaults
                     "secondary_separator": s.caption.secondary_separator, "enable_wildcard": s.caption.wildcard,
                     "flip_aug": s.flip_aug} for s in ds.subsets],
    } for ds in configs]


def bucket_table(layout: SampleLayout) -> str:
    """Printable: each bucket's resolution, images and samples per epoch."""
    rows = []
    for d, buckets in enumerate(layout.buckets):
        for bucket, sids in buckets.items():
            images = len({layout.samples[d][sid] for sid in sids})
            rows.append((f"#{d + 1}", bucket, images, len(sids)))
    return format_bucket_table(rows)


def summary(configs: Sequence[DatasetConfig], reports: Sequence[Sequence[SubsetReport]], live: Sequence[ImageEntry],
            layout: SampleLayout, *, run_templates: bool, totals: str, bad_images: Sequence[str],
            warnings: Sequence[str]) -> str:
    """Printable: datasets, subsets, counts, caption sources, the `totals` line, skipped files, warnings."""
    lines = []
    for d, ds in enumerate(configs):
        mode = ("buckets off" if not ds.enable_bucket else
                f"buckets {ds.min_bucket_reso}-{ds.max_bucket_reso} step {ds.bucket_reso_steps}"
                + (", no upscale" if ds.bucket_no_upscale else ""))
        lines.append(f"dataset #{d + 1}: resolution {ds.resolution[0]}×{ds.resolution[1]}, batch size "
                     f"{ds.batch_size}, {mode}, {len(layout.samples[d])} samples/epoch")
        for s, (sub, report) in enumerate(zip(ds.subsets, reports[d])):
            mine = _of_subset(live, d, s)
            repeats = sorted({e.repeats for e in mine})
            rep = str(repeats[0]) if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]} (balanced)"
            kind = "regularisation" if sub.is_reg else "training"
            lines.append(f"  {sub.image_dir}: {len(mine)} {kind} images × {rep} repeats"
                         + (f", class_tokens '{sub.class_tokens}'" if sub.class_tokens else ""))
            lines.append("    " + describe_caption_sources(report, sub, run_templates).split(": ", 1)[1])
            opts = [k for k in ("flip_aug", "color_aug", "random_crop") if getattr(sub, k)]
            if sub.caption.shuffle:
                opts.append(f"shuffle_caption (keep_tokens {sub.caption.keep_tokens})")
            if sub.caption.keep_tokens_separator:
                opts.append(f"keep_tokens_separator {sub.caption.keep_tokens_separator!r}")
            if sub.caption.secondary_separator:
                opts.append(f"secondary_separator {sub.caption.secondary_separator!r}")
            if sub.caption.wildcard:
                opts.append("enable_wildcard")
            if opts:
                lines.append("    options: " + ", ".join(opts))
    lines.append(totals)
    if bad_images:
        lines.append(f"skipped {len(bad_images)} unreadable image(s):")
        lines += [f"  {m}" for m in bad_images]
    if warnings:
        lines.append("warnings:")
        lines += [f"  {m}" for m in warnings]
    return "\n".join(lines)
