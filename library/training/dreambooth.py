"""DreamBooth: a subject from a few images, with prior preservation; trained as a LoRA or in full.

    job = load_job("train_dreambooth", argv)
    result = train(job, make_method(job))      # DreamBoothLoRA or DreamBoothFull

Instance and class images. Instance images are ordinary subsets ("a photo of sks hand"); class
(regularisation) images are subsets with `is_reg = true` ("a photo of hand"). The dataset balances them
as sd-scripts does (reg samples per epoch = instance images × repeats) and gives class samples the loss
weight λ = prior_loss_weight. A batch is drawn from one bucket, so instance and class samples share a
batch whenever they share a bucket; its loss is

    (Σ_instance l_i + λ · Σ_class l_c) / batch_size,

the per-sample form of "instance loss + λ · class loss". Over an epoch there are as many class samples
as instance samples, so the expected step loss is ½ (L_instance + λ · L_class): the same objective as
diffusers' paired batches (one instance + one class image per step) up to the factor ½, with each image
seen half as often per step. Why not pairs: instance and class images may have different aspect ratios
(different buckets), pairs would double the memory of every step (a full fine-tune at batch 1 is the
common case on 12–24 GB cards), and sd-scripts, whose step counts users carry over, mixes them the same way.

Class images. With `num_class_images = N`, each is_reg folder holding fewer than N images gets the
missing ones, generated with the base model at `class_prompt` (see library/training/class_images.py),
before the dataset is read (`Method.before_dataset`: the model is loaded once, and the network or the
fine-tune has not changed it yet). The folder may be missing or empty until then: a TOML subset's
image_dir is only checked when the dataset is read; for folder mode (`reg_data_dir`, which the job
loader checks) train_dreambooth.py creates `reg_data_dir/1_<class_prompt>` first.

stop_text_encoder_training = N trains the text encoder for steps 1…N only. After step N its parameters
are set to requires_grad=False, so their gradients stay None and the optimizer skips them (Adam's
moments and the weights freeze as they are; they stay in the optimizer so a resumed state still fits),
and the loop switches to its cached, no-grad caption encoding. A resumed run reads the step from the
state folder and freezes at once when it is already past N. 0 or a negative value: never trained.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch

from library.job_types import DreamBoothJob
from library.errors import ConfigError
from library.training.method import Method, TrainContext
from library.training.network_method import NetworkMethod, part_learning_rates
from library.training.rules import reg_subsets

log = logging.getLogger("pentadactyl")

def make_method(job: DreamBoothJob) -> Method:
    return DreamBoothFull(job) if job.dreambooth_mode == "full" else DreamBoothLoRA(job)


# ------------------------------------------------------------------------------------------ shared parts


def make_class_images(ctx: TrainContext, eval_modules) -> None:
    """Generate the missing class images of every is_reg subset (main process; the others wait)."""
    from library.training.class_images import check_writable, generate_class_images, plan_class_images

    job = cast("DreamBoothJob", ctx.job)
    if not job.num_class_images:
        return
    is_main = ctx.rank == 0
    plans = []
    for ds, sub in reg_subsets(job.datasets):
        plan = plan_class_images(sub.image_dir, job.class_prompt or sub.class_tokens, job.num_class_images,
                                 job.seed, ds.resolution)
        if plan.missing:
            check_writable(plan, sub.where)
        if is_main:
            log.info(f"class images in {sub.image_dir}: {plan.existing} found, {len(plan.missing)} to generate "
                     f"(num_class_images = {job.num_class_images})")
        plans.append(plan)
    if is_main and any(p.missing for p in plans):
        from library.sampling.run import job_sampler

        sampler = job_sampler(ctx.model, job, device=ctx.device, sampler=job.class_image_sampler,
                              autocast_dtype=None if ctx.weight_dtype == torch.float32 else ctx.weight_dtype,
                              eval_modules=eval_modules, progress=False)
        written = generate_class_images(plans, sampler, job.class_negative_prompt, job.class_image_steps,
                                        job.class_image_cfg_scale, job.class_image_sampler,
                                        job.class_image_batch_size)
        log.info(f"generated {len(written)} class image(s)")
    ctx.wait_for_everyone()


class TextEncoderStop:
    """stop_text_encoder_training for either mode: which step, and freezing the parameters then."""

    def __init__(self, job: DreamBoothJob):
        self.stop = job.stop_text_encoder_training
        self.step = 0  # optimizer steps done, set by start()
        self.params: list[torch.nn.Parameter] = []

    @property
    def never(self) -> bool:
        return self.stop is not None and self.stop <= 0

    @property
    def active(self) -> bool:
        return bool(self.params) and (self.stop is None or self.step < self.stop)

    def start(self, params: list[torch.nn.Parameter], step: int) -> None:
        self.params, self.step = params, step
        if not self.active:
            self._freeze()

    def after_step(self, step: int) -> None:
        self.step = step
        if self.params and self.stop is not None and self.step == self.stop:
            log.info(f"step {self.step}: text-encoder training stops (stop_text_encoder_training)")
            self._freeze()

    def _freeze(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None


def _dreambooth_metadata(job: DreamBoothJob) -> dict[str, str]:
    meta = {"ss_dreambooth_mode": job.dreambooth_mode, "ss_num_class_images": str(job.num_class_images),
            "ss_stop_text_encoder_training": str(job.stop_text_encoder_training)}
    if not job.no_dataset_metadata and job.class_prompt:
        meta["ss_class_prompt"] = job.class_prompt
    return meta


# ------------------------------------------------------------------------------------------ LoRA mode


class DreamBoothLoRA(NetworkMethod):
    """train_network's LoRA method plus class images and stop_text_encoder_training."""

    name = "dreambooth_lora"

    def __init__(self, job: DreamBoothJob):
        self.te_stop = TextEncoderStop(job)
        if self.te_stop.never:
            job = job.replace(network_train_unet_only=True)
        super().__init__(job)

    @property
    def needs_text_encoder_grad(self) -> bool:
        return self.te_lr > 0 and self.te_stop.active

    def setup(self, ctx: TrainContext) -> list[dict]:
        groups = super().setup(ctx)
        self.te_stop.start([p for g in groups if g["name"] == "text_encoder" for p in g["params"]], ctx.start_step)
        return groups

    def before_dataset(self, ctx: TrainContext) -> None:
        self.network.set_multiplier(0.0)  # class images show the base model, even with network_weights
        try:
            make_class_images(ctx, self.modules())
        finally:
            self.network.set_multiplier(1.0)

    def after_optimizer_step(self, step: int) -> None:
        self.te_stop.after_step(step)

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), **_dreambooth_metadata(cast("DreamBoothJob", self.job))}

    def summary(self) -> str:
        stop = self.te_stop.stop
        te = "" if not self.te_lr or stop is None else f"; text encoder until step {stop}"
        return "DreamBooth " + super().summary() + te


