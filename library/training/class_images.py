"""DreamBooth's class images: count what the class folder holds, generate the missing ones, reuse them.

    plan = plan_class_images(folder, "a photo of hand", wanted=200, seed=42)
    plan.missing            # [(path, seed), ...]: files to write, never the name of an existing file
    generate_class_images([plan], sampler, "", steps=30, cfg_scale=7.5, sampler_name="ddim", batch_size=4)

Rules:
* Every image already in the folder counts, the user's own and earlier generated ones alike; only
  `wanted - existing` images are made. Nothing existing is opened for writing: a generated image gets a
  name `class_NNNNN.png` whose stem no file in the folder has (so a user's `class_00003.jpg` or a lone
  `class_00003.txt` keeps its name to itself).
* Image NNNNN is always made with seed `seed + NNNNN`, in the same batch: the `batch_size` seeds of its
  block (NNNNN rounded down to a multiple of batch_size, and on), at place NNNNN % batch_size, however many
  images are missing. Batched kernels round differently in another batch shape, so only the same batch
  makes the same bytes; with it, asking for 300 after 200 adds byte for byte the files a fresh run of 300
  would have, and a run interrupted half-way resumes with the same files (same model, settings, batch
  size and machine). A block that needs fewer images is still rendered whole: at most batch_size - 1
  images are made and dropped per block, usually only in the last one.
* Each image is written (atomically, with A1111's `parameters` text) before its caption file, which
  holds the class prompt. An image whose caption was lost to an interruption is still captioned with
  the class prompt: the reg subset's class_tokens fall back to it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from library.dataset.images import list_images
from library.errors import DatasetError

log = logging.getLogger("pentadactyl")

NAME_PREFIX = "class_"
NAME_DIGITS = 5


@dataclass
class ClassImagePlan:
    folder: Path
    prompt: str
    wanted: int
    existing: int
    missing: list[tuple[Path, int]] = field(default_factory=list)  # (image path, seed), in index order
    width: int = 512
    height: int = 512


def plan_class_images(folder: Path, prompt: str, wanted: int, seed: int,
                      size: tuple[int, int] = (512, 512)) -> ClassImagePlan:
    """What to generate so that `folder` holds at least `wanted` images (a pure look at the folder)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"class image folder '{folder}' is a file; give a folder (it is created if missing).")
    images = list_images(folder) if folder.is_dir() else []
    plan = ClassImagePlan(folder, prompt, wanted, len(images), width=size[0], height=size[1])
    need = wanted - len(images)
    if need <= 0:
        return plan
    taken = {p.stem.lower() for p in folder.iterdir()} if folder.is_dir() else set()
    index = 0
    while len(plan.missing) < need:
        stem = f"{NAME_PREFIX}{index:0{NAME_DIGITS}d}"
        if stem.lower() not in taken:
            plan.missing.append((folder / f"{stem}.png", seed + index))
        index += 1
    return plan


def check_writable(plan: ClassImagePlan, where: str) -> None:
    """A folder we must add to but cannot: say so before any model time is spent."""
    target = plan.folder if plan.folder.exists() else _existing_parent(plan.folder)
    if not os.access(target, os.W_OK | os.X_OK):
        raise DatasetError(
            f"{where}: class folder '{plan.folder}' holds {plan.existing} image(s) and num_class_images asks for "
            f"{plan.wanted}, but '{target}' is not writable. Make it writable, point the is_reg subset at a "
            f"writable folder, or set num_class_images to at most {plan.existing}.")


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def generate_class_images(plans: Sequence[ClassImagePlan], sampler, negative_prompt: str, steps: int,
                          cfg_scale: float, sampler_name: str, batch_size: int) -> list[Path]:
    """Render every plan's missing images with `sampler` (a library.sampling.Sampler); return the new files.

    Every batch holds `batch_size` seeds laid out by file number (`batch_layout`), so an image's bytes do
    not depend on which others are missing. Models are put in eval mode and the global RNG states restored
    afterwards (the sampler's own rule), so generating class images does not change the training run that follows.
    """
    from tqdm import tqdm

    from library.fileio import write_text_atomic
    from library.sampling import PromptSpec, save_png_atomic
    from library.sampling.pipeline import preserved_training_state

    layouts = [(plan, batch_layout(plan.missing, batch_size)) for plan in plans]
    total = sum(len(seeds) for _, batches in layouts for seeds, _ in batches)
    if total == 0:
        return []
    written: list[Path] = []
    modules = [sampler.unet, sampler.vae, sampler.text_encoder, *sampler.eval_modules]
    with preserved_training_state(modules), tqdm(total=total, desc="class images", unit="image") as bar:
        for plan, batches in layouts:
            if not batches:
                continue
            plan.folder.mkdir(parents=True, exist_ok=True)
            spec = PromptSpec(prompt=plan.prompt, negative_prompt=negative_prompt, width=plan.width,
                              height=plan.height, steps=steps, cfg_scale=cfg_scale, sampler=sampler_name,
                              source="class_prompt")
            for seeds, paths in batches:
                images = sampler.generate(spec, seeds, batch_size=batch_size, bar=bar)
                for place, path in paths.items():
                    image = images[place]
                    if image.problem:
                        log.warning(f"class image {path.name}: {image.problem}")
                    for target in (path, path.with_suffix(".txt")):
                        if target.exists():  # appeared since planning: never overwrite
                            raise DatasetError(f"'{target}' appeared while class images were being generated; "
                                               "run again (existing images are counted, none is overwritten).")
                    save_png_atomic(image.image, path, image.parameters)
                    write_text_atomic(path.with_suffix(".txt"), plan.prompt)
                    written.append(path)
    return written


def batch_layout(missing: Sequence[tuple[Path, int]], batch_size: int) -> list[tuple[list[int], dict[int, Path]]]:
    """The batches that render `missing`: (the block's seeds, {place in the batch: file to write}), in index order.

    Image NNNNN sits at place NNNNN % batch_size among the seeds of its block, whichever images of the block
    exist already: the same batch every time, hence the same bytes (see the module's rules).
    """
    batches: dict[int, tuple[list[int], dict[int, Path]]] = {}
    for path, seed in missing:
        place = int(path.stem[len(NAME_PREFIX):]) % batch_size
        first = seed - place
        batches.setdefault(first, ([first + k for k in range(batch_size)], {}))[1][place] = path
    return list(batches.values())
