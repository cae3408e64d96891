"""`evaluate.py train-classifier` and `evaluate.py score`: a classifier learns the ratings, then scores new images.

As in the study, the classifier separates images rated 0 (wrong digit count or deformed) from images rated 1
(a good hand); half credit, "no hand" and images the raters disagree on are left out of training. With
`--backbone DIR` (a local CLIP or ViT folder) the backbone stays frozen and a logistic regression learns its
image features; without one a small CNN is trained from scratch. Images of one prompt × seed cell (the same
prompt and seed in several runs: near-duplicates) are all on the same side of the held-out split, so the
held-out accuracy is not flattered by an image's twin in the training set.

The output folder holds `classifier.safetensors` (the weights) and `classifier.json` (what it is, how it was
trained, its held-out accuracy); both are written atomically, never pickled. `score` writes each image's
predicted probability of a rating of 1 to the `predictions` table under the classifier's name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from library.errors import ConfigError
from library.evaluate.metrics import (
    _check_model_folder, _embedding, _warn_missing, batches, image_processor, open_rgb, pick_device, readable,
    selected_images,
)

log = logging.getLogger("pentadactyl")

FORMAT = "pentadactyl-rating-classifier"
VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "classifier.json", "classifier.safetensors"
CNN_WIDTHS = (16, 32, 64)
MIN_PER_CLASS = 4
SOURCES = {"human": "source = 'human'", "counter": "source = 'counter'", "all": "1"}


# ---------------------------------------------------------------------------------------------- the data
@dataclass(frozen=True)
class Labelled:
    image_id: int
    path: Path
    label: int  # 1: rated 1 (good hand), 0: rated 0
    cell: tuple  # (prompt, seed), or the image itself when it has neither


def labelled_images(conn: sqlite3.Connection, db_path, source: str, runs: Sequence[str] | None):
    """The images every chosen rating puts at 0 or every one at 1, and how many were left out and why."""
    rows = {r["id"]: r for r in selected_images(conn, runs)}
    ratings = conn.execute(f"SELECT image_id, score, no_hand FROM ratings WHERE {SOURCES[source]}").fetchall()
    scores: dict[int, list] = {}
    for image_id, score, no_hand in ratings:
        if image_id in rows:
            scores.setdefault(image_id, []).append(None if no_hand else score)
    chosen, left_out = [], {"half credit or raters disagree": 0, "no hand": 0}
    for image_id, given in scores.items():
        if None in given:
            left_out["no hand"] += 1
        elif set(given) in ({0.0}, {1.0}):
            chosen.append((rows[image_id], int(given[0])))
        else:
            left_out["half credit or raters disagree"] += 1
    found, missing = readable(db_path, [r for r, _ in chosen])
    _warn_missing(missing)
    label_of = {r["id"]: label for r, label in chosen}
    items = [Labelled(r["id"], p, label_of[r["id"]],
                      (r["prompt"], r["seed"]) if r["prompt"] is not None or r["seed"] is not None else ("image", r["id"]))
             for r, p in found]
    return items, left_out


def split_by_cell(items: Sequence[Labelled], held_out: float, seed: int) -> tuple[list[Labelled], list[Labelled]]:
    """(training, held out): whole prompt × seed cells go to the held-out side, in an order shuffled by
    `seed`, until it holds at least `held_out` of each label's images (a cell counts under its commoner
    label), so both labels are held out in about their share."""
    per_cell: dict[tuple, list[int]] = {}
    for it in items:
        per_cell.setdefault(it.cell, []).append(it.label)
    rng = random.Random(seed)
    test_cells: set[tuple] = set()
    for label in (0, 1):
        cells = sorted((c for c, labels in per_cell.items() if int(2 * sum(labels) >= len(labels)) == label),
                       key=repr)
        rng.shuffle(cells)
        target, count = held_out * sum(len(per_cell[c]) for c in cells), 0
        for cell in cells:
            if count >= target:
                break
            test_cells.add(cell)
            count += len(per_cell[cell])
    return [it for it in items if it.cell not in test_cells], [it for it in items if it.cell in test_cells]


# ---------------------------------------------------------------------------------------------- the models
def small_cnn(widths: Sequence[int] = CNN_WIDTHS):
    """Conv–BN–ReLU–pool blocks, global average, one logit."""
    from torch import nn

    layers, cin = [], 3
    for width in widths:
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1))


def pixels(paths: Sequence[Path], size: int):
    """(N, 3, size, size) float tensor in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(open_rgb(p).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
              for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class Backbone:
    """A frozen local CLIP / ViT-style vision model: images → one feature vector each."""

    def __init__(self, folder: str | os.PathLike, device: str, flag: str = "--backbone"):
        import transformers

        self.folder, self.device = Path(folder), device
        _check_model_folder(self.folder, flag, "vision model (CLIP or ViT)")
        self.model_type = json.loads((self.folder / "config.json").read_text()).get("model_type")
        self.processor = image_processor(self.folder, flag)
        try:
            if self.model_type == "clip":
                model = transformers.CLIPModel.from_pretrained(str(self.folder), local_files_only=True,
                                                               use_safetensors=True)
            else:
                model = transformers.AutoModel.from_pretrained(str(self.folder), local_files_only=True,
                                                               use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{flag} {self.folder}: the vision model does not load "
                              f"({str(exc).splitlines()[0]})") from None
        self.model = model.to(device).eval().requires_grad_(False)

    def features(self, paths: Sequence[Path], batch_size: int, desc: str):
        import torch
        from tqdm import tqdm

        out = []
        for chunk in tqdm(list(batches(paths, batch_size)), desc=desc, unit="batch"):
            px = self.processor(images=[open_rgb(p) for p in chunk], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out.append(self._forward(px.to(self.device)).float().cpu())
        return torch.cat(out)

    def _forward(self, px):
        if self.model_type == "clip":
            return _embedding(self.model.get_image_features(pixel_values=px))
        output = self.model(pixel_values=px)
        pooled = getattr(output, "image_embeds", None)
        if pooled is None:
            pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            hidden = output.last_hidden_state
            pooled = hidden[:, 0] if hidden.dim() == 3 else hidden.mean(dim=(2, 3))
        return pooled.flatten(1)


def fit_logistic(x, y, l2: float = 1e-3, steps: int = 200):
    """Logistic regression on standardised features by L-BFGS: (weight (1, D), bias (1,), mean, std)."""
    import torch

    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    weight = torch.zeros(1, x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    target = y.float()

    def closure():
        opt.zero_grad()
        logits = (z @ weight.T).squeeze(1) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach(), mean, std


def logistic_probability(x, tensors: dict):
    import torch

    z = (x - tensors["feature_mean"]) / tensors["feature_std"]
    return torch.sigmoid((z @ tensors["head.weight"].T).squeeze(1) + tensors["head.bias"])


def train_cnn(x, y, epochs: int, batch_size: int, seed: int, device: str):
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = small_cnn().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    target = y.float()
    for _ in tqdm(range(epochs), desc="training the CNN", unit="epoch"):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for idx in batches(order, batch_size):
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # a mirrored hand has as many digits
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb.to(device)).squeeze(1),
                                                                        target[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def cnn_probability(model, x, batch_size: int, device: str):
    import torch

    with torch.no_grad():
        return torch.cat([torch.sigmoid(model(chunk.to(device)).squeeze(1)).cpu()
                          for chunk in batches(x, batch_size)]) if len(x) else torch.zeros(0)


# ---------------------------------------------------------------------------------------------- saving, loading
def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file())):
        raise ConfigError(f"--out {out}: exists and is not a classifier folder (no {CONFIG_NAME}); choose a new "
                          "folder, nothing in this one is replaced")


def save_classifier(out: Path, tensors: dict, config: dict) -> None:
    from library.fileio import atomic_dir, save_safetensors_atomic, write_text_atomic

    with atomic_dir(out) as tmp:
        save_safetensors_atomic(tensors, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        write_text_atomic(tmp / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def load_classifier(folder: str | os.PathLike, flag: str = "--classifier") -> tuple[dict, dict]:
    """(config, tensors) of a classifier folder; ConfigError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise ConfigError(f"{flag} {folder}: no {CONFIG_NAME} there; train a classifier with "
                          f"`python evaluate.py train-classifier --db DB --out {folder}`")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {folder}: {CONFIG_NAME} is not valid JSON ({exc}); train the classifier again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{flag} {folder}: {CONFIG_NAME} is not a pentadactyl rating classifier "
                          f"(format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version", 0) > VERSION:
        raise ConfigError(f"{flag} {folder}: made by a newer pentadactyl (classifier version {config['version']}); "
                          "update pentadactyl")
    if not weights_file.is_file():
        raise ConfigError(f"{flag} {folder}: no {WEIGHTS_NAME} beside {CONFIG_NAME}; train the classifier again")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{flag} {weights_file}: not a readable safetensors file ({exc}); train the classifier "
                          "again") from None
    return config, tensors


class Scorer:
    """A loaded classifier: image files → probability of a rating of 1."""

    def __init__(self, folder, device: str, backbone: str | None = None, flag: str = "--classifier"):
        self.config, self.tensors = load_classifier(folder, flag)
        self.device = device
        self.name = self.config["name"]
        if self.config["kind"] == "cnn":
            model = small_cnn(self.config["widths"])
            try:
                model.load_state_dict(self.tensors)
            except RuntimeError as exc:
                raise ConfigError(f"{flag} {folder}: {WEIGHTS_NAME} does not fit {CONFIG_NAME} "
                                  f"({str(exc).splitlines()[0]}); train the classifier again") from None
            self.model = model.to(device).eval()
        else:
            path = backbone or self.config["backbone"]
            key = "--backbone" if backbone else f"{flag} {folder}: {CONFIG_NAME} backbone"
            if not Path(path).is_dir():
                raise ConfigError(f"{key} {path}: no such folder; give the folder the classifier was trained with "
                                  "as --backbone DIR")
            self.backbone = Backbone(path, device, "--backbone")
            width = self.tensors["head.weight"].shape[1]
            if "feature_mean" not in self.tensors or width != self.config["features"]:
                raise ConfigError(f"{flag} {folder}: {WEIGHTS_NAME} does not fit {CONFIG_NAME}; train again")

    def probabilities(self, paths: Sequence[Path], batch_size: int):
        if self.config["kind"] == "cnn":
            from tqdm import tqdm
            import torch

            out = [cnn_probability(self.model, pixels(chunk, self.config["image_size"]), batch_size, self.device)
                   for chunk in tqdm(list(batches(paths, batch_size)), desc="scoring", unit="batch")]
            return torch.cat(out) if out else torch.zeros(0)
        feats = self.backbone.features(paths, batch_size, "scoring")
        if feats.shape[1] != self.config["features"]:
            raise ConfigError(f"--backbone {self.backbone.folder}: gives {feats.shape[1]} features, the classifier "
                              f"was trained on {self.config['features']}; give the backbone it was trained with")
        return logistic_probability(feats, self.tensors)


# ---------------------------------------------------------------------------------------------- train-classifier
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database")
    parser.add_argument("--out", required=True, metavar="DIR", help="the classifier folder to write")
    parser.add_argument("--backbone", metavar="DIR", help="a local CLIP or ViT folder (config.json, model.safetensors, "
                        "preprocessor_config.json): frozen features + logistic regression; default: a small CNN")
    parser.add_argument("--name", help="the name predictions are stored under (default: the --out folder's name)")
    parser.add_argument("--source", choices=sorted(SOURCES), default="human",
                        help="which ratings to learn: human (default), counter (rate-with-counter), all")
    parser.add_argument("--run", action="append", metavar="NAME", help="only images of this run (repeatable)")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of images held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the CNN's training")
    parser.add_argument("--epochs", type=int, default=30, help="CNN epochs (default 30)")
    parser.add_argument("--image-size", type=int, default=64, help="CNN input side in pixels (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--device", default="auto")


def _accuracy_line(prob, items: Sequence[Labelled]) -> tuple[dict, str]:
    labels = [it.label for it in items]
    correct = sum(int((p >= 0.5) == bool(label)) for p, label in zip(prob.tolist(), labels))
    majority = max(labels.count(0), labels.count(1))
    cells = len({it.cell for it in items})
    held = {"images": len(items), "cells": cells, "correct": correct, "accuracy": correct / len(items),
            "majority_baseline": majority / len(items)}
    return held, (f"held-out accuracy {held['accuracy']:.3f} ({correct}/{len(items)} images in {cells} prompt × seed "
                  f"cells; always answering the commoner label: {held['majority_baseline']:.3f})")


def run_train(args: argparse.Namespace) -> int:
    import datetime

    import torch

    from library.evaluate.db import connect

    out = Path(args.out)
    _check_out(out)
    if not 0 < args.held_out < 1:
        raise ConfigError(f"--held-out {args.held_out}: must be between 0 and 1 (a share of the images)")
    for flag, value in (("--epochs", args.epochs), ("--image-size", args.image_size), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    device = pick_device(args.device)
    backbone = Backbone(args.backbone, device) if args.backbone else None
    conn = connect(args.db, create=False)
    try:
        items, left_out = labelled_images(conn, args.db, args.source, args.run)
    finally:
        conn.close()
    counts = {0: sum(it.label == 0 for it in items), 1: sum(it.label == 1 for it in items)}
    if min(counts.values()) < MIN_PER_CLASS:
        raise ConfigError(f"--db {args.db}: {counts[0]} images rated 0 and {counts[1]} rated 1 (ratings from "
                          f"--source {args.source}); a classifier needs at least {MIN_PER_CLASS} of each: rate more "
                          "images with `evaluate.py serve`")
    train, test = split_by_cell(items, args.held_out, args.seed)
    if not test or len({it.label for it in train}) < 2:
        raise ConfigError(f"--held-out {args.held_out}: the split by prompt × seed cell leaves "
                          f"{len(train)} training and {len(test)} held-out images; rate more cells or change --held-out")
    skipped = "".join(f"; {n} left out ({why})" for why, n in left_out.items() if n)
    print(f"training on {len(train)} images ({sum(it.label for it in train)} rated 1), holding out {len(test)}"
          f"{skipped}")
    y = torch.tensor([it.label for it in train])
    config = {"format": FORMAT, "version": VERSION, "name": args.name or out.resolve().name,
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "source": args.source, "runs": args.run, "seed": args.seed, "held_out_share": args.held_out,
              "trained_on": {"images": len(train), "rated_0": int((y == 0).sum()), "rated_1": int((y == 1).sum())},
              "held_out_images": [it.image_id for it in test]}
    if backbone is not None:
        x_train = backbone.features([it.path for it in train], args.batch_size, "features (training)")
        x_test = backbone.features([it.path for it in test], args.batch_size, "features (held out)")
        weight, bias, mean, std = fit_logistic(x_train, y)
        tensors = {"head.weight": weight, "head.bias": bias, "feature_mean": mean, "feature_std": std}
        prob = logistic_probability(x_test, tensors)
        config.update(kind="backbone-logistic", backbone=str(Path(args.backbone).resolve()),
                      backbone_type=backbone.model_type, features=int(x_train.shape[1]))
    else:
        model = train_cnn(pixels([it.path for it in train], args.image_size), y, args.epochs, args.batch_size,
                          args.seed, device)
        prob = cnn_probability(model, pixels([it.path for it in test], args.image_size), args.batch_size, device)
        tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        config.update(kind="cnn", widths=list(CNN_WIDTHS), image_size=args.image_size, epochs=args.epochs)
    held, line = _accuracy_line(prob, test)
    config["held_out"] = held
    save_classifier(out, tensors, config)
    print(line)
    print(f"classifier {config['name']!r} written to {out} (the model evaluated above, trained on the training "
          f"split only); fill predictions with `python evaluate.py score --db {args.db} --classifier {out}`")
    return 0


# ---------------------------------------------------------------------------------------------- score
def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database")
    parser.add_argument("--classifier", required=True, metavar="DIR", help="a folder written by train-classifier")
    parser.add_argument("--all", action="store_true", help="score every image, rated ones too (default: only "
                        "images without a human rating)")
    parser.add_argument("--run", action="append", metavar="NAME", help="only images of this run (repeatable)")
    parser.add_argument("--backbone", metavar="DIR", help="the backbone folder, when it moved since training")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")


def store_predictions(conn: sqlite3.Connection, model: str, values: Sequence[tuple[int, float]]) -> None:
    conn.execute("BEGIN")
    try:
        conn.executemany(
            "INSERT INTO predictions (image_id, model, score) VALUES (?, ?, ?) ON CONFLICT (image_id, model) DO "
            "UPDATE SET score = excluded.score, computed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            [(i, model, float(s)) for i, s in values])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def run_score(args: argparse.Namespace) -> int:
    from library.evaluate.db import connect

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    scorer = Scorer(args.classifier, pick_device(args.device), args.backbone)
    conn = connect(args.db, create=False)
    try:
        rows = selected_images(conn, args.run)
        if not args.all:
            rated = {r[0] for r in conn.execute("SELECT DISTINCT image_id FROM ratings WHERE source = 'human'")}
            rows = [r for r in rows if r["id"] not in rated]
        found, missing = readable(args.db, rows)
        _warn_missing(missing)
        if not found:
            print(f"score: no images to score ({'none registered' if args.all else 'every image has a human rating'}"
                  f"{'; give --all to score rated ones too' if not args.all else ''})")
            return 0
        by_run: dict[str, list[float]] = {}
        for chunk in batches(found, 256):  # stored as it goes: an interrupted run keeps what it scored
            prob = scorer.probabilities([p for _, p in chunk], args.batch_size).tolist()
            store_predictions(conn, scorer.name, [(r["id"], s) for (r, _), s in zip(chunk, prob)])
            for (r, _), s in zip(chunk, prob):
                by_run.setdefault(r["run"], []).append(s)
    finally:
        conn.close()
    total = sum(len(v) for v in by_run.values())
    print(f"score: {total} predictions stored as model {scorer.name!r} "
          f"({'every image' if args.all else 'images without a human rating'})")
    for run, values in sorted(by_run.items()):
        good = sum(v >= 0.5 for v in values)
        print(f"  {run}: {len(values)} images, mean predicted score {sum(values) / len(values):.3f}, "
              f"{good} ({100 * good / len(values):.1f} %) predicted good")
    return 0


COMMANDS = {
    "train-classifier": ("train a classifier on images rated 0 vs 1; reports its held-out accuracy",
                         add_train_arguments, run_train),
    "score": ("store a trained classifier's predicted score for images (unrated ones by default)",
              add_score_arguments, run_score),
}


def rate_with_classifier(conn: sqlite3.Connection, db_path, folder, device: str = "auto",
                         batch_size: int = 32) -> dict[str, int]:
    """The classifier as a judge (study.py's judge = "classifier"): every image it has not rated yet gets its
    predicted probability stored in `predictions` and a rating of 1 (p ≥ ½) or 0 with rater = the
    classifier's name and source = 'classifier', so that `report --source classifier` counts them.
    The classifier was fitted on 0 against 1, so it never gives ½ or "no hand"."""
    scorer = Scorer(folder, pick_device(device))
    done = {r[0] for r in conn.execute("SELECT image_id FROM ratings WHERE rater = ? AND source = 'classifier'",
                                       (scorer.name,))}
    found, missing = readable(db_path, [r for r in selected_images(conn, None) if r["id"] not in done])
    _warn_missing(missing)
    counts = {"good": 0, "bad": 0, "already": len(done), "missing": len(missing)}
    for chunk in batches(found, 256):
        prob = scorer.probabilities([p for _, p in chunk], batch_size).tolist()
        store_predictions(conn, scorer.name, [(r["id"], s) for (r, _), s in zip(chunk, prob)])
        conn.execute("BEGIN")
        for (row, _), p in zip(chunk, prob):
            conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand, source) VALUES (?, ?, ?, 0, "
                         "'classifier')", (row["id"], scorer.name, 1.0 if p >= 0.5 else 0.0))
            counts["good" if p >= 0.5 else "bad"] += 1
        conn.execute("COMMIT")
    return counts
