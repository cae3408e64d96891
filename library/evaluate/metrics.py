"""`evaluate.py metrics`: automatic metrics for the registered images, stored beside the ratings.

    clip_score   per image (table `metrics`): 100 × max(cos(image embedding, prompt embedding), 0) with a
                 CLIP model from a local folder (`--clip DIR`), the definition of Hessel et al. (2021)
                 without their 2.5 weight, as torchmetrics' CLIPScore reports it
    fid, kid     per run (table `set_metrics`) against a folder of real images (`--reference FOLDER`),
                 from the 2048 pool features of the FID Inception-v3 (`--inception FILE`, a local file)

Nothing is downloaded: every model comes from a path the user gives, read with local files only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from library.errors import ConfigError

log = logging.getLogger("pentadactyl")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KID_SUBSETS = 100  # the KID paper's and torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
FID_FEW_IMAGES = 2048  # below this many images per set the 2048 × 2048 covariance is rank-deficient


# ---------------------------------------------------------------------------------------------- the maths
def frechet_distance(a, b) -> float:
    """FID between two feature sets (rows are images): |μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½).

    Tr((Σa Σb)^½) is the sum of the square roots of the eigenvalues of Σa Σb, computed without a general
    matrix square root: with fewer images than dimensions, as the singular values of Xa Xbᵀ (Xa, Xb the
    centred features: Σa Σb and Xa Xbᵀ Xb Xaᵀ share their non-zero eigenvalues); else as the eigenvalues of
    the symmetric Σa^½ Σb Σa^½. Both are exact, and much faster than scipy's sqrtm on 2048 × 2048.
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two images in each set")
    xa, xb = a - a.mean(0), b - b.mean(0)
    scale = (len(a) - 1) * (len(b) - 1)
    if min(len(a), len(b)) <= a.shape[1]:
        trace_root = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(scale)
    else:
        cov_a, cov_b = xa.T @ xa / (len(a) - 1), xb.T @ xb / (len(b) - 1)
        w, v = np.linalg.eigh(cov_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    traces = (xa ** 2).sum() / (len(a) - 1) + (xb ** 2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + traces - 2 * trace_root)


def polynomial_kernel(x, y):
    """KID's kernel: (x·y / d + 1)³."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """The unbiased estimate of MMD² between two equally sized samples under the polynomial kernel."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((k_xx.sum() - k_xx.trace()) / (m * (m - 1)) + (k_yy.sum() - k_yy.trace()) / (m * (m - 1))
                 - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(a, b, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
                              seed: int = 0) -> tuple[float, float, int]:
    """KID: the mean and standard deviation of MMD² over random subsets; returns (mean, std, subset size).

    Each subset draws `subset_size` images of each set without replacement (fewer when a set is smaller).
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two images in each set")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values)), m


# ---------------------------------------------------------------------------------------------- images
def image_file(db_path: str | os.PathLike, stored: str) -> Path:
    """Where a registered image is: its path as stored, a relative one taken from the database's folder first."""
    path = Path(stored)
    if path.is_absolute():
        return path
    beside_db = Path(db_path).resolve().parent / path
    return beside_db if beside_db.exists() else Path.cwd() / path


def open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def reference_images(folder: str | os.PathLike, flag: str = "--reference") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: no such folder; give a folder of real images to compare the runs with")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ConfigError(f"{flag} {folder}: {len(files)} image(s) found ({', '.join(IMAGE_SUFFIXES)}); "
                          "FID and KID need at least two real images, thousands for stable values")
    return files


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def pick_device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here; use --device cpu")
    return name


def selected_images(conn: sqlite3.Connection, runs: Sequence[str] | None) -> list[sqlite3.Row]:
    sql = "SELECT id, path, run, prompt, seed FROM images"
    if runs:
        known = {r[0] for r in conn.execute("SELECT DISTINCT run FROM images")}
        unknown = [r for r in runs if r not in known]
        if unknown:
            raise ConfigError(f"--run {unknown[0]}: no such run in the database (runs: "
                              f"{', '.join(sorted(known)) or 'none; import images first'})")
        sql += f" WHERE run IN ({','.join('?' * len(runs))})"
    return list(conn.execute(sql + " ORDER BY id", tuple(runs or ())))


def readable(db_path, rows: Iterable[sqlite3.Row]) -> tuple[list[tuple[sqlite3.Row, Path]], list[Path]]:
    """(row, file) for the images whose file is there, and the files that are missing."""
    found, missing = [], []
    for row in rows:
        path = image_file(db_path, row["path"])
        if path.is_file():
            found.append((row, path))
        else:
            missing.append(path)
    return found, missing


def _warn_missing(missing: list[Path]) -> None:
    if missing:
        log.warning("%d registered image(s) are no longer on disk and were skipped (the first: %s)",
                    len(missing), missing[0])


