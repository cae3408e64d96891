"""Captions: reading caption files, and the per-step processing of a caption.

`process_caption` is a pure function of (caption, options, random generator, epoch, step). The
dataset gives it a generator seeded from (seed, epoch, sample), so the same batch always gets the
same captions, and resuming mid-epoch reproduces them.

Order of operations (the same as sd-scripts, except where noted):
1. whole-caption dropout (rate, or every N-th epoch) -> "" (the unconditional caption);
2. if shuffling, tag dropout or token warm-up is on: split on the separator, keep the first
   `keep_tokens` tags in place, cut the rest to the warm-up length, shuffle them, drop tags at
   `caption_tag_dropout_rate`, join with ", ";
3. prefix and suffix are attached (joined with a space). Unlike sd-scripts, which attaches them before
   step 2, they stay fixed: a shuffle never moves "photo of hndstyle" into the middle of the tags;
4. replacements (textual inversion: "<hand>" -> "<hand> <hand1> <hand2>") are applied last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from library.errors import DatasetError

CAPTION_EXTENSIONS_DEFAULT = (".txt", ".caption")


@dataclass(frozen=True)
class CaptionOptions:
    """How one subset's captions are processed each step."""

    separator: str = ","
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    token_warmup_min: int = 1
    token_warmup_step: int = 0  # absolute step; fractions of the run are resolved before this point
    prefix: str | None = None
    suffix: str | None = None


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.strip().split(separator) if t.strip()]


def process_caption(
    caption: str,
    opts: CaptionOptions,
    rng: np.random.Generator,
    *,
    epoch: int,
    step: int = 0,
    replacements: Mapping[str, str] | None = None,
) -> str:
    """The caption a sample is trained with at this epoch and global step (see the module docstring)."""
    # Draw every random number in a fixed order whatever the options, so that changing one option
    # does not reshuffle what the others decided.
    drop_draw = rng.random()
    dropped = (opts.dropout_rate > 0 and drop_draw < opts.dropout_rate) or (
        opts.dropout_every_n_epochs > 0 and epoch % opts.dropout_every_n_epochs == 0
    )
    if dropped:
        return ""

    if opts.shuffle or opts.tag_dropout_rate > 0 or opts.token_warmup_step > 0:
        tags = split_tags(caption, opts.separator)
        fixed, flex = tags[: opts.keep_tokens], tags[opts.keep_tokens :]
        if opts.token_warmup_step > 0 and step < opts.token_warmup_step:
            # grow linearly from token_warmup_min tags at step 0 to all tags at token_warmup_step
            n = math.floor(step * (len(flex) - opts.token_warmup_min) / opts.token_warmup_step) + opts.token_warmup_min
            flex = flex[: max(0, n)]
        if opts.shuffle:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if opts.tag_dropout_rate > 0:
            keep = rng.random(len(flex)) >= opts.tag_dropout_rate
            flex = [t for t, k in zip(flex, keep) if k]
        caption = ", ".join(fixed + flex)

    if opts.prefix:
        caption = f"{opts.prefix} {caption}" if caption else opts.prefix
    if opts.suffix:
        caption = f"{caption} {opts.suffix}" if caption else opts.suffix
    for old, new in (replacements or {}).items():
        caption = caption.replace(old, new)
    return caption


def fill_template(template: str, tokens: str) -> str:
    """A caption from a template such as "a photo of a {}" and the subset's class tokens."""
    return template.replace("{}", tokens)


def base_caption(caption: str | None, class_tokens: str | None, templates: Sequence[str] | None,
                 template_token: str | None, template: int = 0) -> str:
    """The text an image is captioned with before its per-step processing.

    `caption`: its caption file's text. Without one: `templates[template]` with {} filled by the
    subset's class_tokens, or by `template_token` when it has none (textual inversion's token); without
    templates, class_tokens (or "").
    """
    if caption is not None:
        return caption
    if templates:
        return fill_template(templates[template], class_tokens if class_tokens is not None else (template_token or ""))
    return class_tokens or ""


def base_captions(caption: str | None, class_tokens: str | None, templates: Sequence[str] | None,
                  template_token: str | None) -> list[str]:
    """Every text `base_caption` can give the image: one per template when it is captioned from them."""
    choices = range(len(templates)) if caption is None and templates else range(1)
    return [base_caption(caption, class_tokens, templates, template_token, k) for k in choices]


@dataclass(frozen=True)
class CaptionRead:
    text: str | None  # None: no usable caption file
    path: Path | None  # the file it came from
    warning: str | None = None


def find_caption_file(image: Path, extensions: tuple[str, ...]) -> Path | None:
    """The first existing caption file beside `image` (foo.png -> foo.txt, foo.caption, ...)."""
    for ext in extensions:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def read_caption_file(path: Path, strict: bool) -> CaptionRead:
    """Read a caption file as UTF-8 (a BOM is ignored); multi-line captions use their first line.

    An empty file is a warning (the image falls back to class_tokens). A file that is not UTF-8 is a
    warning and is decoded as Windows-1252, which is what such files almost always are; with `strict`
    both are errors.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
        warning = None
    except UnicodeDecodeError as exc:
        msg = (f"{path}: caption is not UTF-8 ({exc.reason} at byte {exc.start}); "
               "re-save it as UTF-8")
        if strict:
            raise DatasetError(msg + " (or set skip_bad_images = true to read it as Windows-1252).") from None
        text = data.decode("cp1252", errors="replace")
        warning = msg + "; read as Windows-1252 for now."
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        msg = f"{path}: caption file is empty"
        if strict:
            raise DatasetError(msg + "; write a caption or delete the file (then class_tokens is used).")
        return CaptionRead(None, path, msg + "; using the subset's class_tokens instead.")
    return CaptionRead(lines[0], path, warning)


def tag_frequency(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How often each tag occurs across captions (one count per caption), for ss_tag_frequency."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption, separator):
            counts[tag] = counts.get(tag, 0) + 1
    return counts
