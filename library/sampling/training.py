"""Sampling during training: one callable built at the start of a run, called at the sampling intervals.

    sample_now = make_training_sampler(job, model, device, eval_modules=[network])
    run = sample_now(global_step, epoch)     # PNGs in <output_dir>/sample/, A1111 parameters included

The prompt file is read when the callable is built, so a bad file stops the run before training.
Each call puts the models (and `eval_modules`) in eval mode, runs under no_grad, and restores the
train flags and every global RNG state afterwards: sampling never changes what training does next.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from library.sampling.job import training_sample_specs
from library.sampling.pipeline import NetworkLabel, SampleRun
from library.sampling.run import job_sampler

log = logging.getLogger("pentadactyl")

SAMPLE_FOLDER = "sample"


def training_sample_size(job) -> tuple[int, int]:
    """(width, height) of training samples: the first dataset's resolution (512×512 without datasets)."""
    datasets = job.datasets or []
    return tuple(datasets[0].resolution) if datasets else (512, 512)


def make_training_sampler(job, model, device: torch.device | str, eval_modules: Sequence[torch.nn.Module] = (),
                          size: tuple[int, int] | None = None,
                          trains_network: bool = False,
                          embedding_tokens: dict[str, list[str]] | None = None) -> Callable[[int, int], SampleRun]:
    """A callable (step, epoch) → SampleRun that writes `<output_name>_e<epoch>_s<step>_<n>_<seed>.png`.
    `embedding_tokens`: {name: [tokens]} of an embedding being trained, expanded in the prompts."""
    width, height = size or training_sample_size(job)
    specs = training_sample_specs(job.sample_prompts, width=width, height=height, sampler=job.sample_sampler)
    tagged = next((s for s in specs if s.loras), None)
    if tagged is not None:
        from library.errors import ConfigError

        raise ConfigError(f"{tagged.source}: <lora:{tagged.loras[0][0]}:…> in a prompt applies in sample.py only; "
                          "samples during training show the network being trained. Remove the tag.")
    # a LoRA being trained is named in the PNGs as <lora:output_name:1>, as WebUI would load the file
    networks = [NetworkLabel(job.output_name, 1.0)] if trains_network else []
    sampler = job_sampler(model, job, device=device, sampler=job.sample_sampler, networks=networks,
                          embedding_tokens=embedding_tokens, eval_modules=eval_modules)
    out_dir = Path(job.output_dir) / SAMPLE_FOLDER

    def sample_now(step: int, epoch: int) -> SampleRun:
        run = sampler.sample(specs, out_dir, f"{job.output_name}_e{epoch:06d}_s{step:06d}", seed=job.seed)
        for image in run.problems:
            log.warning(f"sample {image.path.name}: {image.problem}")
        return run

    return sample_now
