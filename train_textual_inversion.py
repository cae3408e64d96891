"""Train a textual-inversion embedding (or a negative embedding) for SD1.x from a TOML job.

    accelerate launch train_textual_inversion.py --config dataset_configs/ti_handpalm.toml
    python train_textual_inversion.py --config job.toml --token_string "<mytoken>" --init_word hand
    python train_textual_inversion.py --config job.toml --print_config

The result is `<output_dir>/<output_name>.safetensors` ({"emb_params": [n, 768]}) or, with
save_model_as = "pt", A1111's .pt layout. A1111 and ComfyUI use it by its file name.
"""

from __future__ import annotations

from library.cli import run_main


def main(argv: list[str]):
    from library.cli import job_from_command_line
    from library.training.loop import run_training_job
    from library.training.textual_inversion import TextualInversionMethod

    job = job_from_command_line("train_textual_inversion", argv)
    return run_training_job(job, TextualInversionMethod(job))


if __name__ == "__main__":
    run_main(main)
