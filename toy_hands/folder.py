"""Examples by (seed, index), rendered on demand or written as an image folder with captions."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from library.fileio import atomic_path, write_text_atomic
from toy_hands.draw import draw_hand, draw_object
from toy_hands.params import (
    HandParams, ObjectParams, caption_for, params_from_dict,
)
from toy_hands.random_hands import sample_hand_params, sample_object_params

MANIFEST = "toy_hands.jsonl"


def example_rng(seed: int, index: int) -> random.Random:
    """The generator for one example: example i depends on (seed, i) only, so folders can be written in
    chunks or in parallel and still match. (String seeds are hashed the same way in every process.)"""
    return random.Random(f"toy-hands:{seed}:{index}")


def sample_example(seed: int, index: int, *, counts: Mapping[int, float] | None = None,
                   five_finger_share: float | None = None, object_share: float = 0.0,
                   pose: str = "any") -> HandParams | ObjectParams:
    """Example `index` of the stream `seed`: a non-hand object with probability `object_share`, else a
    hand whose digit count follows `counts` / `five_finger_share` (default: always 5)."""
    rng = example_rng(seed, index)
    if rng.random() < object_share:
        return sample_object_params(rng)
    return sample_hand_params(rng, counts=counts, five_finger_share=five_finger_share, pose=pose)


def render(params: HandParams | ObjectParams, size: int = 64) -> Image.Image:
    return draw_object(params, size) if isinstance(params, ObjectParams) else draw_hand(params, size)


def write_hand_folder(folder: str | Path, count: int, seed: int = 0, *, size: int = 64,
                      counts: Mapping[int, float] | None = None, five_finger_share: float | None = None,
                      object_share: float = 0.0, start: int = 0, caption_extension: str = ".txt",
                      manifest: bool = True, pose: str = "any") -> list[Path]:
    """Write examples `start .. start+count-1` as `NNNNNN.png` + caption files; return the image paths.

    Every file is written atomically. With `manifest`, `toy_hands.jsonl` lists each example's file,
    caption and parameters (the true digit count included), replacing any earlier manifest: the
    measurement a study needs ("what share of the training hands had five digits?").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, records = [], []
    for index in range(start, start + count):
        params = sample_example(seed, index, counts=counts, five_finger_share=five_finger_share,
                                object_share=object_share, pose=pose)
        path = folder / f"{index:06d}.png"
        with atomic_path(path) as tmp:
            render(params, size).save(tmp, format="PNG")
        caption = caption_for(params)
        write_text_atomic(path.with_suffix(caption_extension), caption)
        paths.append(path)
        records.append({"file": path.name, "caption": caption, **params.to_dict()})
    if manifest:
        write_text_atomic(folder / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return paths


def read_manifest(folder: str | Path) -> list[tuple[str, HandParams | ObjectParams]]:
    """(file name, parameters) for each example listed in a folder's manifest."""
    out: list[tuple[str, Any]] = []
    for line in (Path(folder) / MANIFEST).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        name = record.pop("file")
        record.pop("caption")
        out.append((name, params_from_dict(record)))
    return out