# ---------------------------------------------------------------------------------------------- CLIP score
def _check_model_folder(folder: Path, flag: str, what: str) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: no such folder; expected a {what} folder written by "
                          "save_pretrained (config.json, model.safetensors)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{flag} {folder}: no config.json there; expected a {what} folder written by "
                          "save_pretrained (config.json, model.safetensors)")
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        raise ConfigError(f"{flag} {folder}: no model.safetensors there (weights are read from safetensors "
                          "only, never unpickled); save the model with save_pretrained(safe_serialization=True)")


def image_processor(folder: Path, flag: str):
    """The folder's image processor (the PIL implementation for CLIP, which needs no torchvision)."""
    import transformers

    if not (folder / "preprocessor_config.json").is_file():
        raise ConfigError(f"{flag} {folder}: no preprocessor_config.json there; save the model's image processor "
                          "into the folder too (processor.save_pretrained)")
    import json

    kind = json.loads((folder / "preprocessor_config.json").read_text()).get("image_processor_type", "")
    if kind.startswith("CLIPImageProcessor") and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    return transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)


def load_clip(folder: str | os.PathLike, device: str, flag: str = "--clip"):
    """(model, tokenizer, image processor) of a local CLIP folder; ConfigError naming `flag` when it is not one."""
    folder = Path(folder)
    _check_model_folder(folder, flag, "CLIP model")
    from transformers import AutoTokenizer, CLIPModel

    import json

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise ConfigError(f"{flag} {folder}: config.json says model_type {config.get('model_type')!r}; the CLIP "
                          "score needs a full CLIP model (model_type 'clip', image and text towers)")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        raise ConfigError(f"{flag} {folder}: no tokenizer there (tokenizer.json or vocab.json + merges.txt); "
                          "save the CLIP tokenizer into the folder too")
    processor = image_processor(folder, flag)
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {folder}: the CLIP model does not load ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, processor


def _embedding(output):
    """transformers 5 returns a model output from get_*_features, older versions a tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


def clip_scores(model, tokenizer, processor, images: Sequence, prompts: Sequence[str], device: str) -> list[float]:
    """100 × max(cos, 0) between each image and its prompt (prompts longer than the text tower are cut)."""
    import torch

    limit = model.config.text_config.max_position_embeddings
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        img = _embedding(model.get_image_features(pixel_values=pixels))
        txt = _embedding(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                 attention_mask=tokens["attention_mask"].to(device)))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
    return (100 * cos.clamp(min=0)).tolist()


def store_metrics(conn: sqlite3.Connection, name: str, values: Iterable[tuple[int, float]]) -> None:
    conn.execute("BEGIN")
    try:
        conn.executemany(
            "INSERT INTO metrics (image_id, name, value) VALUES (?, ?, ?) ON CONFLICT (image_id, name) DO UPDATE "
            "SET value = excluded.value, computed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            [(image_id, name, value) for image_id, value in values])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def run_clip_score(conn, db_path, rows, clip, device, batch_size: int, recompute: bool) -> str:
    """Score the images that have a prompt (and no clip_score yet unless `recompute`); `clip` is load_clip's."""
    from tqdm import tqdm

    done = set() if recompute else {r[0] for r in conn.execute("SELECT image_id FROM metrics WHERE name = 'clip_score'")}
    todo = [r for r in rows if r["id"] not in done]
    no_prompt = [r for r in todo if not r["prompt"]]
    found, missing = readable(db_path, [r for r in todo if r["prompt"]])
    _warn_missing(missing)
    if not found:
        return (f"clip_score: nothing to do ({len(done & {r['id'] for r in rows})} already scored, "
                f"{len(no_prompt)} without a prompt)")
    model, tokenizer, processor = clip
    values: list[float] = []
    for chunk in tqdm(list(batches(found, batch_size)), desc="CLIP score", unit="batch"):
        scores = clip_scores(model, tokenizer, processor, [open_rgb(p) for _, p in chunk],
                             [r["prompt"] for r, _ in chunk], device)
        store_metrics(conn, "clip_score", [(r["id"], s) for (r, _), s in zip(chunk, scores)])
        values += scores
    skipped = f"; skipped: {len(no_prompt)} without a prompt" if no_prompt else ""
    skipped += f", {len(missing)} missing files" if missing else ""
    return f"clip_score: {len(values)} images, mean {sum(values) / len(values):.2f}{skipped}"


