"""A tiny SD1-architecture model for tests and the quickstart.

Same module classes, names and block layout as SD1.5 (CrossAttn down/up blocks, mid block, VAE with
four levels, CLIP text tower with the real tokenizer), tiny widths, weights from a fixed seed:

    python -m library.models.tiny --out models

writes models/tiny-sd1.safetensors (single-file LDM layout, as A1111/ComfyUI files are) and
models/tiny-sd1/ (a diffusers folder). Both load through library.models.loading.load_sd1, the same
code that loads a real SD1.5 checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.models import architecture as arch
from library.models.loading import SD1Model, save_sd1_diffusers, save_sd1_single_file
from library.models.tokenizer import load_tokenizer

SINGLE_FILE_NAME = "tiny-sd1.safetensors"
DIFFUSERS_NAME = "tiny-sd1"


def build_tiny_model(seed: int = 0) -> SD1Model:
    """Tiny SD1 modules with deterministic random weights."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = arch.build_unet(arch.TINY_UNET_CONFIG)
        vae = arch.build_vae(arch.TINY_VAE_CONFIG)
        text = arch.build_text_encoder(arch.TINY_TEXT_CONFIG)
    finally:
        torch.random.set_rng_state(generator_state)
    return SD1Model(unet.eval(), vae.eval(), text.eval(), load_tokenizer(), source=f"tiny-sd1 (seed {seed})")


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny model as a single file and as a diffusers folder; return both paths."""
    out_dir = Path(out_dir)
    model = build_tiny_model(seed)
    single, folder = out_dir / SINGLE_FILE_NAME, out_dir / DIFFUSERS_NAME
    save_sd1_single_file(single, model, metadata={"pentadactyl.tiny_seed": str(seed)})
    save_sd1_diffusers(folder, model)
    return single, folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny SD1-architecture test model.")
    parser.add_argument("--out", default="models", help="output folder (default: models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    single, folder = write_tiny_model(args.out, args.seed)
    print(f"wrote {single} and {folder}/")


if __name__ == "__main__":
    main()
