"""DreamBooth for SD1.x from a TOML job: prior preservation, generated class images, LoRA or full fine-tune.

    accelerate launch train_dreambooth.py --config dataset_configs/dreambooth_palms_lora.toml
    python train_dreambooth.py --config job.toml --dreambooth_mode full --print_config

How instance and class images are batched, and what stop_text_encoder_training does, is explained in
library/training/dreambooth.py.
"""

from __future__ import annotations

from library.cli import run_main


def main(argv: list[str]):
    from library.cli import job_from_command_line
    from library.training import dreambooth
    from library.training.loop import run_training_job

    job = job_from_command_line("train_dreambooth", argv)
    return run_training_job(job, dreambooth.make_method(job))


if __name__ == "__main__":
    run_main(main)