# ---------------------------------------------------------------------------------------------- FID / KID
def inception_features(model, files: Sequence[Path], device: str, batch_size: int, desc: str):
    """(N, 2048) float64 features; images of one size are batched together (the network resizes to 299)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    out = np.zeros((len(files), 2048))
    bar = tqdm(total=len(files), desc=desc, unit="img")
    index = 0
    pending: list = []

    def flush():
        nonlocal index, pending
        if pending:
            x = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).to(device)
            with torch.no_grad():
                out[index:index + len(pending)] = model(x).double().cpu().numpy()
            index += len(pending)
            bar.update(len(pending))
            pending = []

    for path in files:
        pixels = np.asarray(open_rgb(path))
        if pending and (pixels.shape != pending[0].shape or len(pending) == batch_size):
            flush()
        pending.append(pixels)
    flush()
    bar.close()
    return out


def store_set_metric(conn, run: str, name: str, value: float, std: float | None, images: int, reference: str) -> None:
    conn.execute(
        "INSERT INTO set_metrics (run, name, value, std, images, reference) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (run, name) DO UPDATE SET value = excluded.value, std = excluded.std, images = excluded.images, "
        "reference = excluded.reference, computed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        (run, name, value, std, images, reference))


def run_fid_kid(conn, db_path, rows, reference: str, ref_files: Sequence[Path], model, device: str,
                batch_size: int, kid_subsets: int, kid_subset_size: int, seed: int) -> list[str]:
    ref = inception_features(model, ref_files, device, batch_size, "reference features")
    by_run: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    lines = []
    for run, run_rows in by_run.items():
        found, missing = readable(db_path, run_rows)
        _warn_missing(missing)
        if len(found) < 2:
            lines.append(f"run {run}: {len(found)} readable image(s); FID and KID need at least two, skipped")
            continue
        feats = inception_features(model, [p for _, p in found], device, batch_size, f"features of {run}")
        fid = frechet_distance(feats, ref)
        kid, kid_std, m = kernel_inception_distance(feats, ref, kid_subsets, kid_subset_size, seed)
        conn.execute("BEGIN")
        store_set_metric(conn, run, "fid", fid, None, len(found), str(reference))
        store_set_metric(conn, run, "kid", kid, kid_std, len(found), str(reference))
        conn.execute("COMMIT")
        few = min(len(found), len(ref_files)) < FID_FEW_IMAGES
        lines.append(f"run {run}: FID {fid:.2f}, KID {kid:.5f} ± {kid_std:.5f} ({len(found)} images against "
                     f"{len(ref_files)} real ones, KID subsets of {m})"
                     + ("; under 2048 images per set FID is biased upwards: compare runs of equal size only" if few else ""))
    return lines


# ---------------------------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (made by `evaluate.py import`)")
    parser.add_argument("--clip", metavar="DIR", help="a local CLIP model folder (config.json, model.safetensors, "
                        "tokenizer and preprocessor files): stores clip_score for each image with a prompt")
    parser.add_argument("--reference", metavar="FOLDER", help="a folder of real images: stores FID and KID of each run "
                        "against it (needs --inception)")
    parser.add_argument("--inception", metavar="FILE", help="the FID Inception-v3 weights (weights-inception-"
                        "2015-12-05-6726825d.pth, or a .safetensors copy); see the README")
    parser.add_argument("--run", action="append", metavar="NAME", help="only this run (repeat for several)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when there is one)")
    parser.add_argument("--recompute", action="store_true", help="compute clip_score again for images that have one")
    parser.add_argument("--kid-subsets", type=int, default=KID_SUBSETS)
    parser.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")


def run(args: argparse.Namespace) -> int:
    from library.evaluate.db import connect

    if not (args.clip or args.reference):
        raise ConfigError("metrics: nothing to compute; give --clip DIR (CLIP score) and/or --reference FOLDER "
                          "--inception FILE (FID, KID)")
    if args.reference and not args.inception:
        raise ConfigError(f"--reference {args.reference}: FID and KID also need --inception FILE, the Inception-v3 "
                          "weights (weights-inception-2015-12-05-6726825d.pth); see the README")
    if args.inception and not args.reference:
        raise ConfigError("--inception: give --reference FOLDER too, the real images FID and KID compare with")
    for flag, value in (("--batch-size", args.batch_size), ("--kid-subsets", args.kid_subsets),
                        ("--kid-subset-size", args.kid_subset_size)):
        if value < 1 or (flag == "--kid-subset-size" and value < 2):
            raise ConfigError(f"{flag} {value}: must be at least {2 if flag == '--kid-subset-size' else 1}")
    device = pick_device(args.device)
    conn = connect(args.db, create=False)
    try:
        rows = selected_images(conn, args.run)
        if not rows:
            raise ConfigError(f"--db {args.db}: no images registered; add some with "
                              f"`python evaluate.py import --db {args.db} FOLDER`")
        clip = load_clip(args.clip, device) if args.clip else None
        inception = ref_files = None
        if args.reference:  # every file is checked before the first metric spends time
            from library.evaluate.inception import load_fid_inception

            ref_files = reference_images(args.reference)
            inception = load_fid_inception(args.inception).to(device)
        if args.clip:
            print(run_clip_score(conn, args.db, rows, clip, device, args.batch_size, args.recompute))
        if args.reference:
            for line in run_fid_kid(conn, args.db, rows, args.reference, ref_files, inception, device,
                                    args.batch_size, args.kid_subsets, args.kid_subset_size, args.seed):
                print(line)
    finally:
        conn.close()
    return 0


COMMANDS = {
    "metrics": ("compute CLIP score (per image) and FID / KID (per run) from local weights", add_arguments, run),
}
