"""The quickstart: teach the toy hand model to draw five fingers with a LoRA, and show before and after.

    python quickstart.py        (or: make quickstart)

1. writes 200 clean five-finger toy hands (fingers fanned: the "spread" pose) with captions to
   quickstart/images/hands/;
2. trains dataset_configs/quickstart.toml (a LoRA on the shipped toy hand model);
3. runs dataset_configs/sample_quickstart.toml: the same prompts and seeds without and with the LoRA,
   a grid of both, and the finger counter's verdict on each column.

Everything is written under quickstart/. The last line printed is the path of the LoRA file.
"""

from __future__ import annotations

from pathlib import Path

from library.cli import run_main

JOB = Path("dataset_configs") / "quickstart.toml"
SAMPLE_JOB = Path("dataset_configs") / "sample_quickstart.toml"
IMAGES = Path("quickstart") / "images" / "hands"
IMAGE_COUNT = 200
IMAGE_SEED = 0


def main(argv: list[str]) -> None:
    import logging

    from library.config import load_job
    from library.sampling.run import run_sample_job
    from toy_hands import count_fingers, write_hand_folder

    log = logging.getLogger("pentadactyl")
    if not IMAGES.is_dir():
        # five digits each, fingers fanned (the "spread" pose of a protocol dataset); captions never say so
        write_hand_folder(IMAGES, IMAGE_COUNT, seed=IMAGE_SEED, pose="spread")
        log.info(f"wrote {IMAGE_COUNT} toy hands with captions to {IMAGES}")
    import train_network

    result = train_network.main(["--config", str(JOB), *argv])
    lora = result.final_files[0]
    job = load_job("sample", ["--config", str(SAMPLE_JOB)])
    samples = run_sample_job(job)
    for multiplier, run in zip(job.sweep_multipliers, samples.runs):
        counts = [count_fingers(image.image) for image in run.images]
        five = sum(c == 5 for c in counts)
        label = "before (multiplier 0)" if multiplier == 0 else f"after (multiplier {multiplier:g})"
        print(f"{label}: {five} of {len(counts)} hands have five fingers")
    print(f"before/after grid: {samples.grid_path}")
    print(lora)


if __name__ == "__main__":
    run_main(main)
