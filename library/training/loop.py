"""The one training loop of pentadactyl, shared by LoRA, textual inversion and DreamBooth.

Read top to bottom: `train` checks what it can before the model loads and locks the output folder; a `Run`
is built by `set_up` (model, method, dataset, latents, optimizer), `resume` continues a saved state, then
`_train` loops over epochs of `optimizer_step`s, with `do_what_is_due` (saving, validation, samples) after
each, and `finish`es. What differs between trainers lives in a `Method`; when things fall due, in
schedule.py; the accelerator, signals and logging helpers, in runtime.py.

Randomness that decides what the model sees (timesteps, noise) is derived from (seed, step, sample
index), not from a running generator, so a resumed run and a multi-process run see exactly what an
uninterrupted single-process run sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.job_types import TrainingJob
from library.errors import ConfigError, PentadactylError
from library.fileio import (
    WRITE_ERRORS, FolderLock, check_writable_folder, remove_stale_temporaries, write_error_reason,
)
from library.models.cpu_kernels import use_fast_cpu_convolutions
from library.models.lean import half_token_embedding, lean_geglu, lean_resnets
from library.models.loading import load_sd1, load_vae, use_vae
from library.text_encoding import encode_texts, long_captions
from library.training.weighted_captions import encode_weighted_captions, plain_text
from library.training import noise as nz
from library.training.metadata import build_metadata
from library.training.method import Method, MicroBatch, TrainContext
from library.training.optimizers import build_optimizer, build_scheduler, check_optimizer_job
from library.training.runtime import (
    StopFlag, all_reduce_mean, check_dynamo_backend, choose_precision, ema_update, make_accelerator, peak_memory_text,
    set_attention_backend, tensorboard_writer, weight_dtype_of,
)
from library.training.schedule import due_after_step, prune_periodic_files, with_fixed_timesteps
from library.training.state import (
    LoadedState, Progress, check_position_fits, check_state_fits_job, load_state, recover_state, restore_rng,
    save_state,
)
from networks.files import SAVE_DTYPES

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
    precision: str = ""  # the precision the run computed in (mixed_precision, or what the CPU runs faster)
    model: object = None  # the SD1Model with the method applied (for in-process use: grids, tests)
    method: Method | None = None


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for one sample of one step: independent of process count and of resumes."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def train(job: TrainingJob, method: Method) -> TrainResult:
    """Run a job to the end (or to a Ctrl-C). What can be checked without the model is checked first: the
    output folder is writable and no other run uses it, the optimizer exists and fits the schedule, a resumed
    state is readable."""
    started = time.time()
    job = choose_precision(job)
    accelerator = make_accelerator(job)
    for warning in check_optimizer_job(job):
        if accelerator.is_main_process:
            log.warning(warning)
    check_dynamo_backend(job)
    if getattr(job, "scale_weight_norms", None) and not method.saves_network:
        raise ConfigError(f"{job.source}: scale_weight_norms limits the norms of LoRA modules, but this job trains "
                          "no LoRA network (dreambooth_mode = \"full\"); remove it.")
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


@dataclass
class Run:
    """One training run: what trains, on what data, with which optimizer, and where it stands.

    The position is (epoch, batches of it done), both global across processes; `epoch` counts from 1 and is
    the epoch in progress (`epoch_of_weights` gives the number files and metadata use).
    """

    job: TrainingJob
    method: Method
    accelerator: object
    model: object
    dataset: object
    param_groups: list[dict]
    trainable: list[torch.nn.Parameter]
    optimizer: object
    scheduler: object
    ema: dict[str, torch.Tensor] | None
    held_out: list
    validation_set: list[dict]
    weight_dtype: torch.dtype
    batches_per_step: int  # a step consumes `processes × accumulation` batches of the epoch
    epoch_batches: int
    batch_size: int  # the largest of the datasets (for messages about a changed dataset)
    total_steps: int
    started: float
    result: TrainResult
    alphas_cumprod: torch.Tensor = None
    output_dir: Path = None
    save_dtype: torch.dtype = torch.float32
    writer: object = None
    sampler: object = None
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict)
    global_step: int = 0
    epoch: int = 1
    done_in_epoch: int = 0
    max_norm: tuple[int, float, float] | None = None  # scale_weight_norms' last (modules scaled, mean, max norm)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def epoch_of_weights(run: Run) -> int:
    """The epoch that weights saved now belong to: the one in progress, or the one that just finished."""
    return run.epoch if run.done_in_epoch else run.epoch - 1


def set_up(job: TrainingJob, method: Method, accelerator, state: LoadedState | None, started: float) -> Run:
    """Model, method, dataset (latents cached or not), optimizer and schedule."""
    from library.dataset import TrainDataset
    from library.dataset.validation import hold_out, validation_batches

    device, world, is_main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    weight_dtype = weight_dtype_of(job.mixed_precision)
    torch.manual_seed(job.seed)

    # ---- model and method
    vae = load_vae(job.vae) if job.vae else None  # before the checkpoint: a wrong path fails fast
    # the frozen U-Net / text encoder in the compute dtype from the first byte read (no float32 copy first);
    # what the method trains in full, and the VAE (latents are encoded in float32), in float32
    part_dtypes = {part: torch.float32 if part in method.full_precision_parts else weight_dtype
                   for part in ("unet", "text_encoder")}
    model = load_sd1(job.pretrained_model_name_or_path, dtype=torch.float32, part_dtypes=part_dtypes)
    if vae is not None:
        use_vae(model, vae, job.vae)
    if is_main:
        log.info(f"loaded {model.source} in {model.load_seconds:.1f} s" + (f"; VAE {job.vae}" if vae else ""))
    attention = set_attention_backend(model.unet, job, device)
    ctx = TrainContext(job, model, device, weight_dtype, accelerator.process_index, world,
                       accelerator.wait_for_everyone, start_step=state.progress.global_step if state else 0)
    # what the method trains in full stays float32: a round trip through bf16/fp16 would lose the base's low bits
    for part, dtype in part_dtypes.items():
        getattr(model, part).to(device, dtype)
    if device.type == "cpu":  # before the method patches layers: its patches then call the faster kernels
        use_fast_cpu_convolutions(model.unet, weight_dtype)  # the compute dtype (autocast for a full U-Net)
    param_groups = method.setup(ctx)
    lean_geglu(model.unet)  # bit-identical results, one activation less per transformer block,
    lean_resnets(model.unet)  # and two per residual block
    if method.half_token_embedding:
        half_token_embedding(model.text_encoder)
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
        _warn_long_captions(dataset, model.tokenizer, job.max_token_length, job.weighted_captions)
    model.vae.to(device, torch.float32)
    # the validation images are encoded once, before the VAE may leave the device
    validation_set = with_fixed_timesteps(
        validation_batches(dataset, held_out, model.vae, device, job.train_batch_size)) if held_out else []
    cached = dataset.prepare_latents(model.vae, device, torch.float32, cache=job.cache_latents,
                                     to_disk=job.cache_latents_to_disk, batch_size=job.vae_batch_size)
    if cached and not job.sample_prompts:
        # only sampling (or a full checkpoint's save) needs the VAE now: free it; a later use loads it again
        dataset.forget_vae()
        model.vae.to("cpu")
        model.release_vae(lambda: load_vae(job.vae or job.pretrained_model_name_or_path))

    # ---- optimizer and schedule
    optimizer = accelerator.prepare_optimizer(
        build_optimizer(job.optimizer_type, param_groups, job.learning_rate, job.optimizer_args))
    batches_per_step = world * job.gradient_accumulation_steps
    epoch_batches = dataset.num_batches(1) // world * world  # the tail that not every process gets is dropped
    if epoch_batches == 0:
        raise ConfigError(f"{job.source}: fewer batches than processes ({dataset.num_batches(1)} batches, "
                          f"{world} processes); add images or lower train_batch_size.")
    steps_per_epoch = math.ceil(epoch_batches / batches_per_step)
    total_steps = job.max_train_epochs * steps_per_epoch if job.max_train_epochs else job.max_train_steps
    dataset.set_max_train_steps(total_steps)
    scheduler = build_scheduler(job.lr_scheduler, optimizer.optimizer, job.lr_warmup_steps, total_steps,
                                job.lr_scheduler_num_cycles, job.lr_scheduler_power, initial_lr=job.learning_rate)
    ema = {k: v.detach().clone().float() for k, v in method.trainable_state().items()} if job.ema_decay else None
    if is_main:
        log.info(f"{dataset.num_train_images} training images, {dataset.num_reg_images} regularisation images; "
                 f"{epoch_batches} batches per epoch; {total_steps} steps "
                 f"({math.ceil(total_steps / steps_per_epoch)} epochs)")
    return Run(
        job=job, method=method, accelerator=accelerator, model=model, dataset=dataset, param_groups=param_groups,
        trainable=[p for g in param_groups for p in g["params"] if p.requires_grad], optimizer=optimizer,
        scheduler=scheduler, ema=ema, held_out=held_out, validation_set=validation_set, weight_dtype=weight_dtype,
        batches_per_step=batches_per_step, epoch_batches=epoch_batches,
        batch_size=max(ds.batch_size for ds in dataset.configs), total_steps=total_steps, started=started,
        result=TrainResult(final_files=[], global_step=0, model=model, method=method, precision=job.mixed_precision),
        alphas_cumprod=nz.sd1_alphas_cumprod().to(device), output_dir=Path(job.output_dir),
        save_dtype=SAVE_DTYPES[job.save_precision],  # the job's choices are names of this table
        writer=tensorboard_writer(job) if is_main else None,
        sampler=_in_training_sampler(job, model, device, method) if is_main else None)


def resume(run: Run, state: LoadedState) -> None:
    """Continue from a saved state: weights, optimizer, schedule, scaler, RNG, EMA and position."""
    job = run.job
    check_position_fits(state.progress, job.resume, run.epoch_batches, run.batches_per_step, run.batch_size,
                        run.world)
    run.method.load_trainable_state(state.trainable)
    try:
        run.optimizer.optimizer.load_state_dict(state.optimizer)
        run.scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None and run.accelerator.scaler is not None:
            run.accelerator.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"resume = \"{job.resume}\": the saved optimizer, schedule or random state does not fit "
                          f"this job ({exc}). Resume with the optimizer_type, optimizer_args and trained parts "
                          "the state was saved with, or start a new run.") from None
    if run.ema is not None and state.ema is not None:
        run.ema = state.ema
    run.global_step, run.epoch, run.done_in_epoch = (state.progress.global_step, state.progress.epoch,
                                                     state.progress.batches_done_in_epoch)
    run.result.global_step = run.global_step
    if run.is_main:
        log.info(f"resumed from {job.resume} at step {run.global_step} (epoch {run.epoch}, "
                 f"batch {run.done_in_epoch})")


def encode_captions(run: Run, captions: list[str]) -> torch.Tensor:
    """Text-encoder states of the captions; with a frozen text encoder each distinct caption is encoded once."""
    job, model = run.job, run.model
    encode = encode_weighted_captions if job.weighted_captions else encode_texts
    if run.method.needs_text_encoder_grad:
        with run.accelerator.autocast():
            return encode(model.tokenizer, model.text_encoder, captions, job.max_token_length, job.clip_skip)
    missing = [c for c in dict.fromkeys(captions) if c not in run.text_cache]
    if missing:
        with torch.no_grad(), run.accelerator.autocast():
            states = encode(model.tokenizer, model.text_encoder, missing, job.max_token_length, job.clip_skip)
        run.text_cache.update(zip(missing, states))
    return torch.stack([run.text_cache[c] for c in captions])


def batch_loss(run: Run, batch: dict, step: int, first_index: int, validation: bool = False) -> torch.Tensor:
    """Weighted mean loss of one batch; noise and timesteps fixed by (seed, step, sample index)."""
    job, device = run.job, run.device
    latents = batch["latents"].to(device, torch.float32)
    n = latents.shape[0]
    seed = job.seed + 1 if validation else job.seed
    gens = [torch.Generator().manual_seed(sample_seed(seed, step, first_index + i)) for i in range(n)]
    if validation:
        t = batch["timesteps"]
    else:
        t = torch.cat([nz.sample_timesteps(1, job.min_timestep, job.max_timestep, g) for g in gens])
    noise = torch.cat([nz.sample_noise(latents[i:i + 1], g, job.noise_offset, job.adaptive_noise_scale,
                                       job.multires_noise_iterations, job.multires_noise_discount,
                                       job.noise_offset_random_strength)
                       for i, g in enumerate(gens)])
    noise_in = noise  # makes the U-Net's input; input perturbation adds to it, the target stays `noise`
    if job.ip_noise_gamma:
        noise_in = noise + torch.cat([nz.input_perturbation(noise[i:i + 1], g, job.ip_noise_gamma,
                                                            job.ip_noise_gamma_random_strength)
                                      for i, g in enumerate(gens)])
    t = t.to(device)
    noisy = nz.add_noise(latents, noise_in, t, run.alphas_cumprod)
    context = encode_captions(run, batch["captions"])
    with run.accelerator.autocast():
        pred = run.model.unet(noisy.to(run.weight_dtype), t,
                              encoder_hidden_states=context.to(run.weight_dtype)).sample
    huber_c = nz.huber_threshold(t, run.alphas_cumprod, job.huber_schedule, job.huber_c, job.huber_scale) \
        if job.loss_type in ("huber", "smooth_l1") else job.huber_c
    losses = nz.per_sample_loss(pred, noise, job.loss_type, huber_c)
    weights = batch["loss_weights"].to(device, torch.float32)
    if job.min_snr_gamma:
        weights = weights * nz.min_snr_weights(t, run.alphas_cumprod, job.min_snr_gamma)
    if job.debiased_estimation_loss:
        weights = weights * nz.debiased_weights(t, run.alphas_cumprod)
    return (losses * weights).mean()


def optimizer_step(run: Run, group: list[dict]) -> tuple[float, torch.Tensor | None]:
    """One optimizer step over a group of batches (this process takes its share): (mean loss, grad norm)."""
    job, method, world = run.job, run.method, run.world
    mine = group[run.rank::world]
    step_loss = torch.zeros((), device=run.device)
    step_batch_loss = lambda other, step, first: batch_loss(run, other, step, first)  # noqa: E731
    for k, batch in enumerate(mine):
        number = k * world + run.rank
        where = MicroBatch(run.global_step, number, number * len(batch["captions"]))
        loss = method.adjust_loss(batch_loss(run, batch, run.global_step, where.first_index), batch, where,
                                  step_batch_loss)
        step_loss += loss.detach() / len(mine)
        run.accelerator.backward(loss / len(mine))
    if world > 1:
        all_reduce_mean([p.grad for p in run.trainable if p.grad is not None])
        step_loss = run.accelerator.reduce(step_loss, "mean")
    if not torch.isfinite(step_loss):
        run.optimizer.zero_grad(set_to_none=True)
        save_training_state(run)
        raise TrainingStopped(
            f"the loss became {step_loss.item()} at step {run.global_step + 1} (epoch {run.epoch}); training "
            f"stopped and the last good state was saved in {run.output_dir}. Likely causes: "
            "mixed_precision = \"fp16\" overflowing (use \"bf16\"), or a learning rate too high.")
    grad_norm = run.accelerator.clip_grad_norm_(run.trainable, job.max_grad_norm) if job.max_grad_norm else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if getattr(job, "scale_weight_norms", None):  # LoRA methods only (train refuses it otherwise)
        run.max_norm = method.apply_max_norm(job.scale_weight_norms)
    method.after_optimizer_step(run.global_step + 1)
    if run.ema is not None:
        ema_update(run.ema, method.trainable_state(), job.ema_decay)
    run.global_step += 1
    run.done_in_epoch += len(group)
    return step_loss.item(), grad_norm


def save_weights(run: Run, suffix: str) -> list[Path]:
    """The user-facing file(s) `<output_name><suffix>…` (the EMA weights when the job keeps an average)."""
    if not run.is_main:
        return []
    job, method = run.job, run.method
    metadata = build_metadata(job, run.dataset, method, run.started, run.global_step, epoch_of_weights(run),
                              run.total_steps)
    path = run.output_dir / f"{job.output_name}{suffix}{method.artifact_suffix}"
    if run.ema is not None:
        raw = {k: v.detach().clone() for k, v in method.trainable_state().items()}
        method.load_trainable_state(run.ema)
    failed = None
    try:
        files = method.save(path, metadata, run.save_dtype, final=suffix == "")
    except WRITE_ERRORS as exc:
        failed = exc
    if run.ema is not None:
        method.load_trainable_state(raw)
    if failed is not None:  # the trained (not the EMA) weights go into the state
        raise SaveFailed(f"could not write {path}: {write_error_reason(failed)}. {_keep_state(run)}")
    log.info(f"saved {', '.join(str(f) for f in files)}")
    return files


def save_training_state(run: Run) -> Path | None:
    """The state folder `<output_name>-state`, for an exact resume."""
    if not run.is_main:
        return None
    job = run.job
    folder = run.output_dir / f"{job.output_name}-state"
    progress = Progress(run.global_step, run.epoch, run.done_in_epoch, run.world, job.seed, run.method.name,
                        run.epoch_batches, run.batches_per_step, run.batch_size)
    try:
        save_state(folder, progress, run.method.trainable_state(), run.optimizer.optimizer, run.scheduler,
                   run.accelerator.scaler, run.ema)
    except WRITE_ERRORS as exc:
        earlier = " (the state saved before it is intact)" if folder.is_dir() else ""
        raise SaveFailed(f"could not write the training state {folder}: {write_error_reason(exc)}{earlier}. "
                         "Free some space or fix the folder, then run again.") from None
    log.info(f"saved training state to {folder}")
    return folder


def _keep_state(run: Run) -> str:
    """After a failed weights file: save the state, so that nothing trained is lost; say how to go on."""
    try:
        folder = save_training_state(run)
    except SaveFailed as exc:
        return f"The training state could not be saved either ({exc})."
    return (f"The training state is saved in {folder}: free some space or fix the folder, then run the same job "
            f"with --resume {folder} to write the weights without training again.")


def validate(run: Run) -> None:
    """The held-out images' loss at fixed timesteps and noise (nothing without validation_split)."""
    if not run.validation_set:
        return
    from tqdm.auto import tqdm

    run.method.train_mode(False)
    with torch.no_grad():
        values = [batch_loss(run, b, 0, i * len(b["captions"]), validation=True).item()
                  for i, b in enumerate(run.validation_set)]
    run.method.train_mode(True)
    mean = sum(values) / len(values)
    run.result.validation.append((run.global_step, mean))
    if run.writer:
        run.writer.add_scalar("loss/validation", mean, run.global_step)
    if run.is_main:
        tqdm.write(f"step {run.global_step}: validation loss {mean:.5f} ({len(run.held_out)} held-out images)")


