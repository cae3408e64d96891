"""`sample.py`'s work: load the model, embeddings and networks of a sample job, render, report.

Kept out of the script so that tests and other tools can run a job in-process (`run_sample_job(job)`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import ConfigError
from library.job_types import SampleJob
from library.sampling.infotext import embedding_short_hash, format_number, model_short_hash
from library.sampling.job import resolve_device, resolve_dtype, specs_from_job, DTYPES
from library.sampling.networks import (
    attach_networks, choose_network_modes, find_network, load_sampling_networks,
)
from library.sampling.pipeline import SampleRun, Sampler, image_seeds, join_name, sweep_grid

log = logging.getLogger("pentadactyl")


@dataclass
class SampleJobResult:
    runs: list[SampleRun] = field(default_factory=list)
    grid_path: Path | None = None
    seconds_per_image: float = 0.0

    @property
    def images(self):
        return [image for run in self.runs for image in run.images]


def model_display_name(path: str) -> str:
    """What WebUI shows as "Model": the checkpoint's base name (a diffusers folder's name)."""
    p = Path(path)
    return p.stem if p.is_file() else p.name


def prompt_lora_files(specs, job) -> list[Path]:
    """The files of every `<lora:name:m>` in the prompts: `lora_dir/name.safetensors`, as WebUI looks them up
    in models/Lora. Errors name the prompt and what to set."""
    names: dict[str, str] = {}
    for spec in specs:
        for name, _ in spec.loras:
            names.setdefault(name, spec.source or "prompt")
    if not names:
        return []
    name, where = next(iter(names.items()))
    if job.sweep_multipliers:
        raise ConfigError(f"{where}: <lora:{name}:…> in a prompt and sweep_multipliers cannot go together (each "
                          "sets the multipliers); sweep a network from 'networks', or write the multipliers into "
                          "the prompts")
    if not job.lora_dir:
        raise ConfigError(f"{where}: <lora:{name}:…> needs lora_dir = \"folder\", the folder holding "
                          f"{name}.safetensors (WebUI's models/Lora)")
    folder = Path(job.lora_dir)
    if not folder.is_dir():
        raise ConfigError(f"lora_dir = \"{folder}\": no such folder")
    files = []
    for name, where in names.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.safetensors"))
            raise ConfigError(f"{where}: <lora:{name}:…>: no {path.name} in {folder} (there: "
                              f"{', '.join(known) or 'no .safetensors files'})")
        files.append(path)
    return files


def sample_with_prompt_loras(sampler, specs, loaded, tagged, out_dir: Path, job, options, result) -> None:
    """Each run of consecutive prompts with the same `<lora:…>` tags at their multipliers (the other tagged
    files at 0), numbered on from the last, and one grid of them all."""
    from itertools import groupby

    from library.sampling.pipeline import prompt_seed_grid, write_grid

    count = 0
    for loras, group in groupby(specs, key=lambda s: s.loras):
        wanted = dict(loras)
        for network in tagged:
            network.set_multiplier(wanted.get(network.name, 0.0))
        sampler.networks = [n.label() for n in loaded]
        run = sampler.sample(list(group), out_dir, job.output_name, grid=False, first_index=count, **options)
        result.runs.append(run)
        count += len(run.images)
    if job.grid and count > 1:
        per_prompt = [image_seeds(s.seed, options["seed"], job.images_per_prompt, job.seeds) for s in specs]
        images = result.images
        rows, row_labels, col_labels = prompt_seed_grid(images, per_prompt)
        row_labels = [f"{label} {' '.join(f'<lora:{n}:{format_number(m)}>' for n, m in s.loras)}".strip()
                      for label, s in zip(row_labels, specs)]
        result.grid_path = write_grid(rows, row_labels, col_labels, out_dir / join_name(job.output_name, "grid.png"),
                                      images[0].parameters)


def random_seeds(specs, seed: int, seeds):
    """WebUI's seed = -1 (and --d -1 in a prompt line, -1 in `seeds`): a random seed, drawn once per run and
    written into every PNG like any other, so each image can be made again."""
    import secrets
    from dataclasses import replace

    def draw(where: str) -> int:
        value = secrets.randbelow(2 ** 32)
        log.info(f"{where} = -1: using the random seed {value}")
        return value

    seed = draw("seed") if seed == -1 else seed
    seeds = [draw("seeds") if s == -1 else s for s in seeds] if seeds else seeds
    specs = [replace(s, seed=draw(s.source or "--d")) if s.seed == -1 else s for s in specs]
    return specs, seed, seeds


def job_sampler(model, job, *, device, sampler: str, max_token_length: int | None = None, **options) -> Sampler:
    """A Sampler over a loaded model with what every job fixes: its CLIP skip, the checkpoint's display
    name, the default sampler; `options` are Sampler's own (dtypes, networks, embeddings, progress…)."""
    vae = getattr(job, "vae", None)
    if vae:  # as WebUI writes a selected SD VAE: its file's short hash, then its name
        vae_hash = model_short_hash(vae, progress=False)
        options["extra_parameters"] = {**({"VAE hash": vae_hash} if vae_hash else {}), "VAE": Path(vae).name,
                                       **options.get("extra_parameters", {})}
    return Sampler(model.unet, model.vae, model.text_encoder, model.tokenizer, clip_skip=job.clip_skip,
                   max_token_length=max_token_length, device=device, sampler=sampler,
                   model_name=model_display_name(job.pretrained_model_name_or_path), **options)


