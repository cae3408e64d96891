"""The toy study's datasets: `prepare_dataset.py toy-hands --out data/toy_hands [--quick]`.

The toy world's counterpart of the 11k-hands / folder / from-ratings commands. It writes

    OUT/clean_hands/        rendered five-finger hands with captions (the LoRA and positive-TI rows' data)
    OUT/palms/              front views with five digits, no captions (DreamBooth's instance images)
    OUT/bad_generations/    the base model's own generations that the finger counter scored wrong, with the
    OUT/good_generations/   prompt as caption (the negative embeddings' data), and those it scored five
    OUT/summary.md, summary.json   the sizes, the seeds, the counts of the pool, and the command

The whole folder is built beside OUT and renamed onto it at the end (library.fileio.atomic_dir), so it is
there complete or not at all. A second run with the same settings finds it and does nothing; another size
(`--quick` after a full run) needs another --out. Every image is a function of its seed: two runs write the
same files, and the base model's generations come from a sample job (DDIM at CFG 7.5, as the study samples).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from library.errors import ConfigError
from library.fileio import atomic_dir, write_text_atomic
from library.schema import job_toml

log = logging.getLogger("pentadactyl")

CLEAN_STREAM = 3000   # seeds of the example streams the images and prompts come from (fixed, disjoint)
PALM_STREAM = 3100
POOL_PROMPT_STREAM = 5001
POOL_SEED = 20_000    # image seeds of the base model's generations (disjoint from every evaluation seed)
SIZE = 64
DATASET_POSE = "spread"  # fingers fanned, hand upright: photographed to a protocol, as 11K Hands and Palms are
SUMMARY = "summary.json"


@dataclass(frozen=True)
class DataPlan:
    clean_images: int = 200
    palm_images: int = 12
    pool_prompts: int = 8
    pool_seeds: int = 20
    pool_steps: int = 30


FULL = DataPlan()
QUICK = DataPlan(clean_images=32, palm_images=6, pool_prompts=4, pool_seeds=6, pool_steps=12)


def distinct_captions(stream: int, count: int) -> list[str]:
    """The first `count` distinct hand captions of an example stream (prompts in the pretraining grammar)."""
    from toy_hands.folder import sample_example
    from toy_hands.params import caption_for

    out: list[str] = []
    index = 0
    while len(out) < count:
        caption = caption_for(sample_example(stream, index, object_share=0.0))
        if caption not in out:
            out.append(caption)
        index += 1
    return out


def _palms(folder: Path, count: int) -> None:
    from toy_hands.folder import render, sample_example
    from toy_hands.params import HandParams

    folder.mkdir(parents=True)
    index = written = 0
    while written < count:
        params = sample_example(PALM_STREAM, index, pose=DATASET_POSE)
        index += 1
        if isinstance(params, HandParams) and params.view == "front":
            render(params, SIZE).save(folder / f"{written:03d}.png", format="PNG")
            written += 1


def _pool(root: Path, plan: DataPlan, model: Path) -> dict[str, int]:
    """The base model's generations, sorted by the finger counter into bad and good folders."""
    from library.config import load_job
    from library.evaluate.counter import count_fingers
    from library.sampling.run import run_sample_job

    prompts = distinct_captions(POOL_PROMPT_STREAM, plan.pool_prompts)
    seeds = list(range(POOL_SEED, POOL_SEED + plan.pool_seeds))
    job = root / ".base_generations.toml"
    write_text_atomic(job, job_toml({
        "pretrained_model_name_or_path": str(model), "output_dir": str(root / ".base_generations"),
        "output_name": "pool", "prompts": prompts, "seeds": seeds, "sampler": "ddim", "steps": plan.pool_steps,
        "cfg_scale": 7.5, "width": SIZE, "height": SIZE, "batch_size": len(seeds), "grid": False},
        comment="The toy base model's own generations, for the negative embeddings."))
    result = run_sample_job(load_job("sample", ["--config", str(job)]), progress=True)
    sizes = {"bad": 0, "good": 0}
    for kind in sizes:
        (root / f"{kind}_generations").mkdir()
    for generated in result.images:
        kind = "good" if count_fingers(generated.image) == 5 else "bad"
        path = root / f"{kind}_generations" / f"{sizes[kind]:04d}.png"
        generated.image.save(path, format="PNG")
        path.with_suffix(".txt").write_text(generated.spec.prompt + "\n", encoding="utf-8")
        sizes[kind] += 1
    shutil.rmtree(root / ".base_generations")
    job.unlink()
    return sizes


def prepare_toy_data(out: str | Path, plan: DataPlan = FULL, model: str | Path | None = None) -> dict:
    """Write the toy study's datasets to `out` (or find them written with the same settings); the summary."""
    from toy_hands import TOY_MODEL_PATH
    from toy_hands.folder import write_hand_folder

    out, model = Path(out), Path(model or TOY_MODEL_PATH)
    settings = {"plan": asdict(plan), "model": model.name}
    summary_path = out / SUMMARY
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("settings") == settings:
            log.info(f"toy-hands: {out} is prepared already")
            return summary
        raise ConfigError(f"--out {out}: it holds toy data of other settings ({summary.get('settings')}); "
                          "choose another --out, or delete the folder to write it again")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: the folder holds other files; choose an empty or new folder")
    if not model.is_file():
        raise ConfigError(f"--model {model}: no such file (the toy hand model ships as {TOY_MODEL_PATH})")
    with atomic_dir(out) as tmp:
        write_hand_folder(tmp / "clean_hands", plan.clean_images, seed=CLEAN_STREAM, pose=DATASET_POSE)
        _palms(tmp / "palms", plan.palm_images)
        pool = _pool(tmp, plan, model)
        summary = {"settings": settings, "clean_hands": plan.clean_images, "palms": plan.palm_images,
                   "bad_generations": pool["bad"], "good_generations": pool["good"]}
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        (tmp / "summary.md").write_text(
            f"# Toy hand data ({'quick' if plan == QUICK else 'full'})\n\n"
            f"- clean_hands: {plan.clean_images} rendered five-finger hands, pose '{DATASET_POSE}', captions in "
            "the pretraining grammar\n"
            f"- palms: {plan.palm_images} front views, no captions\n"
            f"- bad_generations / good_generations: {pool['bad']} / {pool['good']} of the base model's "
            f"{plan.pool_prompts} prompts × {plan.pool_seeds} seeds ({POOL_SEED}–{POOL_SEED + plan.pool_seeds - 1}, "
            f"DDIM {plan.pool_steps} steps, CFG 7.5), sorted by the finger counter (five or not)\n",
            encoding="utf-8")
    log.info(f"toy-hands: wrote {out}: {plan.clean_images} clean hands, {plan.palm_images} palms, "
             f"{pool['bad']} bad and {pool['good']} good generations")
    return summary


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the data folder (the toy study files read data/toy_hands "
                        "and, with --quick, data/toy_hands_quick)")
    parser.add_argument("--quick", action="store_true", help="the quick study's smaller data")
    parser.add_argument("--model", help="the base model whose generations fill the pool (default: the toy model)")


def _run(args: argparse.Namespace) -> int:
    prepare_toy_data(args.out, QUICK if args.quick else FULL, args.model)
    return 0


COMMANDS = {"toy-hands": ("the toy study's datasets: clean hands, palms, the base model's generations "
                          "sorted by the finger counter", _add_arguments, _run)}