# ------------------------------------------------------------------------------------------ full mode


class DreamBoothFull(Method):
    """Fine-tune the U-Net (and the text encoder until stop_text_encoder_training); save a checkpoint."""

    name = "dreambooth_full"
    # the text encoder stays float32 even when frozen: the checkpoint then holds its exact base weights
    full_precision_parts = ("unet", "text_encoder")

    def __init__(self, job: DreamBoothJob):
        self.job = job
        self.unet_lr, self.te_lr = part_learning_rates(job)
        self.te_stop = TextEncoderStop(job)
        if self.te_stop.never:
            self.te_lr = 0.0
        self.model = None

    @property
    def needs_text_encoder_grad(self) -> bool:
        return self.te_lr > 0 and self.te_stop.active

    def _parts(self) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.model.unet} if self.unet_lr > 0 else {}
        if self.te_lr > 0:
            parts["text_encoder"] = self.model.text_encoder
        return parts

    def setup(self, ctx: TrainContext) -> list[dict]:
        self.model = ctx.model
        for module in (ctx.model.unet, ctx.model.text_encoder):
            if next(module.parameters()).dtype != torch.float32:  # the loop keeps full_precision_parts in fp32
                raise RuntimeError("full fine-tune needs float32 weights; the loop did not keep them")
        groups = []
        for name, lr in (("text_encoder", self.te_lr), ("unet", self.unet_lr)):
            module = getattr(ctx.model, name)
            module.requires_grad_(lr > 0)
            if lr > 0:
                groups.append({"params": list(module.parameters()), "lr": lr, "name": name})
        self.te_stop.start(groups[0]["params"] if self.te_lr > 0 else [], ctx.start_step)
        return groups

    def before_dataset(self, ctx: TrainContext) -> None:
        make_class_images(ctx, self.modules())

    def modules(self) -> list[torch.nn.Module]:
        return list(self._parts().values())

    def after_optimizer_step(self, step: int) -> None:
        self.te_stop.after_step(step)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{name}": p for part, module in self._parts().items() for name, p in module.named_parameters()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.trainable_state()
        if set(state) != set(mine):
            raise ConfigError("resume: the training state does not hold this job's trained parts (it was written "
                              "with other unet_lr / text_encoder_lr settings); resume with the same settings.")
        for key, value in state.items():
            mine[key].copy_(value)

    def save(self, path: Path, metadata: dict[str, str], dtype: torch.dtype, final: bool = False) -> list[Path]:
        from library.models.loading import save_sd1_diffusers, save_sd1_single_file

        meta = dict(metadata)
        if meta:  # no_metadata leaves the file bare
            meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
                    "modelspec.title": self.job.output_name, "modelspec.prediction_type": "epsilon", **meta}
        save_sd1_single_file(path, self.model, dtype, meta)
        files = [path]
        if self.job.save_diffusers_folder and final:
            folder = path.with_suffix("")
            save_sd1_diffusers(folder, self.model)
            files.append(folder)
        return files

    def metadata(self) -> dict[str, str]:
        return {"ss_unet_lr": repr(self.unet_lr), "ss_text_encoder_lr": repr(self.te_lr),
                **_dreambooth_metadata(self.job)}

    def summary(self) -> str:
        parts = []
        for name, module in self._parts().items():
            n = sum(p.numel() for p in module.parameters())
            label = name.replace("_", " ")
            if name == "text_encoder" and self.te_stop.stop is not None:
                label += f" until step {self.te_stop.stop}"
            parts.append(f"{label} ({n:,} parameters)")
        return "DreamBooth full fine-tune: " + ", ".join(parts)
