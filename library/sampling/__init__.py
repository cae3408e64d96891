"""Sampling: prompt files, sampler names, A1111 prompt weighting, the sampler, grids, PNG parameters.

Used by `sample.py` and by the training loop. The interface the trainer uses:

    # simplest: one callable built at the start of the run (library/sampling/training.py)
    from library.sampling import make_training_sampler
    sample_now = make_training_sampler(job, model, device, eval_modules=[network])  # size: dataset resolution
    run = sample_now(global_step, epoch)     # -> <output_dir>/sample/<output_name>_e<epoch>_s<step>_<n>_<seed>.png

    # or by hand:
    from library.sampling import Sampler, NetworkLabel, parse_prompt_file, PromptSpec
    from library.sampling.job import training_sample_specs

    specs = training_sample_specs(job.sample_prompts, width=64, height=64, sampler=job.sample_sampler)
        # or parse_prompt_file(path, PromptSpec(prompt="", width=64, height=64))
        # defaults otherwise: 30 steps, 512x512, CFG 7.5; each line/table can override them
    sampler = Sampler(unet, vae, text_encoder, tokenizer, clip_skip=job.clip_skip,
                      max_token_length=None, device=accelerator.device,  # prompts uncut, as in WebUI
                      autocast_dtype=torch.bfloat16,          # optional: mixed precision
                      sampler=job.sample_sampler, model_name="v1-5",
                      networks=[NetworkLabel(job.output_name, 1.0)],  # shown as <lora:name:1> in the PNGs
                      eval_modules=[network])                 # also put in eval mode while sampling
    run = sampler.sample(specs, out_dir / "sample", f"{job.output_name}_s{step:06d}",
                         images_per_prompt=1, seed=job.seed, grid=False)
    run.images[i].path / .image / .parameters / .problem       # problem: "NaN …" / "black image" / None

`sample()` may be called with a LoRA patched into the U-Net: it switches the U-Net, VAE, text encoder
and `eval_modules` to eval mode, runs under no_grad, and restores their train flags and the global RNG
states (torch CPU + CUDA, random, numpy) afterwards, so sampling never changes the training run.
Images are written atomically as `<prefix>_<nnn>_<seed>.png` with A1111's `parameters` text.

Modules:
    prompts     PromptSpec, parse_prompt_file (.txt/.toml/.json in sd-scripts syntax)
    schedulers  sampler names (sd-scripts / A1111 / ComfyUI) → diffusers schedulers for SD1
    attention   A1111 weighting "(word:1.2)", "[word]", "\\(", BREAK on 75-token chunks
    pipeline    Sampler (CFG, per-image seeds, VAE in fp32, NaN/black detection)
    infotext    A1111 `parameters` text, Model/Lora/TI short hashes, atomic PNG writing
    grid        labelled image grids
    networks    LoRA files merged or patched for sampling (sample.py)
    job         sample.py's job keys (script "sample"), training_sample_specs
    run         sample.py's work (run_sample_job) and its report
    training    make_training_sampler: the trainer's sampling callable
"""

from library.sampling.attention import parse_prompt_attention
from library.sampling.grid import image_grid
from library.sampling.infotext import a1111_parameters, save_png_atomic
from library.sampling.pipeline import GeneratedImage, NetworkLabel, SampleRun, Sampler, image_seeds
from library.sampling.prompts import PromptSpec, parse_prompt_file
from library.sampling.schedulers import SAMPLERS, make_scheduler, resolve_sampler, sampler_names


def make_training_sampler(job, model, device, eval_modules=(), size=None, trains_network=False, embedding_tokens=None):
    """See library.sampling.training (imported on first use: it needs the model-side modules)."""
    from library.sampling.training import make_training_sampler as make

    return make(job, model, device, eval_modules, size, trains_network, embedding_tokens)

__all__ = [
    "GeneratedImage",
    "NetworkLabel",
    "PromptSpec",
    "SAMPLERS",
    "SampleRun",
    "Sampler",
    "a1111_parameters",
    "image_grid",
    "image_seeds",
    "make_scheduler",
    "make_training_sampler",
    "parse_prompt_attention",
    "parse_prompt_file",
    "resolve_sampler",
    "sampler_names",
    "save_png_atomic",
]
