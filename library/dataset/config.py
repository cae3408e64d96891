"""The dataset part of a job: keys, their layered resolution, and the typed configs that come out.

A value is looked up subset → dataset → general → job → default, the order sd-scripts uses. Keys are
validated once here (unknown key → "did you mean", wrong type → the expected type); everything after
this module receives frozen dataclasses.

Two ways to describe data:
* TOML tables (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`), inline in the job or in the file
  named by `dataset_config`;
* folder mode: `train_data_dir` (and optionally `reg_data_dir`) whose sub-folders are named
  `N_concept`: N repeats, caption fallback "concept".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from library.dataset.captions import CaptionOptions
from library.dataset.images import DEFAULT_MAX_IMAGE_PIXELS, check_folder, is_image_file
from library.errors import ConfigError, DatasetError
from library.schema import Field, Unsupported, raise_all, validate_table

LATENT_FACTOR = 8  # pixels per latent cell of the SD1.x VAE
UNET_GRID = 64  # latent sizes divisible by 8 keep the SD1.x U-Net's three downsamplings exact

# ---- keys -------------------------------------------------------------------------------------------

# Keys only a subset can have: they describe one folder.
SUBSET_ONLY_FIELDS: dict[str, Field] = {
    "image_dir": Field("path", None, "The folder holding this subset's images (relative paths: from the folder you run the command in).", section="subset"),
    "num_repeats": Field("int", 1, "How many times each image is seen per epoch.", minimum=1, section="subset"),
    "class_tokens": Field("str", None, "Caption for images without a caption file (and the {} of caption_templates).", section="subset"),
    "is_reg": Field("bool", False, "Regularisation images (prior preservation): balanced against the training images; "
                    "their loss is multiplied by prior_loss_weight.", section="subset"),
    "metadata_file": Field("path", None, "sd-scripts' fine-tuning metadata JSON ({\"image\": {\"caption\": …, "
                           "\"tags\": …}}, as merge_captions_to_metadata.py writes it): the subset's images are its "
                           "keys (a path, or a name in image_dir with or without extension) and their captions "
                           "\"caption, tags\"; caption files are not read.", section="subset"),
}

# Keys a subset can have, which may also be given for a whole dataset, in [general] or in the job.
SUBSET_FIELDS: dict[str, Field] = {
    "caption_extension": Field("str", None, "Caption file extension, e.g. '.txt'. Unset: '.txt' or '.caption', "
                               "whichever exists beside each image (the log says which were used).", section="subset"),
    "caption_separator": Field("str", ",", "What separates tags in a caption (for shuffling, keep_tokens, tag dropout).", section="subset"),
    "shuffle_caption": Field("bool", False, "Shuffle the tags of each caption every step.", section="subset"),
    "keep_tokens": Field("int", 0, "Number of leading tags never shuffled or dropped.", minimum=0, section="subset"),
    "caption_dropout_rate": Field("float", 0.0, "Probability of training a sample with an empty caption.", minimum=0, maximum=1, section="subset"),
    "caption_tag_dropout_rate": Field("float", 0.0, "Probability of dropping each (non-kept) tag.", minimum=0, maximum=1, section="subset"),
    "caption_dropout_every_n_epochs": Field("int", 0, "Train every N-th epoch with empty captions (0: never).", minimum=0, section="subset"),
    "token_warmup_min": Field("int", 1, "Tags used at step 0 while token warm-up is on.", minimum=0, section="subset"),
    "token_warmup_step": Field("float", 0.0, "Step by which all tags are used (0: off; below 1: a fraction of the run).",
                               minimum=0, section="subset"),
    "caption_prefix": Field("str", None, "Text put before every caption (never shuffled).", section="subset"),
    "caption_suffix": Field("str", None, "Text put after every caption (never shuffled).", section="subset"),
    "keep_tokens_separator": Field("str", None, "Splits a caption into fixed and shuffled tags: 'a, b ||| c, d, e ||| f' "
                                   "keeps a, b first and f last and shuffles or drops only c, d, e; the separator "
                                   "is not trained on. Where a caption has it, keep_tokens is not used. E.g. '|||'.",
                                   section="subset"),
    "secondary_separator": Field("str", None, "Joins tags into one for shuffling and tag dropout: 'red hair;;;long "
                                 "hair' moves and drops as one tag, then is trained as 'red hair,long hair' (the "
                                 "separator becomes caption_separator). E.g. ';;;'.", section="subset"),
    "enable_wildcard": Field("bool", False, "Each {a|b|c} in a caption becomes one of its options, and a caption file "
                             "of several lines one of its lines, chosen per sample and epoch ({{ and }} are literal "
                             "braces). Off: only the first line is read.", section="subset"),
    "caption_templates": Field("list[str]", None, "Captions for images without a caption file, e.g. ['a photo of a {}']; "
                               "{} becomes class_tokens; one is picked per sample and epoch.", section="subset"),
    "flip_aug": Field("bool", False, "Mirror images left-right at random (cached latents keep both versions).", section="subset"),
    "color_aug": Field("bool", False, "Shift hues at random; incompatible with cache_latents.", section="subset"),
    "random_crop": Field("bool", False, "Crop at a random place instead of the centre; incompatible with cache_latents.", section="subset"),
}

DATASET_FIELDS: dict[str, Field] = {
    "resolution": Field("int|list[int]", 512, "Training resolution: 512, or [width, height]; the bucket area.", section="dataset"),
    "batch_size": Field("int", 1, "Images per batch (all from one bucket).", minimum=1, section="dataset"),
    "enable_bucket": Field("bool", True, "Aspect-ratio buckets. Unlike sd-scripts this is on by default; false crops "
                           "every image to `resolution`.", section="dataset"),
    "min_bucket_reso": Field("int", 256, "Smallest bucket side.", minimum=8, section="dataset"),
    "max_bucket_reso": Field("int", 1024, "Largest bucket side.", minimum=8, section="dataset"),
    "bucket_reso_steps": Field("int", 64, "Bucket side step in pixels: a multiple of 8; 64 recommended for SD1.x.", minimum=8, section="dataset"),
    "bucket_no_upscale": Field("bool", False, "Never enlarge images: small images get their own smaller buckets.", section="dataset"),
}

# Keys that only make sense once per job.
JOB_ONLY_FIELDS: dict[str, Field] = {
    "train_data_dir": Field("path", None, "Folder mode: a folder whose sub-folders are named N_concept "
                            "(e.g. 10_hand: 10 repeats, caption fallback 'hand').", section="dataset"),
    "reg_data_dir": Field("path", None, "Folder mode: regularisation images, sub-folders named N_concept.", section="dataset"),
    "train_batch_size": Field("int", 1, "Images per batch (the job-level name of batch_size).", minimum=1, section="dataset"),
    "prior_loss_weight": Field("float", 1.0, "Loss weight of regularisation images.", minimum=0, section="dataset"),
    "cache_latents": Field("bool", False, "Encode every image once with the VAE before training.", section="dataset"),
    "cache_latents_to_disk": Field("bool", False, "Keep cached latents beside the images and reuse them in later runs "
                                   "(implies cache_latents).", section="dataset"),
    "vae_batch_size": Field("int", 1, "Images per VAE call while caching (0 = the default).", minimum=1, unset=(0,),
                            section="dataset"),
    "skip_bad_images": Field("bool", True, "Skip (with a warning, counted) images that cannot be read and read "
                             "non-UTF-8 captions as Windows-1252; false makes both errors.", section="dataset"),
    "max_image_pixels": Field("int", DEFAULT_MAX_IMAGE_PIXELS, "Images with more pixels are refused "
                              "(decompression-bomb guard).", minimum=1, section="dataset"),
    "max_data_loader_n_workers": Field("int", 2, "Threads that load and resize images.", minimum=0, section="dataset"),
    "debug_dataset": Field("bool", False, "Print subsets, buckets and sample captions, then stop.", section="dataset"),
}

_JOB_RENAMED = {"batch_size": "train_batch_size"}  # dataset key -> its sd-scripts job-level name

# The dataset-related keys a job TOML may hold at its top level (merged into the job schema).
DATASET_JOB_FIELDS: dict[str, Field] = {
    **{k: v for k, v in SUBSET_FIELDS.items()},
    **{k: v for k, v in DATASET_FIELDS.items() if k not in _JOB_RENAMED},
    **JOB_ONLY_FIELDS,
}

UNSUPPORTED_DATASET_KEYS: dict[str, Unsupported] = {
    "in_json": Unsupported("fine_tune.py's metadata JSON: give it to a subset as metadata_file = \"meta.json\" "
                           "(with image_dir where its images are)."),
    "face_crop_aug_range": Unsupported("face crops are not implemented."),
    "conditioning_data_dir": Unsupported("ControlNet data is not used by SD1.x LoRA/TI/DreamBooth training."),
    "alpha_mask": Unsupported("alpha masks are not used yet: transparent pixels are composited on white."),
}

_TABLE_TOP_FIELDS = {"general": Field("dict"), "datasets": Field("dict")}


# ---- configs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubsetConfig:
    image_dir: Path
    num_repeats: int
    class_tokens: str | None
    is_reg: bool
    caption_extension: str | None  # None: .txt or .caption
    caption: CaptionOptions
    metadata_file: Path | None  # captions (and the image list) from sd-scripts' fine-tuning JSON
    caption_templates: tuple[str, ...] | None
    token_warmup_step: float  # as written: below 1 it is a fraction of the run, resolved by the dataset
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    where: str  # for messages: "job.toml [[datasets]] #1 [[datasets.subsets]] #2"


@dataclass(frozen=True)
class DatasetConfig:
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    prior_loss_weight: float
    skip_bad_images: bool
    max_image_pixels: int
    subsets: tuple[SubsetConfig, ...]
    where: str
    warnings: tuple[str, ...] = field(default=(), compare=False)


def job_value(job: Mapping[str, Any], key: str) -> Any:
    """A job-level dataset key's value, or its default (for cache_latents, vae_batch_size, ...)."""
    value = job.get(key)
    return DATASET_JOB_FIELDS[key].default if value is None else value


