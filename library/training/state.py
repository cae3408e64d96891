"""Training state on disk, for an exact resume: weights, optimizer, scheduler, scaler, RNG and position.

A state is a folder written atomically (a temporary folder renamed into place). Only tensors, numbers
and plain containers are stored, and they are read back with `torch.load(weights_only=True)`. A state
that a crash left between two renames is recovered; a damaged one is refused with the file's name.
"""

from __future__ import annotations

import json
import random
import logging
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from library.errors import ConfigError
from library.fileio import atomic_dir, recover_dir

if TYPE_CHECKING:
    from library.job_types import TrainingJob
    from library.training.method import Method

log = logging.getLogger("pentadactyl")

STATE_VERSION = 1
REQUIRED_FILES = ("progress.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
_DAMAGED = ("this state cannot be resumed. Resume from another state folder, or start the run again "
            "(the weights files saved so far are not affected).")


@dataclass
class Progress:
    global_step: int
    epoch: int  # the epoch in progress, counted from 1
    batches_done_in_epoch: int  # batches of `epoch` already consumed, over all processes
    num_processes: int
    seed: int
    method: str
    # how the run cut its epochs into steps (absent in states of earlier versions)
    batches_per_epoch: int | None = None
    batches_per_step: int | None = None
    batch_size: int | None = None


def save_state(folder: Path, progress: Progress, trainable: dict[str, torch.Tensor], optimizer, scheduler,
               scaler=None, ema: dict[str, torch.Tensor] | None = None) -> Path:
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        version, internal, gauss = random.getstate()
        rng = {"torch": torch.get_rng_state(), "python": list(internal), "python_version": version,
               "python_gauss": gauss}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "progress.json").write_text(json.dumps({"version": STATE_VERSION, **asdict(progress)}, indent=2))
    return folder


@dataclass
class LoadedState:
    progress: Progress
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict
    ema: dict[str, torch.Tensor] | None


def load_state(folder: Path) -> LoadedState:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"resume = \"{folder}\": no such folder. Point resume at a folder written by save_state "
                          "or by an interrupted run (<output_name>-state in the output_dir).")
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"resume = \"{folder}\": not a training-state folder (missing {', '.join(missing)}). "
                          "Point resume at a folder written by save_state or by an interrupted run (…-state).")
    progress = _read_progress(folder / "progress.json")
    ema_path = folder / "ema.safetensors"
    return LoadedState(progress, _read_tensors(folder / "trainable.safetensors"), _read_pickle(folder / "optimizer.pt"),
                       _read_pickle(folder / "scheduler.pt"), _read_pickle(folder / "scaler.pt"),
                       _read_pickle(folder / "rng.pt"), _read_tensors(ema_path) if ema_path.is_file() else None)


def recover_state(folder: Path) -> bool:
    """Finish a state save that a crash cut between its two renames (see `recover_dir`); True if it did."""
    return recover_dir(folder, _is_complete) is not None


def _is_complete(folder: Path) -> bool:
    """A state folder whose every file was written (progress.json is the last one)."""
    try:
        return all((folder / n).is_file() for n in REQUIRED_FILES) and bool(
            json.loads((folder / "progress.json").read_text()))
    except (OSError, ValueError):
        return False


def _read_progress(path: Path) -> Progress:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); {_DAMAGED}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path} is damaged (it holds no JSON object); {_DAMAGED}")
    if info.pop("version", None) != STATE_VERSION:
        raise ConfigError(f"{path}: state written by an incompatible version of pentadactyl; start the run again.")
    known = {f.name: f for f in fields(Progress)}
    required = [n for n, f in known.items() if f.default is MISSING]
    absent = [n for n in required if n not in info]
    wrong = [n for n in info if n not in known or (n in required and not isinstance(info[n], (int, str)))]
    if absent or wrong:
        problem = f"lacks {', '.join(absent)}" if absent else f"has unexpected {', '.join(wrong)}"
        raise ConfigError(f"{path} is incomplete or damaged (it {problem}); {_DAMAGED}")
    return Progress(**info)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is damaged ({path.stat().st_size} bytes; {exc}); {_DAMAGED}") from None


def _read_pickle(path: Path):
    from library.safe_pickle import load_pickle

    if not path.is_file():
        return None
    return load_pickle(path, ConfigError, "training-state file", damaged=_DAMAGED,
                       fix="A state written by pentadactyl holds only tensors and numbers: this file was replaced; "
                           "delete the state folder and start the run again.")


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- does a saved state fit this run


def check_state_fits_job(state: LoadedState, job: TrainingJob, method: Method) -> None:
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
