"""Train a LoRA / LoCon network for SD1.x from a TOML job.

    accelerate launch train_network.py --config job.toml [--key value ...]
    python train_network.py --config job.toml --print_config
"""

from __future__ import annotations

from library.cli import run_main


def main(argv: list[str]):
    from library.cli import job_from_command_line
    from library.training.loop import run_training_job
    from library.training.network_method import NetworkMethod

    job = job_from_command_line("train_network", argv)
    return run_training_job(job, NetworkMethod(job))


if __name__ == "__main__":
    run_main(main)