# ---- resolution -------------------------------------------------------------------------------------


def _lookup(key: str, layers: list[Mapping[str, Any]], default: Any) -> Any:
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    return default


def _job_layer(job: Mapping[str, Any]) -> dict[str, Any]:
    layer = {k: v for k, v in job.items() if k in DATASET_JOB_FIELDS}
    for inner, outer in _JOB_RENAMED.items():
        if outer in job:
            layer[inner] = job[outer]
    return layer


def _resolution(value: int | list[int], where: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = [value, value]
    if len(value) != 2:
        raise ConfigError(f"{where}: 'resolution' must be one integer or [width, height], got {value!r}.")
    if min(value) < 64:
        raise ConfigError(f"{where}: 'resolution' {value!r} is too small; SD1.x trains at 512 (256 at the least).")
    return int(value[0]), int(value[1])


def check_bucket_settings(res: tuple[int, int], enable: bool, lo: int, hi: int, steps: int, where: str) -> list[str]:
    """Errors for impossible bucket settings; returns warnings for poor ones.

    `bucket_reso_steps` must be a multiple of the VAE's factor (8), or latents would not tile the
    pixels. The SD1.x U-Net halves the latent three times, so latent sides divisible by 8 (pixels by 64)
    avoid the padding-and-cropping the U-Net otherwise does; other multiples of 8 are allowed with a
    warning, as in sd-scripts.
    """
    warns = []
    if not enable:
        for side in res:
            if side % LATENT_FACTOR:
                raise DatasetError(f"{where}: resolution {res[0]}×{res[1]} is not a multiple of {LATENT_FACTOR} "
                                   "(the VAE's pixels per latent); use e.g. 512 or [512, 768].")
        return warns
    if steps % LATENT_FACTOR:
        raise DatasetError(f"{where}: bucket_reso_steps = {steps} must be a multiple of {LATENT_FACTOR} (the VAE turns "
                           f"8×8 pixels into one latent); use 64.")
    if steps % UNET_GRID:
        warns.append(f"{where}: bucket_reso_steps = {steps} is not a multiple of {UNET_GRID}; the U-Net will pad odd "
                     "latent sizes. 64 is recommended.")
    if lo > min(res):
        raise DatasetError(f"{where}: min_bucket_reso = {lo} is larger than the resolution {res[0]}×{res[1]}; "
                           f"set min_bucket_reso to at most {min(res)} (256 is usual for 512).")
    if hi < max(res):
        raise DatasetError(f"{where}: max_bucket_reso = {hi} is smaller than the resolution {res[0]}×{res[1]}; "
                           f"set max_bucket_reso to at least {max(res)} (1024 is usual for 512).")
    for name, value in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
        if value % steps:
            lower, upper = value - value % steps, value - value % steps + steps
            raise DatasetError(f"{where}: {name} = {value} is not a multiple of bucket_reso_steps = {steps}; "
                               f"use {lower} or {upper}.")
    return warns


def _separators(get, where: str) -> tuple[str | None, str | None]:
    """keep_tokens_separator and secondary_separator, checked against caption_separator and each other.

    An empty string is no separator (sd-scripts' own default for keep_tokens_separator is "", and its
    --output_config files write it so), the same as leaving the key out."""
    tag_sep = get("caption_separator")
    if not tag_sep:
        raise ConfigError(f"{where}: 'caption_separator' is empty; use ',' (the default) or leave it out.")
    out = []
    for key, example in (("keep_tokens_separator", "|||"), ("secondary_separator", ";;;")):
        value = get(key)
        if value is not None and value != "" and not value.strip():
            raise ConfigError(f"{where}: '{key}' = {value!r} is only white space, which every caption has between "
                              f"its words; use a mark that appears nowhere else, e.g. {example!r} "
                              "(or \"\" / leave it out for none).")
        if value and key == "keep_tokens_separator" and value.strip() == tag_sep.strip():
            raise ConfigError(f"{where}: '{key}' = {value!r} is the caption_separator itself, so every tag would be "
                              f"a boundary of the fixed part; use another mark, e.g. {example!r}.")
        if value and key == "secondary_separator" and tag_sep in value:
            raise ConfigError(f"{where}: '{key}' = {value!r} contains caption_separator {tag_sep!r}, so the tags it "
                              f"joins would be cut apart; use a mark without {tag_sep!r}, e.g. {example!r}.")
        out.append(value or None)
    keep, secondary = out
    if keep and secondary and (keep in secondary or secondary in keep):
        raise ConfigError(f"{where}: keep_tokens_separator {keep!r} and secondary_separator {secondary!r} overlap; "
                          "one caption mark cannot mean both. Use e.g. '|||' and ';;;'.")
    return keep, secondary


def _caption_options(get, where: str) -> CaptionOptions:
    warmup = get("token_warmup_step")
    keep_sep, secondary_sep = _separators(get, where)
    return CaptionOptions(
        separator=get("caption_separator"),
        shuffle=get("shuffle_caption"),
        keep_tokens=get("keep_tokens"),
        dropout_rate=get("caption_dropout_rate"),
        tag_dropout_rate=get("caption_tag_dropout_rate"),
        dropout_every_n_epochs=get("caption_dropout_every_n_epochs"),
        token_warmup_min=get("token_warmup_min"),
        # a fraction of the run is resolved by the dataset once the number of steps is known
        token_warmup_step=int(warmup) if warmup >= 1 else 0,
        prefix=get("caption_prefix"),
        suffix=get("caption_suffix"),
        keep_tokens_separator=keep_sep,
        secondary_separator=secondary_sep,
        wildcard=get("enable_wildcard"),
    )


def _normalise_extension(ext: str | None, where: str) -> str | None:
    if ext is None:
        return None
    if not ext or ext.strip() in (".", ""):
        raise ConfigError(f"{where}: 'caption_extension' is empty; use '.txt' or '.caption', or leave it out.")
    return ext if ext.startswith(".") else "." + ext


def _resolve(path: str, base_dir: Path) -> Path:
    """A path of a job or dataset file: `~` expanded, a relative one taken from the file's folder."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else base_dir / resolved


def _make_subset(layers: list[Mapping[str, Any]], base_dir: Path, where: str) -> SubsetConfig:
    def get(key: str) -> Any:
        spec = SUBSET_FIELDS.get(key) or SUBSET_ONLY_FIELDS[key]
        return _lookup(key, layers, spec.default)

    image_dir = _lookup("image_dir", layers, None)  # only the subset's own table has it
    if image_dir is None:
        raise ConfigError(f"{where}: 'image_dir' is required: the folder holding this subset's images.")
    path = _resolve(image_dir, base_dir)
    templates = get("caption_templates")
    if templates is not None:
        if not templates or any("{}" not in t for t in templates):
            raise ConfigError(f"{where}: every caption template needs a '{{}}' where the class_tokens go, "
                              f"e.g. 'a photo of a {{}}'; got {templates!r}.")
    metadata = get("metadata_file")
    if metadata is not None:
        metadata = _resolve(metadata, base_dir)
    return SubsetConfig(
        image_dir=path,
        metadata_file=metadata,
        num_repeats=get("num_repeats"),
        class_tokens=get("class_tokens"),
        is_reg=get("is_reg"),
        caption_extension=_normalise_extension(get("caption_extension"), where),
        caption=_caption_options(get, where),
        caption_templates=tuple(templates) if templates is not None else None,
        token_warmup_step=float(get("token_warmup_step")),
        flip_aug=get("flip_aug"),
        color_aug=get("color_aug"),
        random_crop=get("random_crop"),
        where=where,
    )


def _make_dataset(layers: list[Mapping[str, Any]], subsets: tuple[SubsetConfig, ...], job: Mapping[str, Any], where: str) -> DatasetConfig:
    def get(key: str) -> Any:
        return _lookup(key, layers, DATASET_FIELDS[key].default)

    res = _resolution(get("resolution"), where)
    enable, lo, hi, steps = get("enable_bucket"), get("min_bucket_reso"), get("max_bucket_reso"), get("bucket_reso_steps")
    warns = check_bucket_settings(res, enable, lo, hi, steps, where)
    if job_value(job, "cache_latents") or job_value(job, "cache_latents_to_disk"):
        for s in subsets:
            for key in ("color_aug", "random_crop"):
                if getattr(s, key):
                    raise ConfigError(f"{s.where}: {key} = true changes the pixels every epoch, so latents cannot be "
                                      f"cached; set cache_latents = false (slower) or {key} = false.")
    return DatasetConfig(
        resolution=res,
        batch_size=get("batch_size"),
        enable_bucket=enable,
        min_bucket_reso=lo,
        max_bucket_reso=hi,
        bucket_reso_steps=steps,
        bucket_no_upscale=get("bucket_no_upscale"),
        prior_loss_weight=job_value(job, "prior_loss_weight"),
        skip_bad_images=job_value(job, "skip_bad_images"),
        max_image_pixels=job_value(job, "max_image_pixels"),
        subsets=subsets,
        where=where,
        warnings=tuple(warns),
    )


# Folder mode: "10_hand" -> 10 repeats, caption fallback "hand" ("10_" gives an empty fallback).
_REPEATS_NAME = re.compile(r"^(\d+)_(.*)$")


def parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """(repeats, concept) from a folder name such as '10_hand palm'; None when it has no N_ prefix."""
    m = _REPEATS_NAME.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2)


def folder_mode_subsets(parent: Path, is_reg: bool, what: str) -> list[dict[str, Any]]:
    """Subset tables for the N_concept sub-folders of `parent`.

    A sub-folder with images but no N_ prefix is an error rather than silently ignored (sd-scripts
    skips it with a warning that scrolls away, losing the images); so are images lying directly in
    `parent`, the most common folder-mode mistake.
    """
    check_folder(parent, what)
    subsets: list[dict[str, Any]] = []
    loose = [p.name for p in parent.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        raise DatasetError(
            f"{what} '{parent}' holds images directly ({len(loose)}, e.g. {sorted(loose)[0]}). Folder mode expects "
            f"sub-folders named like '10_hand' (10 repeats per epoch, caption fallback 'hand'): move the images "
            f"into '{parent / '10_hand'}', or describe the folder as a [[datasets.subsets]] image_dir instead."
        )
    for sub in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_repeats_folder(sub.name)
        has_images = any(is_image_file(p) for p in sub.iterdir() if p.is_file())
        if parsed is None:
            if has_images:
                raise DatasetError(
                    f"{what}: sub-folder '{sub}' holds images but its name has no repeat count. Name it "
                    f"'<repeats>_<concept>', e.g. '10_{sub.name}' (10 repeats per epoch, captions fall back to "
                    f"'{sub.name}')."
                )
            continue  # e.g. a folder of cache files or notes
        repeats, concept = parsed
        if repeats < 1:
            raise DatasetError(f"{what}: sub-folder '{sub}' has 0 repeats; use 1 or more, e.g. '1_{concept}'.")
        subsets.append({"image_dir": str(sub), "num_repeats": repeats, "class_tokens": concept or None, "is_reg": is_reg})
    if not subsets:
        raise DatasetError(f"{what} '{parent}' has no sub-folders named like '10_hand' (repeats_concept) holding images; "
                           "create one and put the images (and their .txt captions) in it.")
    return subsets


def resolve_datasets(job: Mapping[str, Any], dataset_table: Mapping[str, Any] | None, where: str, base_dir: Path,
                     command_line: Mapping[str, Any] | None = None) -> list[DatasetConfig]:
    """Typed dataset configs from a job's dataset keys and/or its dataset tables.

    `job`: validated job-level values (only the keys present). `dataset_table`: the content of
    `[general]`/`[[datasets]]` (inline or from dataset_config), or None in folder mode. `where` names
    the file for messages; relative image_dir paths are taken from `base_dir`. `command_line`: the
    values given as command-line options, which win over every table (a subset's too).
    """
    job_layer = _job_layer(job)
    cli_layer = _job_layer(command_line or {})
    folder_mode = job.get("train_data_dir") is not None
    if dataset_table and folder_mode:
        raise ConfigError(f"{where}: both train_data_dir and [[datasets]] (or dataset_config) are given; use one of them "
                          "(put the folder into a [[datasets.subsets]] image_dir to combine them).")
    if job.get("reg_data_dir") is not None and not folder_mode:
        raise ConfigError(f"{where}: reg_data_dir needs train_data_dir; with [[datasets]], add a subset with is_reg = true.")

    if folder_mode:
        train = _resolve(job["train_data_dir"], base_dir)
        tables = folder_mode_subsets(train, False, "train_data_dir")
        if job.get("reg_data_dir") is not None:
            reg = _resolve(job["reg_data_dir"], base_dir)
            tables += folder_mode_subsets(reg, True, "reg_data_dir")
        subsets = tuple(_make_subset([cli_layer, t, job_layer], base_dir, f"{where} {t['image_dir']}") for t in tables)
        return [_make_dataset([cli_layer, job_layer], subsets, job, f"{where} train_data_dir")]

    if not dataset_table:
        raise ConfigError(f"{where}: no training images: set train_data_dir (folders named like '10_hand') or "
                          "dataset_config / [[datasets]] with [[datasets.subsets]] image_dir.")
    top = {k: v for k, v in dataset_table.items()}
    if "datasets" in top and not isinstance(top["datasets"], list):
        raise ConfigError(f"{where}: 'datasets' must be an array of tables: write [[datasets]], not [datasets].")
    datasets_raw = top.pop("datasets", None)
    general_raw = top.pop("general", {})
    errors: list[str] = []  # every bad key of every table, reported together
    validate_table(top, _TABLE_TOP_FIELDS, where, errors=errors)  # anything else left at the top is unknown
    general = validate_table(general_raw, {**SUBSET_FIELDS, **DATASET_FIELDS}, f"{where} [general]",
                             UNSUPPORTED_DATASET_KEYS, errors=errors)
    if not datasets_raw:
        errors.append(f"{where}: no [[datasets]] table; add one with at least one [[datasets.subsets]] image_dir.")
    tables = []
    for i, ds_raw in enumerate(datasets_raw or [], 1):
        ds_where = f"{where} [[datasets]] #{i}"
        if not isinstance(ds_raw, dict):
            errors.append(f"{ds_where}: must be a table.")
            continue
        ds_raw = dict(ds_raw)
        subsets_raw = ds_raw.pop("subsets", None)
        ds = validate_table(ds_raw, {**SUBSET_FIELDS, **DATASET_FIELDS}, ds_where, UNSUPPORTED_DATASET_KEYS,
                            errors=errors)
        if not subsets_raw or not isinstance(subsets_raw, list):
            errors.append(f"{ds_where}: no [[datasets.subsets]]; add one with image_dir = \"folder\".")
            continue
        subsets = []
        for j, sub_raw in enumerate(subsets_raw, 1):
            sub_where = f"{ds_where} [[datasets.subsets]] #{j}"
            if not isinstance(sub_raw, dict):
                errors.append(f"{sub_where}: must be a table.")
                continue
            subsets.append((validate_table(sub_raw, {**SUBSET_ONLY_FIELDS, **SUBSET_FIELDS}, sub_where,
                                           UNSUPPORTED_DATASET_KEYS, errors=errors), sub_where))
        tables.append((ds, ds_where, subsets))
    raise_all(errors)

    out = []
    for ds, ds_where, subsets in tables:
        made = tuple(_make_subset([cli_layer, sub, ds, general, job_layer], base_dir, sub_where)
                     for sub, sub_where in subsets)
        out.append(_make_dataset([cli_layer, ds, general, job_layer], made, job, ds_where))
    return out