def do_what_is_due(run: Run, finished_epoch: int | None) -> None:
    """Saving, validation and sampling at their intervals (not at the very end: `finish` does that)."""
    job, suffix = run.job, run.method.artifact_suffix
    due = due_after_step(job, run.global_step, run.total_steps, finished_epoch)
    if due.save_step:
        save_weights(run, f"-step{run.global_step:08d}")
        prune_periodic_files(run.output_dir, job.output_name, "-step", 8, job.save_last_n_steps, suffix)
    if due.save_epoch:
        save_weights(run, f"-{finished_epoch:06d}")
        prune_periodic_files(run.output_dir, job.output_name, "-", 6, job.save_last_n_epochs, suffix)
    if due.state:
        run.result.state_dir = save_training_state(run)
    if due.validation:
        validate(run)
    if run.sampler and due.samples:
        run.sampler(run.global_step, finished_epoch if finished_epoch is not None else run.epoch)


def log_step(run: Run, loss: float, grad_norm, running: list[float], progress_bar) -> None:
    lrs = run.scheduler.get_last_lr()
    progress_bar.update(1)
    extra = {} if run.max_norm is None else {"keys_scaled": run.max_norm[0], "avg_norm": f"{run.max_norm[1]:.3g}"}
    progress_bar.set_postfix(epoch=run.epoch, loss=f"{sum(running) / len(running):.4f}", lr=f"{lrs[0]:.2e}", **extra)
    if run.writer:
        run.writer.add_scalar("loss/train", loss, run.global_step)
        for group_spec, lr, group in zip(run.param_groups, lrs, run.optimizer.optimizer.param_groups):
            run.writer.add_scalar(f"lr/{group_spec.get('name', 'params')}", lr, run.global_step)
            if "d" in group:  # D-Adaptation / Prodigy: the step size they estimated
                run.writer.add_scalar(f"lr/d*lr/{group_spec.get('name', 'params')}", group["d"] * group["lr"],
                                      run.global_step)
        if grad_norm is not None:
            run.writer.add_scalar("grad_norm", float(grad_norm), run.global_step)
        if run.max_norm is not None:
            for tag, value in zip(("keys_scaled", "average_key_norm", "max_key_norm"), run.max_norm):
                run.writer.add_scalar(f"max_norm/{tag}", value, run.global_step)


