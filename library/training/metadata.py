"""The `ss_*` training metadata that A1111, ComfyUI and LoRA browsers show, filled from the real run."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

from library.job_types import TrainingJob
from library.dataset import DATASET_REVEALING_KEYS


@functools.lru_cache(maxsize=4)
def vae_metadata(path: str) -> dict[str, str]:
    """sd-scripts' record of a separate VAE: its file name, and for a file its legacy hash (sha256 of the 64 KiB
    at 1 MiB, 8 hex digits) and its full sha256. Hashed once per run, not at every save."""
    meta = {"ss_vae_name": Path(path).name}
    if Path(path).is_file():
        legacy, full = hashlib.sha256(), hashlib.sha256()
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            legacy.update(handle.read(0x10000))
            handle.seek(0)
            for block in iter(lambda: handle.read(1 << 20), b""):
                full.update(block)
        meta.update({"ss_vae_hash": legacy.hexdigest()[:8], "ss_new_vae_hash": full.hexdigest()})
    return meta


def build_metadata(job: TrainingJob, dataset, method, started: float, step: int, epoch: int, total_steps: int) -> dict[str, str]:
    if job.no_metadata:
        return {}
    lr = job.learning_rate
    meta = {
        "ss_session_id": str(int(started)),
        "ss_training_started_at": repr(float(started)),
        "ss_training_finished_at": repr(time.time()),
        "ss_output_name": job.output_name,
        "ss_sd_model_name": Path(job.pretrained_model_name_or_path).name,
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": str(tuple(job.datasets[0].resolution)) if job.datasets else "(512, 512)",
        "ss_steps": str(step),
        "ss_max_train_steps": str(total_steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": repr(lr),
        "ss_lr_scheduler": job.lr_scheduler,
        "ss_lr_warmup_steps": str(job.lr_warmup_steps),
        "ss_optimizer": job.optimizer_type + (f"({','.join(job.optimizer_args)})" if job.optimizer_args else ""),
        "ss_mixed_precision": job.mixed_precision,
        "ss_gradient_accumulation_steps": str(job.gradient_accumulation_steps),
        "ss_max_grad_norm": repr(job.max_grad_norm),
        "ss_gradient_checkpointing": str(job.gradient_checkpointing),
        "ss_seed": str(job.seed),
        "ss_clip_skip": str(job.clip_skip),
        "ss_max_token_length": str(job.max_token_length),
        "ss_noise_offset": repr(job.noise_offset),
        "ss_min_snr_gamma": repr(job.min_snr_gamma) if job.min_snr_gamma is not None else "None",
        "ss_loss_type": job.loss_type,
        "ss_huber_schedule": job.huber_schedule,
        "ss_huber_c": repr(job.huber_c),
        "ss_huber_scale": repr(job.huber_scale),
        "ss_prior_loss_weight": repr(job.prior_loss_weight),
    }
    meta.update({k: v for k, v in dataset.training_metadata().items()
                 if not (job.no_dataset_metadata and k in DATASET_REVEALING_KEYS)})
    if job.training_comment:
        meta["ss_training_comment"] = job.training_comment
    if job.vae:
        meta.update(vae_metadata(job.vae))
    for key in ("title", "author", "description", "license", "tags"):  # sd-scripts' metadata_* keys
        if getattr(job, f"metadata_{key}", None):
            meta[f"modelspec.{key}"] = getattr(job, f"metadata_{key}")
    for key, value in method.metadata().items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta
