"""`prepare_dataset.py folder`: every image under a folder, with one caption, as a training folder.

    python prepare_dataset.py folder --images Palms/ --caption "a photo of a palm" --out data/palms

For the sets that come without captions (Palms, Handshakes, a folder of generations). The folder is searched
recursively for .png, .jpg, .jpeg, .webp and .bmp files (any case); hidden files and folders (names starting
with '.') are passed over, and so is the output itself when it lies inside the input. Every other file is
reported and left out, and so is an image that cannot be decoded. An image's output name is its path under
the folder with the separators made underscores (`left/a.jpg` → `left_a.jpg`), so two files of the same name
in different sub-folders never collide; names that still would (`a.png` and `a.jpg`, or names differing only
in case) get `_2`, `_3`, … in sorted order. The summary counts the images per top-level sub-folder.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from library.errors import ConfigError
from library.prepare.output import (
    Dropped,
    Item,
    Plan,
    add_output_arguments,
    check_replaceable,
    images_under,
    one_line,
    options_from_args,
    report,
    write_plan,
)

TOP_LEVEL = "(top level)"


def flat_name(relative: Path) -> str:
    """`left/IMG 001.jpg` → `left_IMG-001`: the path under the input without its extension, one safe file name."""
    parts = [re.sub(r"[^\w.-]+", "-", part).strip("-") or "_" for part in relative.with_suffix("").parts]
    return "_".join(parts).lstrip(".") or "image"


def plan_folder(images: Path, caption: str, exclude: tuple[Path, ...] = ()) -> Plan:
    """One item per image under `images` (see the module docstring); every other file is dropped, with its path."""
    # the training loader's own lists of what it reads and what it names as unsupported (imported here: torch)
    from library.dataset.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS

    if not images.is_dir():
        raise ConfigError(f"--images {images}: no such folder; give the folder holding the images")
    items: list[Item] = []
    dropped: list[Dropped] = []
    for path in images_under(images, exclude):
        relative = path.relative_to(images)
        where = relative.as_posix()
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            top = relative.parts[0] if len(relative.parts) > 1 else TOP_LEVEL
            items.append(Item(source=path, name=flat_name(relative), caption=caption, where=where,
                              attributes={"sub-folder": top}, record={"from": where}))
        elif suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            dropped.append(Dropped(where, "unsupported image format",
                                   f"{path}: {suffix} is not read; convert it to PNG or JPEG to use it"))
        else:
            dropped.append(Dropped(where, "not an image", f"{path}: not an image (only {', '.join(IMAGE_EXTENSIONS)} are read)"))
    return Plan("folder", items, dropped, ["sub-folder"], [f"Every image under {images}, captioned {caption!r}."])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="the folder of images (searched recursively)")
    parser.add_argument("--caption", required=True, help='the caption of every image, e.g. "a photo of a hand"')
    add_output_arguments(parser, "the training folder to write, e.g. data/palms (images in OUT/1_hand/)")


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    caption = one_line(args.caption)
    if not caption:
        raise ConfigError("--caption is empty; give the caption every image gets, e.g. \"a photo of a hand\"")
    check_replaceable(options.out, options.overwrite)
    plan = plan_folder(Path(args.images).expanduser(), caption, (options.out,))
    result = write_plan(plan, options)
    report(result, options)
    return 0


COMMANDS = {
    "folder": ("every image under a folder, with one caption, as a training folder", add_arguments, run),
}
