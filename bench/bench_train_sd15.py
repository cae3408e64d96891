"""Benchmark: a LoRA run on the full-size SD1.5 layout (random fp16 weights), as users run it.

    python bench/bench_train_sd15.py [--precisions no,bf16] [--resolutions 256,512] [--steps 12]
                                     [--images 20] [--gradient-checkpointing] [--profile] [--workdir DIR]

Writes a random fp16 single-file checkpoint with SD1.5's exact layout (2.1 GB, LDM keys, once) and `--images`
images per resolution, then runs train_network's loop on the job of the comparison with sd-scripts: LoRA rank 16
/ alpha 8 on U-Net attention + text encoder, LoCon conv rank 8 / alpha 4 (350 modules), batch 1, AdamW,
cached latents. Each precision × resolution runs in a process of its own, so that its peak RSS is its own.
Reports per run: model load (file → modules), latent caching, the median step of steps 3..N, peak RSS, and with
`--profile` the top ten ops (self CPU time) of two extra steps after those. Results go into bench/RESULTS.md by
hand, with the machine's CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def machine() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not flags:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have)
                break
        return f"{name}; {flags or 'no avx2'}; {torch.get_num_threads()} torch threads; torch {torch.__version__}"
    except (OSError, UnboundLocalError):
        return f"{platform.processor()}; torch {torch.__version__}"


def one_run(args) -> dict:
    """One precision × resolution in this process: load, cache, steps, peak RSS, profile."""
    from library.cli import setup_logging
    from library.config import load_job
    from library.toy_data import write_shape_folder
    from library.training import loop
    from library.training.network_method import NetworkMethod

    setup_logging()
    work, res, precision = args.workdir, args.resolutions, args.precisions
    images = work / f"images-{res}-{args.images}"
    if not images.is_dir():
        write_shape_folder(images, count=args.images, size=(int(res), int(res)))
    name = f"{precision}-{res}{'-gc' if args.gradient_checkpointing else ''}"
    toml = work / f"job-{name}.toml"
    steps = args.steps + (2 if args.profile else 0)
    toml.write_text("\n".join([
        f'pretrained_model_name_or_path = "{work / "sd15-random-fp16.safetensors"}"',
        f'output_dir = "{work / "out"}"', f'output_name = "{name}"', "network_dim = 16", "network_alpha = 8",
        'network_args = ["conv_dim=8", "conv_alpha=4"]', f"max_train_steps = {steps}", "train_batch_size = 1",
        f'mixed_precision = "{precision}"', "cache_latents = true", "learning_rate = 1e-4", 'optimizer_type = "AdamW"',
        f"gradient_checkpointing = {'true' if args.gradient_checkpointing else 'false'}",
        "[general]", f"resolution = {res}", "[[datasets]]", "[[datasets.subsets]]", f'image_dir = "{images}"', ""]))
    job = load_job("train_network", config_path=str(toml))

    profiled = {}
    if args.profile:  # the two steps after the timed ones, under torch.profiler
        inner, calls = loop.optimizer_step, [0]

        def optimizer_step(run, group):
            calls[0] += 1
            if calls[0] <= args.steps:
                return inner(run, group)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = inner(run, group)
            averages = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in averages) or 1
            for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:10]:
                row = profiled.setdefault(e.key, [0.0, 0])
                row[0] += e.self_cpu_time_total / total / 2
                row[1] += e.count
            return out

        loop.optimizer_step = optimizer_step
    from library.dataset import TrainDataset

    caching, prepare = [], TrainDataset.prepare_latents  # timed here, so that older versions are measured alike

    def timed_prepare(self, *a, **k):
        begun = time.perf_counter()
        try:
            return prepare(self, *a, **k)
        finally:
            caching.append(time.perf_counter() - begun)

    TrainDataset.prepare_latents = timed_prepare
    started = time.perf_counter()
    result = loop.train(job, NetworkMethod(job))
    timed = result.step_seconds[:args.steps]
    steady = timed[2:] or timed
    return {"run": name, "load_s": round(result.model.load_seconds, 2), "cache_s": round(sum(caching), 1),
            "images": args.images, "median_step_s": round(statistics.median(steady), 2),
            "steps": len(timed), "total_s": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "ran_in": getattr(result, "precision", precision),
            "top_ops": [f"{k}: {share:.1%} ({n // 2} calls/step)"
                        for k, (share, n) in sorted(profiled.items(), key=lambda kv: -kv[1][0])[:10]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps; the median is of steps 3..N")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--resolutions", default="256")
    parser.add_argument("--images", type=int, default=20, help="images to cache per run")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="top ten ops of two extra steps")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pentadactyl-bench")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single run, in this process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "sd15-random-fp16.safetensors"
    if not model.is_file():
        started = time.perf_counter()
        write_random_sd15(model)
        print(f"wrote {model} in {time.perf_counter() - started:.1f} s")
    print(f"machine: {machine()}")
    for res in args.resolutions.split(","):
        for precision in args.precisions.split(","):
            command = [sys.executable, __file__, "--one", "--precisions", precision, "--resolutions", res,
                       "--steps", str(args.steps), "--images", str(args.images), "--workdir", str(args.workdir)]
            command += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--profile"] * args.profile
            out = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:])
                raise SystemExit(f"the {precision} {res} px run failed")
            print(json.dumps(json.loads(lines[-1][7:]), indent=2), flush=True)


if __name__ == "__main__":
    main()
