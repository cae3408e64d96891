"""The sampler: prompts → latents → images, with CFG, A1111 weighting, per-image seeds and PNG metadata.

Built once from the model parts; used by `sample.py` and by the trainer mid-training:

    sampler = Sampler(unet, vae, text_encoder, tokenizer, clip_skip=1, model_name="v1-5", model_hash="…")
    run = sampler.sample(specs, out_dir, "mylora_s000500", images_per_prompt=2, seed=42)

Determinism: image k of a prompt uses seed (spec.seed or the run's seed) + k. Its starting noise and
every noise draw of an ancestral/SDE sampler come from a CPU generator of its own, so an image depends
on its seed only: not on the batch size, the device, or what else is in the batch. That holds up to
float rounding, not to the bit: kernels sum in another order for another batch shape (or device, CPU
kind), which moves latents by a few 1e-6 of their scale and now and then a pixel by one level. The same
batch of seeds on the same machine gives the same bits (class images rely on that). `sample()` puts the
models in eval mode, runs under no_grad and restores the global RNG states (torch CPU/CUDA, random,
numpy) and the modules' train flags afterwards, so sampling never changes the training run.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from library.embeddings import embeddings_in_text, expand_embedding_names
from library.sampling.attention import encode_weighted, tokenize_weighted
from library.sampling.grid import image_grid
from library.sampling.infotext import a1111_parameters, prompt_with_lora_tags, save_png_atomic
from library.sampling.prompts import PromptSpec
from library.sampling.schedulers import SamplerDef, make_scheduler, resolve_sampler, step_takes_generator
from library.text_encoding import CHUNK

BLACK_LEVEL = 3  # an image whose brightest pixel is at most this (of 255) is reported as black


@dataclass(frozen=True)
class NetworkLabel:
    """A LoRA as the PNG names it: `<lora:name:multiplier>` in the prompt, its hash in "Lora hashes"."""

    name: str
    multiplier: float
    short_hash: str | None = None


@dataclass
class GeneratedImage:
    image: Image.Image
    spec: PromptSpec
    seed: int
    sampler: SamplerDef
    parameters: str
    latents: torch.Tensor  # final latents [4, h/8, w/8] on the CPU, float32
    problem: str | None = None  # None, or why the image is unusable (NaN / black)
    seconds: float = 0.0
    path: Path | None = None


@dataclass
class SampleRun:
    images: list[GeneratedImage] = field(default_factory=list)
    grid_path: Path | None = None

    @property
    def problems(self) -> list[GeneratedImage]:
        return [im for im in self.images if im.problem]


def image_seeds(spec_seed: int | None, run_seed: int, count: int, seeds: Sequence[int] | None = None) -> list[int]:
    """Seeds of a prompt's images: explicit `seeds`, else (spec seed or run seed) + 0, 1, 2…"""
    if seeds:
        return list(seeds)
    base = run_seed if spec_seed is None else spec_seed
    return [base + k for k in range(count)]


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Starting latents [n, *shape] (one CPU generator per seed) and the generators, for later draws."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


def image_problem(decoded: torch.Tensor, latents: torch.Tensor) -> str | None:
    """Why one decoded image [3, H, W] in [-1, 1] is unusable, or None."""
    if not torch.isfinite(latents).all():
        return "NaN in the U-Net output (try dtype = \"fp32\" or \"bf16\"; fp16 can overflow)"
    if not torch.isfinite(decoded).all():
        return "NaN in the VAE output (set vae_dtype = \"fp32\"; the SD1 VAE overflows in fp16)"
    if ((decoded.max() + 1) * 127.5) <= BLACK_LEVEL:
        return "black image"
    return None