def finish(run: Run) -> TrainResult:
    """The end of a run: validation, the final weights, the state when asked, the last samples."""
    job, result = run.job, run.result
    validate(run)
    result.final_files = save_weights(run, "")
    if job.save_state or job.save_state_on_train_end:
        result.state_dir = save_training_state(run)
    if run.sampler and (job.sample_every_n_steps or job.sample_every_n_epochs):
        run.sampler(run.global_step, run.epoch)
    if run.writer:
        run.writer.close()
    result.seconds = time.time() - run.started
    result.peak_memory = peak_memory_text(run.device)
    if run.is_main:
        log.info(f"done: {run.global_step} steps in {result.seconds:.0f} s; {result.peak_memory}; "
                 f"weights: {', '.join(str(f) for f in result.final_files)}")
    return result


def _train(job: TrainingJob, method: Method, accelerator, state: LoadedState | None, started: float) -> TrainResult:
    from tqdm.auto import tqdm

    run = set_up(job, method, accelerator, state, started)
    if state is not None:
        resume(run, state)
    result = run.result
    if run.sampler and job.sample_at_first and run.global_step == 0:
        run.sampler(0, 0)
    validate(run)
    progress_bar = tqdm(total=run.total_steps, initial=run.global_step, disable=not run.is_main, desc="training",
                        unit="step")
    running: list[float] = []
    method.train_mode(True)
    with StopFlag() as stop:
        while run.global_step < run.total_steps and not result.interrupted:
            if run.done_in_epoch >= run.epoch_batches:  # check_position_fits refuses this; never spin on it
                raise AssertionError(f"epoch {run.epoch} position {run.done_in_epoch} is past its "
                                     f"{run.epoch_batches} batches")
            batches = run.dataset.batches(run.epoch, start=run.done_in_epoch, global_step=run.global_step,
                                          accumulation_steps=run.batches_per_step)
            while run.done_in_epoch < run.epoch_batches and run.global_step < run.total_steps:
                step_started = time.perf_counter()
                group = [next(batches) for _ in range(min(run.batches_per_step,
                                                          run.epoch_batches - run.done_in_epoch))]
                loss, grad_norm = optimizer_step(run, group)
                result.losses.append(loss)
                result.step_seconds.append(time.perf_counter() - step_started)
                running = (running + [loss])[-50:]
                log_step(run, loss, grad_norm, running, progress_bar)
                epoch_done = run.done_in_epoch >= run.epoch_batches
                if epoch_done:
                    run.epoch, run.done_in_epoch = run.epoch + 1, 0
                do_what_is_due(run, run.epoch - 1 if epoch_done else None)
                if stop.signal is not None:
                    result.state_dir = save_training_state(run)
                    result.final_files = save_weights(run, f"-step{run.global_step:08d}")
                    result.interrupted = True
                    break
                if epoch_done:
                    break
    progress_bar.close()
    result.global_step = run.global_step
    if result.interrupted:
        result.seconds = time.time() - started
        if run.is_main:
            log.info(f"interrupted at step {run.global_step}; resume with --resume {result.state_dir}")
        return result
    return finish(run)


