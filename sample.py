"""Generate images from an SD1.x model with LoRAs and embeddings; PNGs carry A1111's parameters.

    python sample.py --config dataset_configs/sample_compare.toml
    python sample.py --pretrained_model_name_or_path model.safetensors \
        --prompt "a photo of a hand --n disfigured" --networks mine.safetensors:0.75 --seed 1234

Every key (model, prompt / prompts / prompt_file, negative_prompt, sampler, steps, cfg_scale, width,
height, seed / seeds, images_per_prompt, batch_size, networks, network_mode, sweep_multipliers,
sweep_network, embeddings, clip_skip, dtype, vae_dtype, device, grid, output_dir, output_name) is
documented in library/sampling/job.py; `--print_config` shows the resolved job.
"""

from __future__ import annotations

from library.cli import run_main


def main(argv: list[str]) -> None:
    from library.cli import job_from_command_line
    from library.sampling.run import report, run_sample_job

    job = job_from_command_line("sample", argv)
    result = run_sample_job(job)
    print(report(result))


if __name__ == "__main__":
    run_main(main)
