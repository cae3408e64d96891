"""Seconds per image of the sampler on this machine (not part of the tests).

    python bench/bench_sampling.py [--sd15-size 256] [--sd15-steps 20] [--tiny-size 64] [--tiny-steps 20]
                                   [--sampler ddim] [--threads N] [--skip-sd15]

Builds the tiny model and the full SD1.5 layout (U-Net, VAE, CLIP text tower) from the architecture
configs with random weights (the cost of a step does not depend on the weights), then times one
warm-up image and `--images` measured images each, with CFG (two U-Net passes per step, batched),
VAE decoding in fp32, and the PNG parameters text — what `sample.py` does per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import torch

from library.models import architecture as arch  # noqa: E402
from library.models.tokenizer import load_tokenizer  # noqa: E402
from library.sampling import PromptSpec, Sampler  # noqa: E402


def build(unet_config: dict, vae_config: dict, text_config: dict):
    """fp32 modules with random weights (the sampler's CPU default)."""
    torch.manual_seed(0)
    return (arch.build_unet(unet_config).eval(), arch.build_vae(vae_config).eval(),
            arch.build_text_encoder(text_config).eval())


def seconds_per_image(name: str, parts, size: int, steps: int, sampler: str, images: int) -> float:
    unet, vae, text = parts
    s = Sampler(unet, vae, text, load_tokenizer(), sampler=sampler, progress=False)
    spec = PromptSpec("a photo of a hand, best quality", "disfigured", width=size, height=size, steps=steps)
    with torch.no_grad():
        s.generate(spec, [0])  # warm-up (first-call allocations)
        began = time.perf_counter()
        s.generate(spec, list(range(1, images + 1)))
    per_image = (time.perf_counter() - began) / images
    print(f"{name:>5}: {size}x{size}, {steps} steps, {sampler}, CFG: {per_image:.2f} s/image "
          f"({per_image / steps * 1000:.0f} ms/step incl. decode share)", flush=True)
    return per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-size", type=int, default=64)
    parser.add_argument("--tiny-steps", type=int, default=20)
    parser.add_argument("--sd15-size", type=int, default=256)
    parser.add_argument("--sd15-steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--images", type=int, default=1, help="measured images per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-sd15", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)

    tiny = build(arch.TINY_UNET_CONFIG, arch.TINY_VAE_CONFIG, arch.TINY_TEXT_CONFIG)
    seconds_per_image("tiny", tiny, args.tiny_size, args.tiny_steps, args.sampler, args.images)
    if not args.skip_sd15:
        began = time.perf_counter()
        sd15 = build(arch.SD15_UNET_CONFIG, arch.SD15_VAE_CONFIG, arch.SD15_TEXT_CONFIG)
        print(f"built the SD1.5 layout in {time.perf_counter() - began:.0f} s", flush=True)
        seconds_per_image("SD1.5", sd15, args.sd15_size, args.sd15_steps, args.sampler, args.images)


if __name__ == "__main__":
    main()
