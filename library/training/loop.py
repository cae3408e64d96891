"""The one training loop of pentadactyl, shared by LoRA, textual inversion and DreamBooth.

Read top to bottom: set-up (devices, precision, model, method, dataset, latents, optimizer), an
optional resume, then epochs of micro-batches → optimizer steps, with saving, sampling, validation
and logging at their intervals. What differs between trainers lives in a `Method`.

Randomness that decides what the model sees (timesteps, noise) is derived from (seed, step, sample
index), not from a running generator, so a resumed run and a multi-process run see exactly what an
uninterrupted single-process run sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.config import Job
from library.errors import ConfigError, PentadactylError
from library.fileio import (
    WRITE_ERRORS, FolderLock, check_writable_folder, remove_stale_temporaries, write_error_reason,
)
from library.models.loading import load_sd1
from library.text_encoding import encode_texts, long_captions
from library.training import noise as nz
from library.training.metadata import build_metadata
from library.training.method import Method, MicroBatch, TrainContext
from networks.files import SAVE_DTYPES
from library.training.optimizers import build_optimizer, build_scheduler, optimizer_class
from library.training.state import LoadedState, Progress, load_state, recover_state, restore_rng, save_state

log = logging.getLogger("pentadactyl")

class TrainingStopped(PentadactylError):
    """Training stopped early because the loss became NaN/inf (the last good state was saved)."""


class SaveFailed(PentadactylError):
    """A weights file or the training state could not be written (full disk, folder gone read-only)."""


@dataclass
class TrainResult:
    final_files: list[Path]
    global_step: int
    losses: list[float] = field(default_factory=list)  # loss of every optimizer step (mean over micro-batches)
    step_seconds: list[float] = field(default_factory=list)  # wall time of every optimizer step
    validation: list[tuple[int, float]] = field(default_factory=list)
    state_dir: Path | None = None
    interrupted: bool = False
    seconds: float = 0.0
    peak_memory: str = ""
    model: object = None  # the SD1Model with the method applied (for in-process use: grids, tests)
    method: Method | None = None


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for one sample of one step: independent of process count and of resumes."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_accelerator(job: Job):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # Several processes without CUDA (torchrun / accelerate launch on CPUs): accelerate uses gloo
    # only when told the run is on the CPU.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if job.mixed_precision == "fp16" and PartialState(cpu=cpu_ddp).device.type == "cpu":
        raise ConfigError("mixed_precision = \"fp16\" does not work on the CPU (torch silently computes in fp32 "
                          "there). Use mixed_precision = \"bf16\" on the CPU, or train on a CUDA GPU.")
    # one process may run several jobs (tests, notebooks): forget the previous job's precision,
    # keep the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=job.mixed_precision, cpu=cpu_ddp)


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def set_attention_backend(unet, job: Job, device: torch.device) -> str:
    if job.xformers:
        if device.type != "cuda":
            raise ConfigError("xformers = true needs a CUDA GPU (xformers has no CPU kernels); "
                              "remove it to use torch's SDPA attention.")
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # ImportError or xformers' own checks
            raise ConfigError(f"xformers = true, but xformers cannot be used here: {exc}. "
                              "pip install xformers (matching your torch), or remove the key.") from None
        return "xformers"
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if job.sdpa else AttnProcessor())
    return "sdpa" if job.sdpa else "math"


class _StopFlag:
    """SIGINT/SIGTERM → finish the current step, save, exit. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving state and weights")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _peak_memory_text(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB → GiB on Linux
    text = f"peak RSS {rss:.2f} GiB"
    if device.type == "cuda":
        text += f", peak CUDA {torch.cuda.max_memory_allocated(device) / 1024 ** 3:.2f} GiB"
    return text


def train(job: Job, method: Method) -> TrainResult:
    """Run a job to the end (or to a Ctrl-C). What can be checked without the model is checked first: the
    output folder is writable and no other run uses it, the optimizer exists, a resumed state is readable."""
    started = time.time()
    accelerator = make_accelerator(job)
    optimizer_class(job.optimizer_type, job.optimizer_args)
    with contextlib.ExitStack() as held:
        if accelerator.is_main_process:  # only the main process writes files
            output_dir = check_writable_folder(job.output_dir, "output_dir")
            held.enter_context(FolderLock(output_dir))
            for leftover in remove_stale_temporaries(output_dir):
                log.info(f"removed {leftover.name}, left in {output_dir} by an interrupted save")
            for folder in {output_dir / f"{job.output_name}-state", *([Path(job.resume)] if job.resume else [])}:
                if recover_state(folder):
                    log.warning(f"{folder}: recovered the training state that an interrupted save left beside it")
        accelerator.wait_for_everyone()
        state = load_state(Path(job.resume)) if job.resume else None
        if state is not None:
            check_state_fits_job(state, job, method)
        return _train(job, method, accelerator, state, started)


