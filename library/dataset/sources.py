"""From subset configs to image entries: files found, sizes read, captions read, buckets chosen.

Nothing here decodes pixels; a subset of a thousand images is scanned in about a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from library.dataset.buckets import BucketChoice, make_bucket_resolutions, select_bucket
from library.dataset.captions import CAPTION_EXTENSIONS_DEFAULT, find_caption_file, read_caption_file
from library.dataset.config import DatasetConfig, SubsetConfig
from library.dataset.images import (
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    BadImageError,
    check_folder,
    list_images,
    read_header,
)
from library.errors import DatasetError

log = logging.getLogger("pentadactyl.dataset")


@dataclass
class ImageEntry:
    """One image of one subset, as the dataset will use it."""

    path: Path
    dataset: int  # index of its DatasetConfig
    subset: int  # index of its SubsetConfig within the dataset
    size: tuple[int, int]  # (width, height), EXIF-rotated
    file_size: int
    mtime_ns: int
    caption: str | None  # the caption file's text (every line with enable_wildcard); None: class_tokens or a template
    choice: BucketChoice
    is_reg: bool
    repeats: int  # samples per epoch (regularisation balancing may change it)


@dataclass
class SubsetReport:
    """What scanning one subset found, for the log, the dry run and the run's metadata."""

    where: str
    image_dir: Path
    entries: list[ImageEntry] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)  # messages, one per skipped file
    caption_sources: dict[str, int] = field(default_factory=dict)  # ".txt": 12, "none": 3
    warnings: list[str] = field(default_factory=list)


def bucket_list(ds: DatasetConfig) -> list[tuple[int, int]] | None:
    """The predefined buckets of a dataset; None when every image gets its own (bucket_no_upscale)."""
    if not ds.enable_bucket:
        return [ds.resolution]
    if ds.bucket_no_upscale:
        return None
    return make_bucket_resolutions(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)


def choose_bucket(size: tuple[int, int], ds: DatasetConfig, predefined: list[tuple[int, int]] | None) -> BucketChoice:
    steps = ds.bucket_reso_steps if ds.enable_bucket else 8
    return select_bucket(size, predefined, max_area=ds.resolution[0] * ds.resolution[1], steps=steps)


def _orphan_caption_warnings(folder: Path, images: list[Path], extensions: tuple[str, ...]) -> list[str]:
    stems = {p.stem for p in images}
    orphans = sorted(p for p in folder.iterdir()
                     if p.is_file() and p.suffix in extensions and p.stem not in stems)
    if not orphans:
        return []
    others = {p.stem: p.name for p in folder.iterdir() if p.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS}
    notes = []
    for p in orphans[:5]:
        if p.stem in others:
            notes.append(f"{p.name} (its image {others[p.stem]} is a format we do not read; convert it to PNG)")
        else:
            notes.append(p.name)
    more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
    return [f"{folder}: {len(orphans)} caption file(s) without an image: {', '.join(notes)}{more}. "
            f"Images are read from {', '.join(IMAGE_EXTENSIONS)}."]


def _unsupported_warnings(folder: Path) -> list[str]:
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS)
    if not found:
        return []
    return [f"{folder}: {len(found)} file(s) in formats that are not read ({', '.join(found[:5])}); "
            f"convert them to PNG or JPEG to train on them."]


def read_metadata_file(sub: SubsetConfig, report: SubsetReport) -> dict[Path, str | None]:
    """sd-scripts' fine-tuning metadata: {image path: caption}. A key is an image path, or a name in image_dir
    with or without its extension (merge_captions_to_metadata.py writes stems unless --full_path); the caption
    is "caption, tags" (either alone when the other is missing or empty), as sd-scripts joins them. Keys whose
    image is missing are left out with a warning; a file that is not such a JSON is an error naming it."""
    import json

    path = sub.metadata_file
    where = f"{sub.where}: metadata_file '{path}'"
    if not path.is_file():
        raise DatasetError(f"{where}: no such file; give the JSON that merge_captions_to_metadata.py (or "
                           "prepare_buckets_latents.py) wrote.")
    try:
        table = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    if not isinstance(table, dict):
        raise DatasetError(f"{where}: expected an object {{\"image\": {{\"caption\": \"…\"}}, …}}, got "
                           f"{type(table).__name__}.")
    out: dict[Path, str | None] = {}
    missing: list[str] = []
    for key, entry in table.items():
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: the entry of '{key}' is {type(entry).__name__}, not an object with "
                               "\"caption\" and/or \"tags\".")
        image = _metadata_image(Path(key).expanduser(), sub.image_dir)
        if image is None:
            missing.append(key)
            continue
        parts = [str(entry[k]).strip() for k in ("caption", "tags") if entry.get(k) not in (None, "")]
        out[image] = ", ".join(p for p in parts if p) or None
    if missing:
        report.warnings.append(f"{where}: {len(missing)} image(s) it names were not found in '{sub.image_dir}' "
                               f"and are left out, e.g. {missing[0]}")
    return out


def _metadata_image(key: Path, image_dir: Path) -> Path | None:
    for candidate in ([key] if key.is_absolute() else [image_dir / key, key]):
        if candidate.is_file() and candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
        for ext in IMAGE_EXTENSIONS:  # a stem: the image beside it with any supported extension
            for spelled in (ext, ext.upper()):
                if (found := candidate.with_name(candidate.name + spelled)).is_file():
                    return found
    return None