def run_sample_job(job: SampleJob, progress: bool = True) -> SampleJobResult:
    from library.embeddings import add_embeddings, embedding_files, load_embeddings
    from library.models.loading import load_sd1, load_vae, use_vae

    specs = specs_from_job(job)  # prompt errors before the (slow) model load
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    vae_dtype = DTYPES[job.vae_dtype]
    embedding_files(job.embeddings or [])  # missing files are reported before the slow model load
    loaded = load_sampling_networks(job.networks or [])
    sweep_index = find_network(loaded, job.sweep_network) if job.sweep_multipliers else None
    modes = choose_network_modes(len(loaded), sweep_index, job.network_mode)
    tagged = load_sampling_networks([f"{path}:0" for path in prompt_lora_files(specs, job)])
    loaded, modes = loaded + tagged, modes + ["patch"] * len(tagged)  # patched: each prompt sets its multipliers

    vae = load_vae(job.vae, dtype) if job.vae else None  # before the checkpoint: a wrong path fails fast
    log.info(f"loading {job.pretrained_model_name_or_path}")
    model = load_sd1(job.pretrained_model_name_or_path, dtype, part_dtypes={"vae": vae_dtype})  # VAE never rounded
    if vae is not None:
        use_vae(model, vae, job.vae)
        log.info(f"VAE: {job.vae}")
    model.unet.to(device)
    model.text_encoder.to(device)
    model.vae.to(device, vae_dtype)

    token_map, ti_hashes = {}, {}
    if job.embeddings:
        width = int(model.text_encoder.get_input_embeddings().weight.shape[1])
        embeddings = load_embeddings(job.embeddings, expected_width=width)
        token_map = add_embeddings(model.tokenizer, model.text_encoder, embeddings)
        ti_hashes = {e.name: embedding_short_hash(e.source) for e in embeddings}
        log.info(f"embeddings: {', '.join(f'{e.name} ({e.num_vectors} vectors)' for e in embeddings)}")
    attach_networks(loaded, modes, model.unet, model.text_encoder)
    for network, mode in zip(loaded, modes):
        log.info(f"network {network.path.name}: {'merged' if mode == 'merge' else 'patched'} at {format_number(network.multiplier)}")

    sampler = job_sampler(
        model, job, device=device, sampler=job.sampler, max_token_length=job.max_token_length, vae_dtype=vae_dtype,
        model_hash=model_short_hash(job.pretrained_model_name_or_path, progress=progress),
        networks=[n.label() for n in loaded], embedding_tokens=token_map, embedding_hashes=ti_hashes,
        progress=progress)
    specs, seed, seeds = random_seeds(specs, job.seed, job.seeds)
    options = dict(images_per_prompt=job.images_per_prompt, seed=seed, seeds=seeds, batch_size=job.batch_size)
    out_dir = Path(job.output_dir)
    result = SampleJobResult()
    began = time.perf_counter()
    if tagged:
        sample_with_prompt_loras(sampler, specs, loaded, tagged, out_dir, job, options, result)
    elif sweep_index is None:
        result.runs.append(sampler.sample(specs, out_dir, job.output_name, grid=job.grid, **options))
        result.grid_path = result.runs[0].grid_path
    else:
        swept = loaded[sweep_index]
        for multiplier in job.sweep_multipliers:
            swept.set_multiplier(multiplier)
            sampler.networks = [n.label() for n in loaded]
            prefix = join_name(job.output_name, swept.name, format_number(multiplier))
            result.runs.append(sampler.sample(specs, out_dir, prefix, grid=False, **options))
        if job.grid:
            from library.sampling.grid import panel_grid
            from library.sampling.infotext import save_png_atomic

            titles = [f"{swept.name} × {format_number(m)}" for m in job.sweep_multipliers]
            per_prompt = [image_seeds(s.seed, options["seed"], job.images_per_prompt, job.seeds) for s in specs]
            panels, row_labels, col_labels = sweep_grid(result.runs, titles, per_prompt)
            result.grid_path = save_png_atomic(panel_grid(panels, row_labels, col_labels),
                                               out_dir / join_name(job.output_name, swept.name, "sweep_grid.png"),
                                               result.runs[0].images[0].parameters)
    images = result.images
    result.seconds_per_image = (time.perf_counter() - began) / max(1, len(images))
    return result


def report(result: SampleJobResult) -> str:
    """A short summary for the terminal: files, speed, and any NaN/black images with the fix."""
    images = result.images
    folder = images[0].path.parent if images and images[0].path else None
    lines = [f"wrote {len(images)} image(s) to {folder} ({result.seconds_per_image:.2f} s/image)"]
    if result.grid_path:
        lines.append(f"grid: {result.grid_path}")
    problems = [im for im in images if im.problem]
    for image in problems:
        lines.append(f"warning: {image.path.name if image.path else image.seed}: {image.problem}")
    return "\n".join(lines)