def check_state_fits_job(state: LoadedState, job: Job, method: Method) -> None:
    """Refuse a resume that could not continue the saved run exactly (what the epochs look like is checked
    once the dataset is known: `check_position_fits`)."""
    where = f"resume = \"{job.resume}\""
    if state.progress.method != method.name:
        raise ConfigError(f"{where}: this state is from a {state.progress.method} run, not {method.name}.")
    if state.progress.seed != job.seed:
        raise ConfigError(f"{where}: the state was saved by a run with seed = {state.progress.seed}, this job has "
                          f"seed = {job.seed}. The noise and order of the remaining steps derive from the seed: set "
                          f"seed = {state.progress.seed} to resume exactly, or start a new run without resume.")


def check_position_fits(progress: Progress, resume: str, batches_per_epoch: int, batches_per_step: int,
                        batch_size: int, world: int) -> None:
    """The saved position must mean the same in this run: same batches per epoch and per step."""
    saved = (progress.batches_per_epoch, progress.batches_per_step)
    now = (batches_per_epoch, batches_per_step)
    if progress.batches_per_epoch is None:  # a state of an earlier version records only the position
        changed = progress.batches_done_in_epoch >= batches_per_epoch
    else:
        changed = saved != now
    if not changed:
        return
    if progress.batches_per_epoch is None:
        was = f"{progress.batches_done_in_epoch} batches of epoch {progress.epoch} were already done"
    else:
        was = (f"{progress.batches_per_epoch} batches of {progress.batch_size} images per epoch, "
               f"{progress.batches_per_step} batches per optimizer step ({progress.num_processes} process(es))")
    raise ConfigError(
        f"resume = \"{resume}\": the state was saved when {was}; this run has {batches_per_epoch} batches of "
        f"{batch_size} per epoch, {batches_per_step} per step ({world} process(es)). The images, num_repeats, "
        "train_batch_size, gradient_accumulation_steps or the number of processes changed since, so the saved "
        "position means nothing here. Restore them to resume exactly, or start a new run from the weights saved "
        "so far (network_weights = for a LoRA, weights = for an embedding).")


