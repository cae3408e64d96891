"""Where dataset time goes: scanning, decoding + resizing, and VAE encoding (not part of the tests).

    python bench/bench_dataset.py [--images 500] [--full-vae-images 3] [--format jpg]

Generates photo-like 1024×768 images in a temporary folder, then times, per image:
  scan      reading sizes + choosing buckets (TrainDataset construction)
  load      decode + resize + crop to the 576×448 bucket (the loader threads' work)
  cache     cache_latents with the tiny VAE (load + encode, loading overlapped with encoding)
  full VAE  cache_latents with the full-size SD1.5 VAE (random weights: same cost) on a few images
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import numpy as np
import torch
from PIL import Image

from library.dataset import TrainDataset, resolve_datasets  # noqa: E402
from library.dataset.buckets import crop_offset  # noqa: E402
from library.dataset.dataset import SampleDraws  # noqa: E402
from library.models.architecture import SD15_VAE_CONFIG, TINY_VAE_CONFIG, build_vae  # noqa: E402


def make_images(folder: Path, n: int, fmt: str) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        # smooth colour fields plus grain: compresses and decodes like a photo, unlike pure noise
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((1024, 768), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (768, 1024, 3), dtype=np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.{fmt}", quality=92)
        (folder / f"{i:04d}.txt").write_text("hand, palm, fingers", encoding="utf-8")


def dataset(root: Path, n_workers: int) -> TrainDataset:
    configs = resolve_datasets({}, {"datasets": [{"subsets": [{"image_dir": "imgs"}]}]}, "bench", root)
    return TrainDataset(configs, seed=0, num_workers=n_workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--full-vae-images", type=int, default=3)
    parser.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_images(root / "imgs", args.images, args.format)
        print(f"generated {args.images} {args.format} images 1024×768 in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        data = dataset(root, args.workers)
        scan = time.perf_counter() - t
        print(data.bucket_table())

        t = time.perf_counter()
        for e in data.entries:
            data._pixels(e, SampleDraws(False, crop_offset(e.choice.resized, e.choice.bucket, None), 0.0, 0))
        load = time.perf_counter() - t

        torch.manual_seed(0)
        tiny = build_vae(TINY_VAE_CONFIG).eval()
        t = time.perf_counter()
        data.cache_latents(tiny, "cpu", torch.float32, to_disk=False, batch_size=4)
        cache = time.perf_counter() - t

        n = args.images
        print(f"scan (sizes + buckets): {scan / n * 1000:.2f} ms/image ({scan:.2f} s)")
        print(f"decode+resize+crop, one thread: {load / n * 1000:.1f} ms/image ({load:.1f} s)")
        print(f"cache_latents, tiny VAE, {args.workers} loader threads, vae_batch_size 4: "
              f"{cache / n * 1000:.1f} ms/image ({cache:.1f} s)")

        if args.full_vae_images:
            k = args.full_vae_images
            for p in sorted((root / "imgs").glob(f"*.{args.format}"))[k:]:
                p.unlink()
                p.with_suffix(".txt").unlink()
            small = dataset(root, args.workers)
            full = build_vae(SD15_VAE_CONFIG).eval()
            t = time.perf_counter()
            small.cache_latents(full, "cpu", torch.float32, to_disk=False, batch_size=1)
            dt = time.perf_counter() - t
            print(f"cache_latents, SD1.5 VAE fp32 at 576×448: {dt / k:.2f} s/image ({k} images, {dt:.1f} s)")


if __name__ == "__main__":
    main()
