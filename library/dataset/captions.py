"""Captions: reading caption files, and the per-step processing of a caption.

`process_caption` is a pure function of (caption, options, random generator, epoch, step). The
dataset gives it a generator seeded from (seed, epoch, sample), so the same batch always gets the
same captions, and resuming mid-epoch reproduces them.

Order of operations (the same as sd-scripts, except where noted):
1. whole-caption dropout (rate, or every N-th epoch) -> "" (the unconditional caption);
2. with `enable_wildcard`: a caption of several lines becomes one of its lines, then each `{a|b|c}`
   becomes one of its options (`{{` and `}}` are literal braces); the prefix and suffix get their
   wildcards chosen too. Without it, only the first line is used (the reader already did that);
3. if shuffling, tag dropout or token warm-up is on, or the caption holds `keep_tokens_separator`:
   split into tags. With the separator in the caption, the tags before it stay first and the tags
   after a second separator stay last (`fixed ||| shuffled ||| fixed suffix`), whatever keep_tokens
   says; otherwise the first `keep_tokens` tags stay first. The middle tags are cut to the warm-up
   length, shuffled, and dropped at `caption_tag_dropout_rate`; all are joined with ", ". Unlike
   sd-scripts, the separator is also taken out when nothing is shuffled or dropped (sd-scripts then
   trains on the text "|||");
4. prefix and suffix are attached (joined with a space). Unlike sd-scripts, which attaches them before
   step 2, they stay fixed: a shuffle never moves "photo of hndstyle" into the middle of the tags (a
   `keep_tokens_separator` inside them is taken out);
5. `secondary_separator` becomes `caption_separator` (as in sd-scripts): "red hair;;;long hair" is one tag
   in step 3 and "red hair,long hair" in the end (the same tokens as "red hair, long hair");
6. replacements (textual inversion: "<hand>" -> "<hand> <hand1> <hand2>") are applied last.

Wildcard and line choices come from a child of the sample's generator (`Generator.spawn`), which leaves
the generator's own stream untouched: captions without wildcards are shuffled and dropped exactly as
before wildcards existed.
"""

from __future__ import annotations

import math
import re
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
    keep_tokens_separator: str | None = None  # "|||": fixed ||| shuffled ||| fixed suffix
    secondary_separator: str | None = None  # ";;;": joins tags into one for shuffling and dropout
    wildcard: bool = False  # enable_wildcard: {a|b|c} and one line of a multi-line caption, chosen per sample


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

    prefix, suffix = opts.prefix, opts.suffix
    if opts.wildcard:
        wild = rng.spawn(1)[0]  # its own stream: the draws below stay what they are without wildcards
        caption = choose_line(caption, wild)
        caption = expand_wildcards(caption, wild)
        prefix = expand_wildcards(prefix, wild) if prefix else prefix
        suffix = expand_wildcards(suffix, wild) if suffix else suffix
    else:
        caption = caption.split("\n")[0]

    kts = opts.keep_tokens_separator
    split_by_separator = bool(kts) and kts in caption
    if opts.shuffle or opts.tag_dropout_rate > 0 or opts.token_warmup_step > 0 or split_by_separator:
        fixed_end: list[str] = []
        if split_by_separator:
            parts = caption.split(kts, 2)
            fixed, flex = split_tags(parts[0], opts.separator), split_tags(parts[1], opts.separator)
            if len(parts) == 3:  # a third separator and beyond only separate tags
                fixed_end = [t for part in parts[2].split(kts) for t in split_tags(part, opts.separator)]
        else:
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
        caption = ", ".join(fixed + flex + fixed_end)

    if kts:
        prefix = _without(prefix, kts) if prefix else prefix
        suffix = _without(suffix, kts) if suffix else suffix
    if prefix:
        caption = f"{prefix} {caption}" if caption else prefix
    if suffix:
        caption = f"{caption} {suffix}" if caption else suffix
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.separator)
    for old, new in (replacements or {}).items():
        caption = caption.replace(old, new)
    return caption


def _without(text: str, separator: str) -> str:
    """`text` with a keep-tokens separator taken out: "trigger |||" -> "trigger", "a ||| b" -> "a, b"."""
    return ", ".join(p.strip() for p in text.split(separator) if p.strip())


_WILDCARD = re.compile(r"\{([^}]+)\}")


def choose_line(caption: str, rng: np.random.Generator) -> str:
    """One line of a multi-line caption, chosen with `rng` (enable_wildcard); a one-line caption as it is."""
    if "\n" not in caption:
        return caption
    lines = caption.split("\n")
    return lines[int(rng.integers(len(lines)))]


def _brace_marks(text: str) -> tuple[str, str]:
    """Two strings that do not occur in `text`, to stand for the literal braces `{{` and `}}`."""
    left, right = "\ue000", "\ue001"  # private-use characters
    while left in text or right in text:
        left, right = left + "\ue000", right + "\ue001"
    return left, right


def _sub_wildcards(text: str, choose) -> str:
    """`text` with each `{a|b|c}` replaced by `choose(options)`, left to right; `{{` and `}}` are literal braces."""
    left, right = _brace_marks(text)
    escaped = text.replace("{{", left).replace("}}", right)
    return _WILDCARD.sub(lambda m: choose(m.group(1).split("|")), escaped).replace(left, "{").replace(right, "}")


def expand_wildcards(text: str, rng: np.random.Generator) -> str:
    """Each `{a|b|c}` of `text` replaced by one of its options, chosen with `rng` left to right (sd-scripts'
    enable_wildcard). `{{` and `}}` are literal braces; options are taken as written, spaces included."""
    if "{" not in text:
        return text
    return _sub_wildcards(text, lambda options: options[int(rng.integers(len(options)))])


def longest_wildcard_texts(text: str) -> list[str]:
    """Each line of a wildcard caption with every wildcard at its longest option: the longest texts it can
    give (what a caption-length check needs)."""
    return [_sub_wildcards(line, lambda options: max(options, key=len)) for line in text.split("\n")]


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


def read_caption_file(path: Path, strict: bool, all_lines: bool = False) -> CaptionRead:
    """Read a caption file as UTF-8 (a BOM is ignored); multi-line captions use their first line, or with
    `all_lines` (enable_wildcard) keep every non-empty line, stripped, joined with "\\n".

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
    return CaptionRead("\n".join(lines) if all_lines else lines[0], path, warning)


def tag_frequency(captions: Iterable[str], separator: str = ",",
                  also: Sequence[str | None] = ()) -> dict[str, int]:
    """How often each tag occurs across captions (one count per caption), for ss_tag_frequency. The lines of
    a multi-line caption and the separators in `also` (keep_tokens_separator, secondary_separator) separate
    tags too."""
    counts: dict[str, int] = {}
    extra = [s for s in also if s]
    for caption in captions:
        for other in extra:
            caption = caption.replace(other, separator)
        for tag in (t for line in caption.split("\n") for t in split_tags(line, separator)):
            counts[tag] = counts.get(tag, 0) + 1
    return counts