def _train(job: Job, method: Method, accelerator, state: LoadedState | None, started: float) -> TrainResult:
    from tqdm.auto import tqdm

    from library.dataset import TrainDataset
    from library.dataset.validation import hold_out, validation_batches

    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    weight_dtype = weight_dtype_of(job.mixed_precision)
    torch.manual_seed(job.seed)

    # ---- model and method
    model = load_sd1(job.pretrained_model_name_or_path, dtype=torch.float32)
    if is_main:
        log.info(f"loaded {model.source} in {model.load_seconds:.1f} s")
    attention = set_attention_backend(model.unet, job, device)
    ctx = TrainContext(job, model, device, weight_dtype, rank, world, accelerator.wait_for_everyone,
                       start_step=state.progress.global_step if state is not None else 0)
    # what the method trains in full stays float32: a round trip through bf16/fp16 would lose the base's low bits
    for part in ("unet", "text_encoder"):
        getattr(model, part).to(device, torch.float32 if part in method.full_precision_parts else weight_dtype)
    param_groups = method.setup(ctx)
    if not any(p.requires_grad for g in param_groups for p in g["params"]):
        raise ConfigError(f"{job.source}: nothing to train: every learning rate is 0 or every part is disabled.")
    if job.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if method.needs_text_encoder_grad:
            # transformers 5.x renamed it (the old name warns); older releases only have the old one
            enable = getattr(model.text_encoder, "activation_checkpointing_enable", None)
            (enable or model.text_encoder.gradient_checkpointing_enable)()
    if is_main:
        log.info(f"training {method.summary()}; attention {attention}; precision {job.mixed_precision}; "
                 f"{world} process(es) on {device.type}")

    # ---- data: latents are encoded with the VAE in fp32 (SD's VAE overflows in fp16)
    method.before_dataset(ctx)
    dataset = TrainDataset(job.datasets, seed=job.seed, tokenizer=model.tokenizer,
                           caption_replacements=method.caption_replacements(),
                           num_workers=job.max_data_loader_n_workers, **method.dataset_options())
    held_out = hold_out(dataset, job.validation_split) if job.validation_split else []
    if is_main:
        log.info(dataset.bucket_table())
        _warn_long_captions(dataset, model.tokenizer, job.max_token_length)
    model.vae.to(device, torch.float32)
    # the validation images are encoded once, before the VAE may leave the device
    validation_set = with_fixed_timesteps(
        validation_batches(dataset, held_out, model.vae, device, job.train_batch_size)) if held_out else []
    cached = dataset.prepare_latents(model.vae, device, torch.float32, cache=job.cache_latents,
                                     to_disk=job.cache_latents_to_disk, batch_size=job.vae_batch_size)
    if cached and not job.sample_prompts:
        model.vae.to("cpu")  # only sampling needs it now

    # ---- optimizer and schedule; a step consumes `world × accumulation` batches of the epoch
    optimizer = accelerator.prepare_optimizer(
        build_optimizer(job.optimizer_type, param_groups, job.learning_rate, job.optimizer_args))
    batches_per_step = world * job.gradient_accumulation_steps
    epoch_batches = dataset.num_batches(1) // world * world  # the tail that not every process gets is dropped
    if epoch_batches == 0:
        raise ConfigError(f"{job.source}: fewer batches than processes ({dataset.num_batches(1)} batches, "
                          f"{world} processes); add images or lower train_batch_size.")
    steps_per_epoch = math.ceil(epoch_batches / batches_per_step)
    batch_size = max(ds.batch_size for ds in dataset.configs)  # for messages about a changed dataset
    total_steps = job.max_train_epochs * steps_per_epoch if job.max_train_epochs else job.max_train_steps
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    dataset.set_max_train_steps(total_steps)
    scheduler = build_scheduler(job.lr_scheduler, optimizer.optimizer, job.lr_warmup_steps, total_steps,
                                job.lr_scheduler_num_cycles, job.lr_scheduler_power)
    trainable = [p for g in param_groups for p in g["params"] if p.requires_grad]
    ema = {k: v.detach().clone().float() for k, v in method.trainable_state().items()} if job.ema_decay else None
    if is_main:
        log.info(f"{dataset.num_train_images} training images, {dataset.num_reg_images} regularisation images; "
                 f"{epoch_batches} batches per epoch; {total_steps} steps ({total_epochs} epochs)")

    # ---- resume: the position is (epoch, batches of it done), both global across processes
    global_step, epoch, done_in_epoch = 0, 1, 0
    if state is not None:
        check_position_fits(state.progress, job.resume, epoch_batches, batches_per_step, batch_size, world)
        method.load_trainable_state(state.trainable)
        try:
            optimizer.optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            if state.scaler is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(state.scaler)
            restore_rng(state.rng)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"resume = \"{job.resume}\": the saved optimizer, schedule or random state does not fit "
                              f"this job ({exc}). Resume with the optimizer_type, optimizer_args and trained parts "
                              "the state was saved with, or start a new run.") from None
        if ema is not None and state.ema is not None:
            ema = state.ema
        global_step, epoch, done_in_epoch = (state.progress.global_step, state.progress.epoch,
                                             state.progress.batches_done_in_epoch)
        if is_main:
            log.info(f"resumed from {job.resume} at step {global_step} (epoch {epoch}, batch {done_in_epoch})")

    alphas_cumprod = nz.sd1_alphas_cumprod().to(device)
    text_cache: dict[str, torch.Tensor] = {}
    output_dir = Path(job.output_dir)
    save_dtype = SAVE_DTYPES[job.save_precision]  # the job's choices are names of this table
    writer = _tensorboard_writer(job) if is_main else None
    result = TrainResult(final_files=[], global_step=global_step, model=model, method=method)
    sampler = _in_training_sampler(job, model, device, method) if is_main else None

    def encode(captions: list[str]) -> torch.Tensor:
        if method.needs_text_encoder_grad:
            with accelerator.autocast():
                return encode_texts(model.tokenizer, model.text_encoder, captions, job.max_token_length, job.clip_skip)
        missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if missing:  # frozen text encoder: each distinct caption is encoded once
            with torch.no_grad(), accelerator.autocast():
                states = encode_texts(model.tokenizer, model.text_encoder, missing, job.max_token_length,
                                      job.clip_skip)
            text_cache.update(zip(missing, states))
        return torch.stack([text_cache[c] for c in captions])

    def batch_loss(batch: dict, step: int, first_index: int, validation: bool = False) -> torch.Tensor:
        """Weighted mean loss of one batch; noise and timesteps fixed by (seed, step, sample index)."""
        latents = batch["latents"].to(device, torch.float32)
        n = latents.shape[0]
        seed = job.seed + 1 if validation else job.seed
        gens = [torch.Generator().manual_seed(sample_seed(seed, step, first_index + i)) for i in range(n)]
        if validation:
            t = batch["timesteps"]
        else:
            t = torch.cat([nz.sample_timesteps(1, job.min_timestep, job.max_timestep, g) for g in gens])
        noise = torch.cat([nz.sample_noise(latents[i:i + 1], g, job.noise_offset) for i, g in enumerate(gens)])
        t = t.to(device)
        noisy = nz.add_noise(latents, noise, t, alphas_cumprod)
        context = encode(batch["captions"])
        with accelerator.autocast():
            pred = model.unet(noisy.to(weight_dtype), t, encoder_hidden_states=context.to(weight_dtype)).sample
        losses = nz.per_sample_loss(pred, noise, job.loss_type, job.huber_c)
        weights = batch["loss_weights"].to(device, torch.float32)
        if job.min_snr_gamma:
            weights = weights * nz.min_snr_weights(t, alphas_cumprod, job.min_snr_gamma)
        return (losses * weights).mean()

    def save_artifacts(suffix: str) -> list[Path]:
        if not is_main:
            return []
        # the epoch in progress, or the one just finished when a save falls on an epoch's end
        metadata = build_metadata(job, dataset, method, started, global_step, epoch if done_in_epoch else epoch - 1,
                                  total_steps)
        path = output_dir / f"{job.output_name}{suffix}{method.artifact_suffix}"
        if ema is not None:
            raw = {k: v.detach().clone() for k, v in method.trainable_state().items()}
            method.load_trainable_state(ema)
        failed = None
        try:
            files = method.save(path, metadata, save_dtype, final=suffix == "")
        except WRITE_ERRORS as exc:
            failed = exc
        if ema is not None:
            method.load_trainable_state(raw)
        if failed is not None:  # the trained (not the EMA) weights go into the state
            raise SaveFailed(f"could not write {path}: {write_error_reason(failed)}. {keep_state()}")
        log.info(f"saved {', '.join(str(f) for f in files)}")
        return files

    def write_state() -> Path | None:
        if not is_main:
            return None
        folder = output_dir / f"{job.output_name}-state"
        progress = Progress(global_step, epoch, done_in_epoch, world, job.seed, method.name,
                            epoch_batches, batches_per_step, batch_size)
        try:
            save_state(folder, progress, method.trainable_state(), optimizer.optimizer, scheduler,
                       accelerator.scaler, ema)
        except WRITE_ERRORS as exc:
            earlier = " (the state saved before it is intact)" if folder.is_dir() else ""
            raise SaveFailed(f"could not write the training state {folder}: {write_error_reason(exc)}{earlier}. "
                             "Free some space or fix the folder, then run again.") from None
        log.info(f"saved training state to {folder}")
        return folder

    def keep_state() -> str:
        """After a failed weights file: save the state, so that nothing trained is lost; say how to go on."""
        try:
            folder = write_state()
        except SaveFailed as exc:
            return f"The training state could not be saved either ({exc})."
        return (f"The training state is saved in {folder}: free some space or fix the folder, then run the same job "
                f"with --resume {folder} to write the weights without training again.")

    def run_validation() -> None:
        if not validation_set:
            return
        method.train_mode(False)
        with torch.no_grad():
            values = [batch_loss(b, 0, i * len(b["captions"]), validation=True).item()
                      for i, b in enumerate(validation_set)]
        method.train_mode(True)
        mean = sum(values) / len(values)
        result.validation.append((global_step, mean))
        if writer:
            writer.add_scalar("loss/validation", mean, global_step)
        if is_main:
            tqdm.write(f"step {global_step}: validation loss {mean:.5f} ({len(held_out)} held-out images)")

    def periodic(finished_epoch: int | None) -> None:
        """Saving, validation and sampling at their intervals (not at the very end: that follows)."""
        due = due_after_step(job, global_step, total_steps, finished_epoch)
        if due.save_step:
            save_artifacts(f"-step{global_step:08d}")
            _prune(output_dir, job.output_name, "-step", 8, job.save_last_n_steps, method.artifact_suffix)
        if due.save_epoch:
            save_artifacts(f"-{finished_epoch:06d}")
            _prune(output_dir, job.output_name, "-", 6, job.save_last_n_epochs, method.artifact_suffix)
        if due.state:
            result.state_dir = write_state()
        if due.validation:
            run_validation()
        if sampler and due.samples:
            sampler(global_step, finished_epoch if finished_epoch is not None else epoch)

    # ---- the loop
    if sampler and job.sample_at_first and global_step == 0:
        sampler(0, 0)
    run_validation()
    progress_bar = tqdm(total=total_steps, initial=global_step, disable=not is_main, desc="training", unit="step")
    running: list[float] = []
    method.train_mode(True)
    with _StopFlag() as stop:
        while global_step < total_steps and not result.interrupted:
            if done_in_epoch >= epoch_batches:  # check_position_fits refuses this; never spin on it
                raise AssertionError(f"epoch {epoch} position {done_in_epoch} is past its {epoch_batches} batches")
            batches = dataset.batches(epoch, start=done_in_epoch, global_step=global_step,
                                      accumulation_steps=batches_per_step)
            while done_in_epoch < epoch_batches and global_step < total_steps:
                step_started = time.perf_counter()
                group = [next(batches) for _ in range(min(batches_per_step, epoch_batches - done_in_epoch))]
                mine = group[rank::world]
                step_loss = torch.zeros((), device=device)
                for k, batch in enumerate(mine):
                    number = k * world + rank
                    where = MicroBatch(global_step, number, number * len(batch["captions"]))
                    loss = method.adjust_loss(batch_loss(batch, global_step, where.first_index), batch, where,
                                              batch_loss)
                    step_loss += loss.detach() / len(mine)
                    accelerator.backward(loss / len(mine))
                if world > 1:
                    _all_reduce_mean([p.grad for p in trainable if p.grad is not None])
                    step_loss = accelerator.reduce(step_loss, "mean")
                if not torch.isfinite(step_loss):
                    optimizer.zero_grad(set_to_none=True)
                    write_state()
                    raise TrainingStopped(
                        f"the loss became {step_loss.item()} at step {global_step + 1} (epoch {epoch}); training "
                        f"stopped and the last good state was saved in {output_dir}. Likely causes: "
                        "mixed_precision = \"fp16\" overflowing (use \"bf16\"), or a learning rate too high.")
                grad_norm = accelerator.clip_grad_norm_(trainable, job.max_grad_norm) if job.max_grad_norm else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_optimizer_step(global_step + 1)
                if ema is not None:
                    _ema_update(ema, method.trainable_state(), job.ema_decay)
                global_step += 1
                done_in_epoch += len(group)
                value = step_loss.item()
                result.losses.append(value)
                result.step_seconds.append(time.perf_counter() - step_started)
                running = (running + [value])[-50:]
                lrs = scheduler.get_last_lr()
                progress_bar.update(1)
                progress_bar.set_postfix(epoch=epoch, loss=f"{sum(running) / len(running):.4f}", lr=f"{lrs[0]:.2e}")
                if writer:
                    writer.add_scalar("loss/train", value, global_step)
                    for group_spec, lr in zip(param_groups, lrs):
                        writer.add_scalar(f"lr/{group_spec.get('name', 'params')}", lr, global_step)
                    if grad_norm is not None:
                        writer.add_scalar("grad_norm", float(grad_norm), global_step)
                epoch_done = done_in_epoch >= epoch_batches
                if epoch_done:
                    epoch, done_in_epoch = epoch + 1, 0
                periodic(epoch - 1 if epoch_done else None)
                if stop.signal is not None:
                    result.state_dir = write_state()
                    result.final_files = save_artifacts(f"-step{global_step:08d}")
                    result.interrupted = True
                    break
                if epoch_done:
                    break
    progress_bar.close()
    result.global_step = global_step
    if result.interrupted:
        result.seconds = time.time() - started
        if is_main:
            log.info(f"interrupted at step {global_step}; resume with --resume {result.state_dir}")
        return result

    run_validation()
    result.final_files = save_artifacts("")
    if job.save_state or job.save_state_on_train_end:
        result.state_dir = write_state()
    if sampler and (job.sample_every_n_steps or job.sample_every_n_epochs):
        sampler(global_step, epoch)
    if writer:
        writer.close()
    result.seconds = time.time() - started
    result.peak_memory = _peak_memory_text(device)
    if is_main:
        log.info(f"done: {global_step} steps in {result.seconds:.0f} s; {result.peak_memory}; "
                 f"weights: {', '.join(str(f) for f in result.final_files)}")
    return result


