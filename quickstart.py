"""The quickstart: generate the tiny model and a small image set, then train a LoRA on them.

    python quickstart.py        (or: make quickstart)

Everything is written under quickstart/. The last line printed is the path of the LoRA file.
"""

from __future__ import annotations

from pathlib import Path

from library.cli import run_main

JOB = Path("dataset_configs") / "quickstart.toml"
MODEL = Path("quickstart") / "models" / "tiny-sd1.safetensors"
IMAGES = Path("quickstart") / "images" / "shapes"


def main(argv: list[str]) -> None:
    import logging

    from library.models.tiny import write_tiny_model
    from library.toy_data import write_shape_folder

    log = logging.getLogger("pentadactyl")
    if not MODEL.is_file():
        write_tiny_model(MODEL.parent)
        log.info(f"wrote the tiny model to {MODEL}")
    if not IMAGES.is_dir():
        write_shape_folder(IMAGES, count=24, size=(64, 64), seed=0)
        log.info(f"wrote 24 images with captions to {IMAGES}")
    import train_network

    result = train_network.main(["--config", str(JOB), *argv])
    print(result.final_files[0])


if __name__ == "__main__":
    run_main(main)