def scan_subset(ds: DatasetConfig, sub: SubsetConfig, ds_index: int, sub_index: int,
                predefined: list[tuple[int, int]] | None, has_templates: bool) -> SubsetReport:
    """Find, size and caption a subset's images. Raises DatasetError for what cannot be skipped."""
    check_folder(sub.image_dir, f"{sub.where}: image_dir")
    report = SubsetReport(sub.where, sub.image_dir)
    metadata = read_metadata_file(sub, report) if sub.metadata_file is not None else None
    images = list(metadata) if metadata is not None else list_images(sub.image_dir)
    if not images and metadata is not None:
        raise DatasetError(f"{sub.where}: metadata_file '{sub.metadata_file}' names no image that exists "
                           f"(looked in '{sub.image_dir}'); point image_dir at the folder of its images.")
    if not images:
        others = [p.name for p in sub.image_dir.iterdir() if not p.name.startswith(".")]
        hint = f" It holds {len(others)} other entries, e.g. {sorted(others)[0]}." if others else " It is empty."
        raise DatasetError(f"{sub.where}: image_dir '{sub.image_dir}' contains no images "
                           f"({', '.join(IMAGE_EXTENSIONS)}, any case).{hint}")
    extensions = (sub.caption_extension,) if sub.caption_extension else CAPTION_EXTENSIONS_DEFAULT
    if metadata is None:
        report.warnings += _orphan_caption_warnings(sub.image_dir, images, extensions)
        report.warnings += _unsupported_warnings(sub.image_dir)

    strict = not ds.skip_bad_images
    uncaptioned: list[Path] = []
    for path in tqdm(images, desc=f"reading {sub.image_dir.name}", unit="img", leave=False, disable=len(images) < 200):
        try:
            header = read_header(path, ds.max_image_pixels)
        except BadImageError as exc:
            if strict:
                raise DatasetError(f"{exc} (skip_bad_images = false; set it to true to skip such files).") from None
            report.bad_images.append(str(exc))
            continue
        choice = choose_bucket(header.size, ds, predefined)
        if min(choice.bucket) <= 0:
            msg = (f"{path}: {header.size[0]}×{header.size[1]} is smaller than one bucket step "
                   f"({ds.bucket_reso_steps} px); it cannot be trained on without enlarging (bucket_no_upscale).")
            if strict:
                raise DatasetError(msg)
            report.bad_images.append(msg)
            continue
        caption_file = None if metadata is not None else find_caption_file(path, extensions)
        caption = metadata.get(path) if metadata is not None else None
        if caption_file is not None:
            read = read_caption_file(caption_file, strict, all_lines=sub.caption.wildcard)
            caption = read.text
            if read.warning:
                report.warnings.append(read.warning)
        source = "none" if caption is None else "metadata" if metadata is not None else caption_file.suffix
        report.caption_sources[source] = report.caption_sources.get(source, 0) + 1
        if caption is None:
            uncaptioned.append(path)
        report.entries.append(ImageEntry(
            path=path, dataset=ds_index, subset=sub_index, size=header.size, file_size=header.file_size,
            mtime_ns=header.mtime_ns, caption=caption, choice=choice, is_reg=sub.is_reg, repeats=sub.num_repeats,
        ))
    if uncaptioned and sub.class_tokens is None and not has_templates:
        raise DatasetError(
            f"{sub.where}: {len(uncaptioned)} image(s) have no caption "
            + (f"in {sub.metadata_file}, " if metadata is not None else
               f"file (looked for {' or '.join(extensions)}), ")
            + f"e.g. {uncaptioned[0]}, and the subset has no class_tokens; add caption files or set class_tokens."
        )
    if not report.entries:
        raise DatasetError(f"{sub.where}: none of the {len(images)} images in '{sub.image_dir}' could be read; "
                           f"first problem: {report.bad_images[0]}")
    return report


def describe_caption_sources(report: SubsetReport, sub: SubsetConfig, run_templates: bool = False) -> str:
    """One log line saying where captions came from: the answer to "did it read my .txt files?".

    `run_templates`: the trainer supplies caption templates (textual inversion) for uncaptioned images.
    """
    parts = [f"{n} from {sub.metadata_file.name if src == 'metadata' else src + ' files'}"
             for src, n in sorted(report.caption_sources.items()) if src != "none"]
    missing = report.caption_sources.get("none", 0)
    if missing:
        if sub.caption_templates or run_templates:
            fallback = "caption templates"
        elif sub.class_tokens is not None:
            fallback = f"class_tokens '{sub.class_tokens}'"
        else:
            fallback = "an empty caption: set class_tokens or add caption files"
        parts.append(f"{missing} without a caption file (using {fallback})")
    if sub.metadata_file is not None:
        return f"{report.image_dir}: captions: {', '.join(parts)} (metadata_file; caption files are not read)."
    looked = sub.caption_extension or "'.txt' or '.caption' (caption_extension unset)"
    return f"{report.image_dir}: captions: {', '.join(parts)}; looked for {looked}."