@dataclass(frozen=True)
class Due:
    """What falls due after one optimizer step."""

    save_step: bool = False  # a -stepNNNNNNNN file
    save_epoch: bool = False  # a -NNNNNN file for the epoch just finished
    state: bool = False  # the training state, with either save
    validation: bool = False
    samples: bool = False


def due_after_step(job: Job, global_step: int, total_steps: int, finished_epoch: int | None) -> Due:
    """The job's intervals at `global_step` (steps count from 1); `finished_epoch` is the epoch (from 1) this
    step finished, or None. The last step is left out: the end of the run saves, validates and samples."""
    if global_step >= total_steps:
        return Due()

    def every(n: int | None, count: int | None) -> bool:
        return bool(n) and count is not None and count % n == 0

    save_step = every(job.save_every_n_steps, global_step)
    save_epoch = every(job.save_every_n_epochs, finished_epoch)
    saved = save_step or save_epoch
    return Due(
        save_step=save_step,
        save_epoch=save_epoch,
        state=saved and job.save_state,
        # without its own interval, validation runs at every save
        validation=every(job.validate_every_n_steps, global_step) if job.validate_every_n_steps else saved,
        samples=every(job.sample_every_n_steps, global_step) or every(job.sample_every_n_epochs, finished_epoch),
    )