def to_pil(decoded: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → RGB image (NaN shows as black)."""
    array = ((decoded.float().nan_to_num(-1.0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def _module_place(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


@contextlib.contextmanager
def preserved_training_state(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode + no_grad inside; train flags and global RNG states (torch, CUDA, random, numpy) restored after."""
    flags = [(m, m.training) for m in modules]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.train(flag)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The module on `device` in `dtype` for the block; moved back afterwards. A lossy down-cast works
    on a copy, so the caller's weights never lose precision."""
    old_device, old_dtype = _module_place(module)
    if (old_device, old_dtype) == (device, dtype):
        yield module
        return
    if dtype != old_dtype and torch.finfo(dtype).bits <= torch.finfo(old_dtype).bits:
        yield copy.deepcopy(module).to(device, dtype)
        return
    module.to(device, dtype)
    try:
        yield module
    finally:
        module.to(old_device, old_dtype)


class Sampler:
    """Text-to-image sampling with an SD1 U-Net (patched with LoRAs or not), VAE and CLIP text encoder.

    - clip_skip: as in training (1 = last layer).
    - max_token_length: None = no limit (A1111: any number of 75-token chunks); 75/150/225 cut there.
    - device: where latents live (default: the U-Net's device). Modules are not moved, except the VAE,
      which decodes in `vae_dtype` (fp32 by default: the SD1 VAE overflows in fp16) on `device`.
    - autocast_dtype: run the U-Net and text encoder under torch.autocast (e.g. fp32 weights, bf16 math).
    - sampler: default sampler name for prompts that do not set one.
    - model_name / model_hash / networks / embedding_hashes / extra_parameters: what the PNG `parameters`
      text reports.
    - embedding_tokens: {name: [tokens]} from `library.embeddings.add_embeddings` (expanded in prompts).
    - eval_modules: more modules to switch to eval while sampling (e.g. the LoRA network being trained).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, *, clip_skip: int = 1,
                 max_token_length: int | None = None, device: torch.device | str | None = None,
                 vae_dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None,
                 sampler: str = "ddim", model_name: str | None = None, model_hash: str | None = None,
                 networks: Sequence[NetworkLabel] = (), embedding_tokens: Mapping[str, Sequence[str]] | None = None,
                 embedding_hashes: Mapping[str, str] | None = None, eval_modules: Sequence[torch.nn.Module] = (),
                 extra_parameters: Mapping[str, str] | None = None, progress: bool = True) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.clip_skip = clip_skip
        self.max_chunks = None if max_token_length is None else max(1, max_token_length // CHUNK)
        self.device = torch.device(device) if device is not None else _module_place(unet)[0]
        self.vae_dtype = vae_dtype
        self.autocast_dtype = autocast_dtype
        self.default_sampler = resolve_sampler(sampler).name
        self.model_name, self.model_hash = model_name, model_hash
        self.networks = list(networks)
        self.embedding_tokens = dict(embedding_tokens or {})
        self.embedding_hashes = dict(embedding_hashes or {})
        self.eval_modules = list(eval_modules)
        self.extra_parameters = dict(extra_parameters or {})  # more `parameters` fields, e.g. VAE hash / VAE
        self.progress = progress
        self.latent_channels = int(unet.config.in_channels)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # --- conditioning ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode(self, text: str) -> torch.Tensor:
        """Hidden states [1, n_chunks*77, width] of one prompt (weights and embeddings applied)."""
        expand = (lambda piece: expand_embedding_names(piece, self.embedding_tokens)) if self.embedding_tokens else None
        tokens = tokenize_weighted(self.tokenizer, text, self.max_chunks, expand)
        with self._autocast():
            states = encode_weighted(self.text_encoder, tokens, self.clip_skip)
        return states.to(self.device)

    # --- denoising ------------------------------------------------------------------------------------
    def _predict_noise(self, latents: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
                       cfg_scale: float) -> torch.Tensor:
        unet_dtype = _module_place(self.unet)[1] if self.autocast_dtype is None else latents.dtype
        x = latents.to(unet_dtype)
        n = x.shape[0]
        c = cond.expand(n, -1, -1).to(unet_dtype)
        with self._autocast():
            if uncond is None:
                return self.unet(x, t, encoder_hidden_states=c).sample.float()
            u = uncond.expand(n, -1, -1).to(unet_dtype)
            if u.shape[1] == c.shape[1]:
                both = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([u, c])).sample.float()
                eps_u, eps_c = both.chunk(2)
            else:  # different chunk counts: two calls (A1111 does the same; padding would change the result)
                eps_u = self.unet(x, t, encoder_hidden_states=u).sample.float()
                eps_c = self.unet(x, t, encoder_hidden_states=c).sample.float()
        return eps_u + cfg_scale * (eps_c - eps_u)

    def denoise(self, spec: PromptSpec, seeds: Sequence[int], cond: torch.Tensor,
                uncond: torch.Tensor | None, sampler: SamplerDef) -> torch.Tensor:
        """Final latents [n, 4, h/8, w/8] (float32) for one batch of seeds of one prompt."""
        scheduler = make_scheduler(sampler, spec.source or "sampler")
        scheduler.set_timesteps(spec.steps, device=self.device)
        shape = (self.latent_channels, spec.height // self.vae_factor, spec.width // self.vae_factor)
        noise, generators = initial_noise(seeds, shape)
        latents = noise.to(self.device) * scheduler.init_noise_sigma
        step_kwargs = {"generator": generators} if step_takes_generator(scheduler) else {}
        for t in tqdm(scheduler.timesteps, desc="steps", leave=False, disable=not self.progress):
            model_input = scheduler.scale_model_input(latents, t)
            eps = self._predict_noise(model_input, t, cond, uncond, spec.cfg_scale)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        return latents.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] (float32; NaN kept so that it can be reported)."""
        with placed(self.vae, self.device, self.vae_dtype) as vae:
            z = latents.to(self.device, self.vae_dtype) / vae.config.scaling_factor
            return vae.decode(z).sample.float()

    # --- images ---------------------------------------------------------------------------------------
    def parameters_text(self, spec: PromptSpec, seed: int, sampler: SamplerDef) -> str:
        active = [n for n in self.networks if n.multiplier != 0]
        used_embeddings = embeddings_in_text(f"{spec.prompt}\n{spec.negative_prompt}", self.embedding_hashes)
        return a1111_parameters(
            prompt_with_lora_tags(spec.prompt, {n.name: n.multiplier for n in active}),
            spec.negative_prompt, steps=spec.steps, sampler=sampler.infotext_name, cfg_scale=spec.cfg_scale,
            seed=seed, width=spec.width, height=spec.height, model_hash=self.model_hash,
            model_name=self.model_name, clip_skip=self.clip_skip,
            lora_hashes={n.name: n.short_hash for n in active if n.short_hash},
            ti_hashes={name: self.embedding_hashes[name] for name in used_embeddings},
            extra=self.extra_parameters,
        )

    def generate(self, spec: PromptSpec, seeds: Sequence[int], batch_size: int = 1,
                 bar: tqdm | None = None) -> list[GeneratedImage]:
        """The images of one prompt for `seeds` (no files written). Call under `torch.no_grad()`."""
        sampler = resolve_sampler(spec.sampler or self.default_sampler, spec.source or "sampler")
        cond = self.encode(spec.prompt)
        uncond = None if spec.cfg_scale == 1.0 else self.encode(spec.negative_prompt)
        results = []
        for start in range(0, len(seeds), batch_size):
            batch = list(seeds[start:start + batch_size])
            began = time.perf_counter()
            latents = self.denoise(spec, batch, cond, uncond, sampler)
            decoded = self.decode(latents)
            seconds = (time.perf_counter() - began) / len(batch)
            for seed, z, x in zip(batch, latents, decoded):
                results.append(GeneratedImage(
                    image=to_pil(x), spec=spec, seed=seed, sampler=sampler,
                    parameters=self.parameters_text(spec, seed, sampler), latents=z.detach().cpu(),
                    problem=image_problem(x, z), seconds=seconds))
            if bar is not None:
                bar.update(len(batch))
        return results

    def sample(self, specs: Sequence[PromptSpec], out_dir: str | Path | None, name_prefix: str = "", *,
               images_per_prompt: int = 1, seed: int = 42, seeds: Sequence[int] | None = None,
               batch_size: int = 1, grid: bool = False, first_index: int = 0) -> SampleRun:
        """Generate every prompt's images; with `out_dir`, write PNGs (and a grid) atomically.

        Files: `<prefix>_<nnn>_<seed>.png` in prompt order, `<prefix>_grid.png` (rows: prompts, columns:
        seeds). Models go to eval mode and RNG states are restored afterwards (safe mid-training).
        """
        run = SampleRun()
        per_prompt = [image_seeds(s.seed, seed, images_per_prompt, seeds) for s in specs]
        total = sum(len(s) for s in per_prompt)
        modules = [self.unet, self.vae, self.text_encoder, *self.eval_modules]
        with preserved_training_state(modules), tqdm(total=total, desc="sampling", unit="image",
                                                     disable=not self.progress) as bar:
            for spec, spec_seeds in zip(specs, per_prompt):
                run.images.extend(self.generate(spec, spec_seeds, batch_size, bar))
        if out_dir is not None:
            write_images(run, Path(out_dir), name_prefix, first_index)
            if grid and len(run.images) > 1:
                rows, row_labels, col_labels = prompt_seed_grid(run.images, per_prompt)
                run.grid_path = write_grid(rows, row_labels, col_labels, Path(out_dir) / join_name(name_prefix, "grid.png"),
                                           run.images[0].parameters)
        return run


# --- files ------------------------------------------------------------------------------------------


def join_name(*parts: str) -> str:
    return "_".join(p for p in parts if p)


def write_images(run: SampleRun, out_dir: Path, name_prefix: str, first_index: int = 0) -> None:
    for index, generated in enumerate(run.images, first_index):
        path = out_dir / join_name(name_prefix, f"{index:03d}", f"{generated.seed}.png")
        generated.path = save_png_atomic(generated.image, path, generated.parameters)


def prompt_seed_grid(images: Sequence[GeneratedImage], per_prompt: Sequence[Sequence[int]]):
    """Rows: prompts; columns: their images in seed order."""
    rows, labels = [], []
    it = iter(images)
    for spec_seeds in per_prompt:
        row = [next(it) for _ in spec_seeds]
        rows.append([g.image for g in row])
        labels.append(row[0].spec.prompt)
    width = max(len(s) for s in per_prompt)
    same_seeds = all(list(s) == list(per_prompt[0]) for s in per_prompt)
    columns = [f"seed {s}" for s in per_prompt[0]] if same_seeds else [f"image {k + 1}" for k in range(width)]
    return rows, labels, columns


def write_grid(rows, row_labels, col_labels, path: Path, parameters: str | None = None) -> Path:
    return save_png_atomic(image_grid(rows, row_labels, col_labels), path, parameters)


def sweep_grid(runs: Sequence[SampleRun], titles: Sequence[str], per_prompt: Sequence[Sequence[int]]):
    """One panel per run (per multiplier), each with prompts down and seeds across, as A1111's X/Y/Z plot
    lays them out: (panels, row labels, column labels) for grid.panel_grid."""
    panels = []
    for run, title in zip(runs, titles):
        rows, row_labels, col_labels = prompt_seed_grid(run.images, per_prompt)
        panels.append((title, rows))
    return panels, row_labels, col_labels