def _warn_long_captions(dataset, tokenizer, max_token_length: int, weighted: bool = False) -> None:
    """Captions past max_token_length are cut in training (as in every SD1 UI): say so once, with the worst.
    With weighted_captions the brackets and weights are not counted (they are not tokens)."""
    captions = dataset.full_captions()
    if weighted:
        captions = ((source, plain_text(text)) for source, text in captions)
    found = long_captions(tokenizer, captions, max_token_length)
    if not found:
        return
    path, n = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    hint = "set max_token_length = 150 or 225, or shorten them" if max_token_length < 225 else "shorten them"
    log.warning(f"{len(found)} caption(s) are longer than max_token_length = {max_token_length} tokens and are cut "
                f"there in training: {path} ({n} tokens){more}; {hint}.")


def _in_training_sampler(job: TrainingJob, model, device, method: Method):
    """A callable (step, epoch) that writes sample images, or None when the job samples nothing."""
    if not job.sample_prompts:
        return None
    from library.sampling import make_training_sampler

    return make_training_sampler(job, model, device, eval_modules=method.modules(),
                                 trains_network=method.saves_network, embedding_tokens=method.prompt_tokens())


def run_training_job(job: TrainingJob, method: Method) -> TrainResult:
    """What every training script does with its job: train, and exit with 130 when interrupted (the state
    and weights were saved, so the run resumes)."""
    result = train(job, method)
    if result.interrupted:
        raise SystemExit(130)
    return result