def _warn_long_captions(dataset, tokenizer, max_token_length: int) -> None:
    """Captions past max_token_length are cut in training (as in every SD1 UI): say so once, with the worst."""
    found = long_captions(tokenizer, dataset.full_captions(), max_token_length)
    if not found:
        return
    path, n = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    hint = "set max_token_length = 150 or 225, or shorten them" if max_token_length < 225 else "shorten them"
    log.warning(f"{len(found)} caption(s) are longer than max_token_length = {max_token_length} tokens and are cut "
                f"there in training: {path} ({n} tokens){more}; {hint}.")


VALIDATION_TIMESTEPS = 4  # each held-out image is scored at this many timesteps


def with_fixed_timesteps(batches: list[dict]) -> list[dict]:
    """Each validation batch repeated at timesteps spread evenly over the schedule (same every time)."""
    out = []
    for r in range(VALIDATION_TIMESTEPS):
        for k, batch in enumerate(batches):
            n = len(batch["captions"])
            # offsets differ per image so that the set covers the schedule finely
            t = [int(((r + (k * n + i) / (len(batches) * n + 1)) / VALIDATION_TIMESTEPS) * 1000) for i in range(n)]
            out.append({**batch, "timesteps": torch.tensor(t, dtype=torch.long)})
    return out


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    for key, value in current.items():
        ema[key].mul_(decay).add_(value.detach().float(), alpha=1 - decay)


