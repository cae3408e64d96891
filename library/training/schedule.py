"""When things happen in a run: what falls due after a step, the fixed timesteps of validation, and
which periodic files are kept. Pure functions of the job's intervals and the position."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from library.job_types import TrainingJob


@dataclass(frozen=True)
class Due:
    """What falls due after one optimizer step."""

    save_step: bool = False  # a -stepNNNNNNNN file
    save_epoch: bool = False  # a -NNNNNN file for the epoch just finished
    state: bool = False  # the training state, with either save
    validation: bool = False
    samples: bool = False


def due_after_step(job: TrainingJob, global_step: int, total_steps: int, finished_epoch: int | None) -> Due:
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


def prune_periodic_files(folder: Path, name: str, marker: str, width: int, keep: int | None, suffix: str) -> None:
    """Keep only the periodic files of the last `keep` steps/epochs (sd-scripts' save_last_n_*)."""
    if not keep:
        return
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(marker)}(\d{{{width}}}){re.escape(suffix)}$")
    found = sorted((int(m.group(1)), p) for p in folder.glob(f"{name}*{suffix}") if (m := pattern.match(p.name)))
    newest = found[-1][0] if found else 0
    for number, path in found:
        if number <= newest - keep:
            path.unlink()
