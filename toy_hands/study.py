"""The hand study in miniature, in one command, on the pretrained toy hand model:

    python -m toy_hands.study --out toy_study            (about 34 minutes on 2 CPU cores)
    python -m toy_hands.study --out toy_study --quick    (a few minutes: the same steps, smaller)

Every row trains through the public scripts (train_network.py, train_textual_inversion.py,
train_dreambooth.py) from a TOML job written to <out>/jobs/, and every image comes from a sample job
(sample.py's code) on fixed prompts and seeds: DDIM at CFG 7.5, as in the study. The finger counter
scores each row; the same seeds on non-hand prompts show how far a method disturbs everything else.

Rows: the base model; LoRA attention-only r4 and r64 and LoCon (conv + text encoder) on clean
five-finger hands; a positive embedding trained on the same hands; a negative embedding trained on the
base model's own bad generations, and its contrastive variant (against the base model's good
generations); DreamBooth LoRA on "palms" (front views) with prior preservation; and the r64 LoRA at
several multipliers. Outputs in <out>/: results.md (the tables), results.json (every number),
score_vs_step.png (five-finger rate against training step), grid.png (the same seeds, row by row).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from library.fileio import atomic_path, write_text_atomic
from library.schema import job_toml
from toy_hands import TOY_MODEL_PATH
from library.evaluate.counter import count_fingers
from toy_hands.folder import render, sample_example, write_hand_folder
from toy_hands.params import HandParams, ObjectParams, caption_for
from toy_hands.report import HandScore, markdown_table, pixel_change, write_line_plot

log = logging.getLogger("pentadactyl")

PROMPT_STREAM = 5000  # seeds of the example streams the prompts and images come from (fixed, disjoint)
CLEAN_STREAM = 3000
PALM_STREAM = 3100
# image seeds of the scored rows: dev for choosing anything (the shipped model and settings were chosen on
# them), test for reporting (fresh: nothing was chosen on them)
EVAL_SEEDS = {"dev": 10_000, "test": 30_000}
POOL_SEED = 20_000  # image seeds of the base model's generations for the negative embeddings
SIZE = 64
DATASET_POSE = "spread"  # the pose of the clean and palm datasets (params.POSES)


@dataclass(frozen=True)
class Plan:
    """How big each part of the study is."""

    eval_prompts: int = 8
    eval_seeds: int = 25  # images per row = eval_prompts × eval_seeds
    object_prompts: int = 4
    object_seeds: int = 10
    curve_prompts: int = 4
    curve_seeds: int = 12
    clean_images: int = 200
    palm_images: int = 12
    class_images: int = 60
    pool_prompts: int = 8
    pool_seeds: int = 20
    steps: int = 300
    checkpoint_every: int = 100
    sample_steps: int = 30
    batch: int = 8
    multipliers: tuple[float, ...] = (0.5, 1.5)


FULL = Plan()
QUICK = Plan(eval_prompts=4, eval_seeds=6, object_prompts=2, object_seeds=3, curve_prompts=2, curve_seeds=4,
             clean_images=32, palm_images=6, class_images=8, pool_prompts=4, pool_seeds=6, steps=24,
             checkpoint_every=12, sample_steps=12, batch=4, multipliers=(0.5,))


# The LoRA rows: (key, label, network keys of the job, the job file's comment).
_ATTENTION = {"network_args": ["preset=attention_qkvo"], "network_train_unet_only": True}
NETWORK_ROWS: list[tuple[str, str, dict[str, Any], str]] = [
    ("lora_attn_r4", "LoRA attention r4", {"network_dim": 4, "network_alpha": 4, **_ATTENTION},
     "LoRA on the attention projections only (q, k, v, out), rank 4, on clean five-finger hands."),
    ("lora_attn_r64", "LoRA attention r64", {"network_dim": 64, "network_alpha": 64, **_ATTENTION},
     "LoRA on the attention projections only, rank 64, on clean five-finger hands."),
    ("locon_conv_te", "LoCon conv + TE", {"network_dim": 16, "network_alpha": 16,
                                          "network_args": ["conv_dim=8", "conv_alpha=8"], "text_encoder_lr": 5e-4},
     "LoCon: attention, feed-forward and convolution layers of the U-Net plus the text encoder."),
]


# ------------------------------------------------------------------------------------------ helpers

def write_job(path: Path, keys: dict[str, Any], subsets: Sequence[dict[str, Any]] = (),
              dataset: dict[str, Any] | None = None, comment: str = "") -> Path:
    datasets = [{**(dataset or {}), "subsets": list(subsets)}] if subsets else None
    write_text_atomic(path, job_toml(keys, datasets=datasets, comment=comment))
    return path


def distinct_captions(stream: int, count: int, kind: type) -> list[str]:
    out: list[str] = []
    index = 0
    while len(out) < count:
        params = sample_example(stream, index, object_share=1.0 if kind is ObjectParams else 0.0)
        caption = caption_for(params)
        if caption not in out:
            out.append(caption)
        index += 1
    return out


def with_sks(caption: str) -> str:
    return caption.replace(" hand", " sks hand", 1)


# ------------------------------------------------------------------------------------------ the study

class Study:
    def __init__(self, out: Path, plan: Plan, model: Path, seed_set: str = "dev"):
        self.out, self.plan, self.model, self.seed_set = out, plan, model, seed_set
        self.jobs, self.data, self.trained, self.samples = (out / d for d in ("jobs", "data", "output", "samples"))
        self.hand_prompts = distinct_captions(PROMPT_STREAM, plan.eval_prompts, HandParams)
        self.object_prompts = distinct_captions(PROMPT_STREAM, plan.object_prompts, ObjectParams)
        self.pool_prompts = distinct_captions(PROMPT_STREAM + 1, plan.pool_prompts, HandParams)
        self.eval_seeds = list(range(EVAL_SEEDS[seed_set], EVAL_SEEDS[seed_set] + plan.eval_seeds))
        self.object_seeds = self.eval_seeds[: plan.object_seeds]
        self.rows: dict[str, dict[str, Any]] = {}
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.sweep: list[dict[str, Any]] = []
        self.images: dict[str, list[Image.Image]] = {}
        self.base_objects: list[Image.Image] = []

    # ---- sampling through sample jobs
    def sample(self, name: str, prompts: Sequence[str], seeds: Sequence[int], **keys: Any):
        from library.config import load_job
        from library.sampling.run import run_sample_job

        plan = self.plan
        job_path = write_job(self.jobs / f"sample_{name}.toml", {
            "pretrained_model_name_or_path": str(self.model), "output_dir": str(self.samples / name),
            "output_name": name, "prompts": list(prompts), "seeds": list(seeds), "sampler": "ddim",
            "steps": plan.sample_steps, "cfg_scale": 7.5, "width": SIZE, "height": SIZE,
            "batch_size": len(seeds), "grid": False, **keys})
        return run_sample_job(load_job("sample", ["--config", str(job_path)]), progress=False)

    def score(self, name: str, hand_prompts: Sequence[str], **keys: Any) -> HandScore:
        result = self.sample(name, hand_prompts, self.eval_seeds, **keys)
        images = [im.image for im in result.images]
        self.images[name] = images
        return HandScore([count_fingers(im) for im in images])

    def object_change(self, name: str, **keys: Any) -> float:
        images = [im.image for im in self.sample(f"{name}_objects", self.object_prompts, self.object_seeds,
                                                 **keys).images]
        if not self.base_objects:
            self.base_objects = images
        return pixel_change(images, self.base_objects)

    def curve_score(self, name: str, **keys: Any) -> float:
        prompts = self.hand_prompts[: self.plan.curve_prompts]
        seeds = self.eval_seeds[: self.plan.curve_seeds]
        result = self.sample(name, prompts, seeds, **keys)
        return HandScore([count_fingers(im.image) for im in result.images]).five_rate

    def add_row(self, key: str, label: str, score: HandScore, change: float, seconds: float | None,
                steps: int | None, files: Sequence[Path] = ()) -> None:
        self.rows[key] = {"label": label, **score.to_dict(), "non_hand_change": round(change, 4),
                          "train_seconds": None if seconds is None else round(seconds, 1), "train_steps": steps,
                          "files": [str(f) for f in files]}
        lo, hi = score.interval()
        log.info(f"study: {label}: five-finger rate {score.five_rate:.1%} [{lo:.1%}, {hi:.1%}] over "
                 f"{score.images} images; non-hand change {change:.2%}")

    # ---- data
    def write_data(self) -> None:
        plan = self.plan
        # The fine-tuning sets are photographed to a protocol, as the study's were (11K Hands, Palms):
        # five digits, fingers fanned, hand upright; the captions follow the same grammar as pretraining.
        write_hand_folder(self.data / "clean_hands", plan.clean_images, seed=CLEAN_STREAM, pose=DATASET_POSE)
        palms = self.data / "palms"
        palms.mkdir(parents=True, exist_ok=True)
        index = written = 0
        while written < plan.palm_images:  # front views ("palms") with five digits, no caption files
            params = sample_example(PALM_STREAM, index, pose=DATASET_POSE)
            index += 1
            if isinstance(params, HandParams) and params.view == "front":
                with atomic_path(palms / f"{written:03d}.png") as tmp:
                    render(params, SIZE).save(tmp, format="PNG")
                written += 1

    def write_generations(self) -> dict[str, int]:
        """The base model's own generations, sorted by the counter into bad and good folders (with the
        prompt as caption), for the negative embeddings."""
        seeds = list(range(POOL_SEED, POOL_SEED + self.plan.pool_seeds))
        result = self.sample("base_pool", self.pool_prompts, seeds)
        folders = {"bad": self.data / "bad_generations", "good": self.data / "good_generations"}
        sizes = {"bad": 0, "good": 0}
        for generated in result.images:
            kind = "good" if count_fingers(generated.image) == 5 else "bad"
            path = folders[kind] / f"{sizes[kind]:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                generated.image.save(tmp, format="PNG")
            write_text_atomic(path.with_suffix(".txt"), generated.spec.prompt)
            sizes[kind] += 1
        return sizes

    # ---- training through the public scripts
    def common_keys(self, name: str) -> dict[str, Any]:
        plan = self.plan
        return {"pretrained_model_name_or_path": str(self.model), "output_dir": str(self.trained),
                "output_name": name, "seed": 1234, "max_train_steps": plan.steps, "train_batch_size": plan.batch,
                "optimizer_type": "AdamW", "lr_scheduler": "constant", "mixed_precision": "no",
                "cache_latents": True, "save_every_n_steps": plan.checkpoint_every, "save_precision": "float",
                "max_data_loader_n_workers": 0}

    def train(self, script: str, name: str, keys: dict[str, Any], subsets: Sequence[dict[str, Any]],
              comment: str):
        job = write_job(self.jobs / f"{name}.toml", {**self.common_keys(name), **keys}, subsets,
                        {"resolution": SIZE, "enable_bucket": False, "caption_extension": ".txt"}, comment)
        module = __import__(script)
        began = time.perf_counter()
        result = module.main(["--config", str(job)])
        return result, time.perf_counter() - began

    def checkpoints(self, name: str, suffix: str = ".safetensors") -> list[tuple[int, Path]]:
        out = []
        for path in sorted(self.trained.glob(f"{name}-step*{suffix}")):
            out.append((int(path.stem.rsplit("-step", 1)[1]), path))
        return out

    def network_row(self, key: str, label: str, network_keys: dict[str, Any], comment: str) -> None:
        clean = {"image_dir": str(self.data / "clean_hands"), "num_repeats": 1}
        keys = {"network_module": "networks.lora", "learning_rate": 1e-3, **network_keys}
        result, seconds = self.train("train_network", key, keys, [clean], comment)
        final = result.final_files[0]
        score = self.score(key, self.hand_prompts, networks=[str(final)])
        self.add_row(key, label, score, self.object_change(key, networks=[str(final)]), seconds,
                     result.global_step, [final])
        curve = [(0, self.base_curve)]
        for step, path in [*self.checkpoints(key), (result.global_step, final)]:
            curve.append((step, self.curve_score(f"{key}_step{step}", networks=[str(path)])))
        self.curves[label] = curve

    def run(self) -> dict[str, Any]:
        plan, began = self.plan, time.perf_counter()
        stages = tqdm(total=10, desc="study", unit="stage")
        timings: dict[str, float] = {}

        def stage(name: str, t0: float) -> None:
            timings[name] = round(time.perf_counter() - t0, 1)
            stages.set_postfix_str(name)
            stages.update()

        t0 = time.perf_counter()
        self.write_data()
        base = self.score("base", self.hand_prompts)
        self.add_row("base", "base model", base, self.object_change("base"), None, None)
        self.base_curve = self.curve_score("base_curve")
        pool = self.write_generations()
        stage("base model and data", t0)

        for key, label, keys, comment in NETWORK_ROWS:
            t0 = time.perf_counter()
            self.network_row(key, label, keys, comment)
            stage(label, t0)

        t0 = time.perf_counter()
        ti_keys = {"init_word": "hand", "learning_rate": 5e-3}
        result, seconds = self.train("train_textual_inversion", "goodhand", {
            **ti_keys, "token_string": "goodhand", "num_vectors_per_token": 1},
            [{"image_dir": str(self.data / "clean_hands"), "caption_prefix": "goodhand"}],
            "Positive embedding on clean five-finger hands; prompts then carry the token.")
        emb = result.final_files[0]
        prompts = [f"goodhand {p}" for p in self.hand_prompts]
        self.add_row("ti_positive", "positive TI (goodhand)", self.score("ti_positive", prompts, embeddings=[str(emb)]),
                     self.object_change("ti_positive", embeddings=[str(emb)]), seconds, result.global_step, [emb])
        stage("positive TI", t0)

        for key, label, name, extra in (
                ("ti_negative", "negative TI (badhand)", "badhand", {}),
                ("ti_contrastive", "contrastive negative TI", "contrastbad",
                 {"contrastive_data_dir": str(self.data / "good_generations")})):
            t0 = time.perf_counter()
            if pool["bad"] == 0 or (extra and pool["good"] == 0):
                log.warning(f"study: {label} skipped: the base model's generations gave {pool['bad']} bad and "
                            f"{pool['good']} good hands")
                stage(label, t0)
                continue
            result, seconds = self.train("train_textual_inversion", name, {
                **ti_keys, "token_string": name, "num_vectors_per_token": 2, **extra},
                [{"image_dir": str(self.data / "bad_generations"), "caption_prefix": name}],
                "Negative embedding from the base model's own bad generations (counted by the finger counter).")
            emb = result.final_files[0]
            keys = {"embeddings": [str(emb)], "negative_prompt": name}
            self.add_row(key, label, self.score(key, self.hand_prompts, **keys), self.object_change(key, **keys),
                         seconds, result.global_step, [emb])
            stage(label, t0)

        t0 = time.perf_counter()
        result, seconds = self.train("train_dreambooth", "dreambooth_palms", {
            "dreambooth_mode": "lora", "network_module": "networks.lora", "network_dim": 16, "network_alpha": 16,
            "network_args": ["preset=attention_qkvo"], "learning_rate": 1e-3, "prior_loss_weight": 1.0,
            "class_prompt": "front of hand", "num_class_images": plan.class_images, "class_image_steps": plan.sample_steps,
            "class_image_sampler": "ddim", "class_image_batch_size": plan.batch},
            [{"image_dir": str(self.data / "palms"), "class_tokens": "front of sks hand",
              "num_repeats": max(1, plan.class_images // plan.palm_images)},
             {"image_dir": str(self.data / "class_hand"), "is_reg": True}],
            "DreamBooth (LoRA) on palms, with prior preservation on the base model's own class images.")
        final = result.final_files[0]
        self.add_row("dreambooth_palms", "DreamBooth LoRA (palms)",
                     self.score("dreambooth_palms", [with_sks(p) for p in self.hand_prompts], networks=[str(final)]),
                     self.object_change("dreambooth_palms", networks=[str(final)]), seconds, result.global_step,
                     [final])
        stage("DreamBooth", t0)

        t0 = time.perf_counter()
        r64 = self.rows["lora_attn_r64"]["files"][0]
        sweep = self.sample("sweep_r64", self.hand_prompts, self.eval_seeds, networks=[r64],
                            sweep_multipliers=list(plan.multipliers))
        per_run = len(self.hand_prompts) * len(self.eval_seeds)
        points = {0.0: self.rows["base"], 1.0: self.rows["lora_attn_r64"]}
        for m, run in zip(plan.multipliers, sweep.runs):
            points[m] = HandScore([count_fingers(im.image) for im in run.images[:per_run]]).to_dict()
        self.sweep = [{"multiplier": m, "five_finger_rate": points[m]["five_finger_rate"]} for m in sorted(points)]
        stage("multiplier sweep", t0)

        t0 = time.perf_counter()
        results = self.write_outputs(pool, time.perf_counter() - began)
        stage("report", t0)
        stages.close()
        results["timings"] = timings
        return results

    # ---- outputs
    def write_outputs(self, pool: dict[str, int], seconds: float) -> dict[str, Any]:
        from library.sampling.grid import image_grid

        base = self.rows["base"]["five_finger_rate"]
        rows = []
        for row in self.rows.values():
            lo, hi = row["interval95"]
            ratio = f"{row['five_finger_rate'] / base:.1f}×" if base > 0 else "—"
            rows.append([row["label"], f"{row['five_finger_rate']:.1%} [{lo:.0%}–{hi:.0%}]", ratio,
                         f"{row['no_hand_rate']:.1%}", f"{row['mean_count_error']:.2f}",
                         f"{row['non_hand_change']:.1%}",
                         "—" if row["train_seconds"] is None else f"{row['train_steps']} / {row['train_seconds']:.0f} s"])
        table = markdown_table(["row", "five-finger rate [95% CI]", "vs base", "no hand", "mean count error",
                                "non-hand change", "steps / train time"], rows)
        sweep_table = markdown_table(["multiplier", *[f"{p['multiplier']:g}" for p in self.sweep]],
                                     [["five-finger rate", *[f"{p['five_finger_rate']:.1%}" for p in self.sweep]]])
        plan = self.plan
        text = (f"# Toy hand study ({'quick' if plan == QUICK else 'full'} run, {self.seed_set} seeds "
                f"{self.eval_seeds[0]}–{self.eval_seeds[-1]})\n\n"
                f"Model: `{self.model.name}`. Each row: {len(self.hand_prompts)} hand prompts × "
                f"{len(self.eval_seeds)} seeds = {len(self.hand_prompts) * len(self.eval_seeds)} images, DDIM "
                f"{plan.sample_steps} steps, CFG 7.5, scored by the finger counter. Non-hand change: mean absolute "
                f"pixel change on {len(self.object_prompts)} object prompts × {len(self.object_seeds)} seeds against "
                f"the base model. Negative embeddings were trained on {pool['bad']} bad generations of the base model "
                f"(contrast: {pool['good']} good ones). Wall time {seconds / 60:.1f} min.\n\n"
                f"{table}\nLoRA attention r64 at other multipliers (0 is the base model):\n\n{sweep_table}\n"
                "![five-finger rate against training step](score_vs_step.png)\n")
        write_text_atomic(self.out / "results.md", text)
        write_line_plot(self.out / "score_vs_step.png", self.curves, "five-finger rate during training",
                        "training step", "five-finger rate", baseline=self.base_curve)
        columns = min(8, len(self.eval_seeds))
        keys = list(self.images)
        grid = image_grid([self.images[k][:columns] for k in keys], [self.rows[k]["label"] for k in keys], [])
        with atomic_path(self.out / "grid.png") as tmp:
            grid.save(tmp, format="PNG")
        results = {"plan": asdict(self.plan), "model": str(self.model), "seed_set": self.seed_set,
                   "hand_prompts": self.hand_prompts,
                   "object_prompts": self.object_prompts, "eval_seeds": self.eval_seeds, "pool": pool,
                   "rows": self.rows, "curves": self.curves, "sweep": self.sweep, "wall_seconds": round(seconds, 1)}
        write_text_atomic(self.out / "results.json", json.dumps(results, indent=1) + "\n")
        return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Run the hand study in miniature on the toy hand model.")
    parser.add_argument("--out", default="toy_study", help="results folder (default: toy_study)")
    parser.add_argument("--quick", action="store_true", help="the same study at a fraction of the size (for CI)")
    parser.add_argument("--model", default=str(TOY_MODEL_PATH), help="the base model (default: the toy hand model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seeds", choices=sorted(EVAL_SEEDS), default="dev",
                        help="evaluation seeds: dev (what the settings were chosen on) or test (fresh, for reporting)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "results.json").exists() or (out / "jobs").exists():
        from library.errors import ConfigError

        raise ConfigError(f"{out} already holds a study; choose another --out or delete the folder.")
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, QUICK if args.quick else FULL, Path(args.model), args.seeds)
    results = study.run()
    print(f"wrote {out / 'results.md'} ({results['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