def _prune(folder: Path, name: str, marker: str, width: int, keep: int | None, suffix: str) -> None:
    """Keep only the periodic files of the last `keep` steps/epochs (sd-scripts' save_last_n_*)."""
    if not keep:
        return
    import re

    pattern = re.compile(rf"^{re.escape(name)}{re.escape(marker)}(\d{{{width}}}){re.escape(suffix)}$")
    found = sorted((int(m.group(1)), p) for p in folder.glob(f"{name}*{suffix}") if (m := pattern.match(p.name)))
    newest = found[-1][0] if found else 0
    for number, path in found:
        if number <= newest - keep:
            path.unlink()


def _tensorboard_writer(job: Job):
    if not job.logging_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    run = f"{job.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    return SummaryWriter(str(Path(job.logging_dir) / run))


def _in_training_sampler(job: Job, model, device, method: Method):
    """A callable (step, epoch) that writes sample images, or None when the job samples nothing."""
    if not job.sample_prompts:
        return None
    from library.sampling import make_training_sampler

    return make_training_sampler(job, model, device, eval_modules=method.modules(),
                                 trains_network=method.saves_network, embedding_tokens=method.prompt_tokens())


def run_training_job(job: Job, method: Method) -> TrainResult:
    """What every training script does with its job: train, and exit with 130 when interrupted (the state
    and weights were saved, so the run resumes)."""
    result = train(job, method)
    if result.interrupted:
        raise SystemExit(130)
    return result
