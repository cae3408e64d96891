"""Training state on disk, for an exact resume: weights, optimizer, scheduler, scaler, RNG and position.

A state is a folder written atomically (a temporary folder renamed into place). Only tensors, numbers
and plain containers are stored, and they are read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from library.errors import ConfigError
from library.fileio import atomic_dir

STATE_VERSION = 1


@dataclass
class Progress:
    global_step: int
    epoch: int  # 0-based epoch in progress
    batches_done_in_epoch: int  # local micro-batches of `epoch` already consumed
    num_processes: int
    seed: int
    method: str


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
    needed = ("progress.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"resume = \"{folder}\": not a training-state folder (missing {', '.join(missing)}). "
                          "Point resume at a folder written by save_state or by an interrupted run (…-state).")
    info = json.loads((folder / "progress.json").read_text())
    if info.pop("version", None) != STATE_VERSION:
        raise ConfigError(f"resume = \"{folder}\": state written by an incompatible version of pentadactyl.")

    def load(name):
        path = folder / name
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    ema_path = folder / "ema.safetensors"
    return LoadedState(Progress(**info), load_file(str(folder / "trainable.safetensors")), load("optimizer.pt"),
                       load("scheduler.pt"), load("scaler.pt"), load("rng.pt"),
                       load_file(str(ema_path)) if ema_path.is_file() else None)


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
