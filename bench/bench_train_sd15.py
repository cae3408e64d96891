"""Benchmark: a LoRA run on the full-size SD1.5 layout (random fp16 weights), as users run it.

    python bench/bench_train_sd15.py [--steps 6] [--precisions no,bf16] [--workdir DIR]

Writes a random fp16 single-file checkpoint with SD1.5's exact layout (2.1 GB, once), a few 256×256
images, then runs train_network's loop: rank 16 on attention + text encoder, LoCon conv rank 8, batch 1,
cached latents. Reports model load time, latent-cache time, steady-state s/step (median of the steps
after the first two), peak RSS; on CUDA also MFU. Results go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_random_sd15(path: Path) -> None:
    from library.fileio import save_safetensors_atomic
    from library.models import architecture as arch
    from library.models.loading import ldm_state_dict

    modules = [arch.build_unet(arch.SD15_UNET_CONFIG, empty=True), arch.build_vae(arch.SD15_VAE_CONFIG, empty=True),
               arch.build_text_encoder(arch.SD15_TEXT_CONFIG, empty=True)]
    meta = ldm_state_dict(*modules)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, value in meta.items():
        fan_in = max(1, value[0].numel()) if value.ndim > 1 else 1
        scale = 1.0 / fan_in ** 0.5 if value.ndim > 1 else 0.0
        base = torch.ones(value.shape) if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight",
                                                         "norm_out.weight", "layer_norm1.weight", "layer_norm2.weight",
                                                         "final_layer_norm.weight", "in_layers.0.weight",
                                                         "out_layers.0.weight", "out.0.weight")) else None
        tensors[key] = (base if base is not None else torch.randn(value.shape, generator=g) * scale).half()
    save_safetensors_atomic(tensors, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pentadactyl-bench")
    args = parser.parse_args()

    from library.cli import setup_logging
    from library.config import load_job
    from library.toy_data import write_shape_folder
    from library.training.loop import train
    from library.training.network_method import NetworkMethod

    setup_logging()
    work = args.workdir
    model = work / "sd15-random-fp16.safetensors"
    if not model.is_file():
        started = time.perf_counter()
        write_random_sd15(model)
        print(f"wrote {model} in {time.perf_counter() - started:.1f} s")
    images = work / "images"
    if not images.is_dir():
        write_shape_folder(images, count=4, size=(256, 256))
    # the load alone, in a process of its own, so that the training runs' peak RSS below is their own
    import subprocess

    probe = ("import sys, resource, torch; sys.path.insert(0, sys.argv[1]); "
             "from library.models.loading import load_sd1; m = load_sd1(sys.argv[2], dtype=torch.float32); "
             "print(f'{m.load_seconds:.2f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')")
    loaded = subprocess.run([sys.executable, "-c", probe, str(Path(__file__).resolve().parent.parent), str(model)],
                            capture_output=True, text=True, check=True).stdout.strip()
    print(f"model load (file → modules, fp16 → fp32, own process): {loaded}")
    results = {}
    for precision in args.precisions.split(","):
        toml = work / f"job-{precision}.toml"
        toml.write_text("\n".join([
            f'pretrained_model_name_or_path = "{model}"', f'output_dir = "{work / "out"}"',
            f'output_name = "{precision}"', "network_dim = 16", "network_alpha = 16",
            'network_args = ["conv_dim=8", "conv_alpha=8"]', f"max_train_steps = {args.steps}",
            "train_batch_size = 1", f'mixed_precision = "{precision}"', "cache_latents = true",
            "learning_rate = 1e-4", "[general]", "resolution = 256", "[[datasets]]", "[[datasets.subsets]]",
            f'image_dir = "{images}"', ""]))
        job = load_job("train_network", config_path=str(toml))
        started = time.perf_counter()
        result = train(job, NetworkMethod(job))
        steady = result.step_seconds[2:] or result.step_seconds
        results[precision] = {"total_s": round(time.perf_counter() - started, 1),
                              "median_step_s": round(statistics.median(steady), 2),
                              "steps": len(result.step_seconds), "peak": result.peak_memory}
        print(json.dumps({precision: results[precision]}))
        del result  # free this run's model before the next one loads
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
