"""DreamBooth for SD1.x from a TOML job: prior preservation, generated class images, LoRA or full fine-tune.

    accelerate launch train_dreambooth.py --config dataset_configs/dreambooth_palms_lora.toml
    python train_dreambooth.py --config job.toml --dreambooth_mode full --print_config

How instance and class images are batched, and what stop_text_encoder_training does, is explained in
library/training/dreambooth.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from library.cli import run_main

log = logging.getLogger("pentadactyl")


def create_class_folder_for_folder_mode(argv: list[str]) -> None:
    """Folder mode: the job loader needs reg_data_dir to exist and hold an N_concept sub-folder. When the
    job asks for generated class images and reg_data_dir is missing or empty, create
    reg_data_dir/1_<class_prompt> for them. Anything wrong with the job is left to load_job to report."""
    from library.config import flatten_job_table, parse_cli, schema
    from library.errors import PentadactylError
    from library.schema import load_toml
    from library.training.dreambooth import class_folder_name

    fields = schema("train_dreambooth").fields
    try:
        if "--print_config" in argv:
            return
        config, values = parse_cli(argv, fields)
        if config is not None:
            values = {**flatten_job_table(load_toml(config), fields)[0], **values}
    except PentadactylError:
        return
    reg, wanted, prompt = values.get("reg_data_dir"), values.get("num_class_images"), values.get("class_prompt")
    if not (values.get("train_data_dir") and isinstance(reg, str) and isinstance(wanted, int) and wanted > 0
            and isinstance(prompt, str) and prompt.strip()):
        return
    folder = Path(reg).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        return
    target = folder / class_folder_name(prompt)
    target.mkdir(parents=True, exist_ok=True)
    log.info(f"created {target} for the generated class images (reg_data_dir folder mode)")


def main(argv: list[str]):
    from library.cli import job_from_command_line
    from library.training import dreambooth
    from library.training.loop import run_training_job

    create_class_folder_for_folder_mode(argv)
    job = job_from_command_line("train_dreambooth", argv)
    return run_training_job(job, dreambooth.make_method(job))


if __name__ == "__main__":
    run_main(main)
