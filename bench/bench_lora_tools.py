"""Benchmark: networks/merge.py, resize.py and extract.py on the full-size SD1.5 layout (random weights).

    python bench/bench_lora_tools.py [--workdir DIR] [--skip extract]

Writes (once) a random fp16 SD1.5-layout checkpoint (bench_train_sd15.py's), a LoCon file on it (rank 32 /
alpha 16 on attention, feed-forward and text encoder, 3×3 convolutions rank 8 / alpha 4: 350 modules, random
weights, fp16) and a second, smaller LoRA (rank 16, no convolutions); then a "fine-tuned" checkpoint: the base
with every layer extract.py reads moved by a random update. Each tool runs in this process (imports done
first, so the times are the tools' own work: reading, computing, writing), and the peak RSS of the process is
reported after each. Results go into bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def write_lora(model, path: Path, dim: int, alpha: float, conv: tuple[int, float] | None, seed: int) -> None:
    from networks.files import save_network
    from networks.locon import create_network
    from networks.spec import NetworkSpec

    spec = NetworkSpec.from_args(dim, alpha, {"conv_dim": conv[0], "conv_alpha": conv[1]} if conv else None)
    network = create_network(spec, model.unet, model.text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_network(path, network.kohya_state_dict(), spec.to_metadata(), save_dtype="fp16")


def write_tuned(base: Path, path: Path) -> None:
    """The base with each linear / conv weight of the U-Net and text encoder moved by a small random update."""
    from library.models.loading import load_sd1, save_sd1_single_file

    model = load_sd1(base)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for module in [*model.unet.modules(), *model.text_encoder.modules()]:
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.ndim >= 2:
                module.weight.add_(torch.randn(module.weight.shape, generator=g) * 1e-3)
    save_sd1_single_file(path, model, torch.float16)


def timed(name: str, main, argv: list[str]) -> None:
    began = time.perf_counter()
    main(argv)
    print(f"RESULT {name}: {time.perf_counter() - began:.1f} s, peak RSS so far {peak_gib():.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pentadactyl-bench")
    parser.add_argument("--skip", default="", help="comma-separated: merge, resize, extract")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(torch.get_num_threads())

    import diffusers  # noqa: F401  (imports first: the tools' times below are their own work)
    import transformers  # noqa: F401

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_sd15 import write_random_sd15
    from library.models.loading import load_sd1
    from networks import extract, merge, resize

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = work / "sd15-random-fp16.safetensors"
    if not base.exists():
        write_random_sd15(base)
    locon, small, tuned = work / "locon-r32-c8.safetensors", work / "lora-r16.safetensors", work / "tuned.safetensors"
    if not (locon.exists() and small.exists()):
        model = load_sd1(base)
        write_lora(model, locon, 32, 16, (8, 4), seed=1)
        write_lora(model, small, 16, 8, None, seed=2)
        del model
    print(f"machine: {torch.get_num_threads()} torch threads; inputs in {work}", flush=True)
    if "merge" not in skip:
        timed("merge two LoRAs into the checkpoint", merge.main,
              ["--sd_model", str(base), "--models", str(locon), str(small), "--ratios", "0.8", "0.5",
               "--save_to", str(work / "merged.safetensors")])
        timed("merge two LoRAs into one, concatenated", merge.main,
              ["--models", str(locon), str(small), "--ratios", "1", "0.5", "--save_to", str(work / "concat.safetensors")])
        timed("merge two LoRAs into one, SVD to rank 32 / conv 8", merge.main,
              ["--models", str(locon), str(small), "--ratios", "1", "0.5", "--save_to", str(work / "svd.safetensors"),
               "--new_rank", "32", "--new_conv_rank", "8"])
    if "resize" not in skip:
        timed("resize the LoCon 32/8 -> 16/4", resize.main,
              ["--model", str(locon), "--save_to", str(work / "resized.safetensors"), "--new_rank", "16",
               "--new_conv_rank", "4"])
        timed("resize the LoCon, dynamic sv_fro 0.9 (max 32)", resize.main,
              ["--model", str(locon), "--save_to", str(work / "resized-fro.safetensors"), "--new_rank", "32",
               "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"])
    if "extract" not in skip:
        if not tuned.exists():
            write_tuned(base, tuned)
        timed("extract a LoRA (dim 16, conv 8) from tuned - base", extract.main,
              ["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(work / "extracted.safetensors"),
               "--dim", "16", "--conv_dim", "8"])


if __name__ == "__main__":
    main()
