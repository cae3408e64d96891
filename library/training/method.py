"""What differs between the three trainers: a small "method" object the one loop drives.

A method decides which parameters train, how captions are rewritten, what is saved, and what happens
after each optimizer step. Everything else (noise, loss, precision, saving cadence, resume, logging,
sampling) belongs to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from library.job_types import TrainingJob
from library.models.loading import SD1Model


@dataclass
class TrainContext:
    job: TrainingJob
    model: SD1Model
    device: torch.device
    weight_dtype: torch.dtype  # dtype of frozen weights (fp32, or bf16/fp16 under mixed precision)
    rank: int = 0  # this process's index, and how many train together (DDP)
    world: int = 1
    wait_for_everyone: Callable[[], None] = lambda: None  # a barrier across the processes
    start_step: int = 0  # the global step the run starts from (a resumed run's saved step)


@dataclass(frozen=True)
class MicroBatch:
    """Where a micro-batch sits in the run: its optimizer step, its number within the step (counted over
    all processes), and the index of its first sample (which, with the seed, fixes its noise)."""

    step: int
    number: int
    first_index: int




class Method:
    """Base class; subclasses override what they need."""

    name = "method"
    artifact_suffix = ".safetensors"
    saves_network = False  # the artifact is a LoRA file (samples are then labelled <lora:name:1>)
    # model parts ("unet", "text_encoder") this method trains in full: the loop keeps them in float32
    # under mixed precision instead of casting them to the frozen-weight dtype
    full_precision_parts: tuple[str, ...] = ()
    # nothing of this method reads or writes the token embedding's table but the text encoder's own lookup: a
    # frozen float32 table may then be kept in float16 when that is exact (library.models.lean)
    half_token_embedding = False

    def setup(self, ctx: TrainContext) -> list[dict]:
        """Make the model trainable as this method wants; return optimizer param groups (each with "lr")."""
        raise NotImplementedError

    @property
    def needs_text_encoder_grad(self) -> bool:
        """Whether gradients must flow through the text encoder (it or something in it trains); if not, the
        loop encodes each distinct caption once, without gradients."""
        return False

    def before_dataset(self, ctx: TrainContext) -> None:
        """Called after setup, before the dataset is read (DreamBooth generates missing class images here)."""

    def adjust_loss(self, loss: torch.Tensor, batch: dict, where: "MicroBatch",
                    batch_loss: Callable[[dict, int, int], torch.Tensor]) -> torch.Tensor:
        """The loss to back-propagate for one micro-batch (default: unchanged).

        `batch_loss(other_batch, step, first_sample_index)` computes the loop's loss for any batch with
        the same noise rules, e.g. for a contrastive term on a second image set.
        """
        return loss

    def caption_replacements(self) -> dict[str, str] | None:
        return None

    def dataset_options(self) -> dict[str, Any]:
        """Extra TrainDataset arguments (textual inversion: caption_templates, template_token)."""
        return {}

    def prompt_tokens(self) -> dict[str, list[str]]:
        """Tokens this method adds to prompts for sampling: {name: [tokens]} (a multi-vector embedding)."""
        return {}

    def modules(self) -> list[torch.nn.Module]:
        """The modules this method trains or adds (switched to eval mode while sampling)."""
        return []

    def train_mode(self, training: bool) -> None:
        """Switch the trained modules between train() and eval()."""
        for module in self.modules():
            module.train(training)

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (counted from 1; textual inversion checks the frozen rows)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, by stable names: saved in the training state, averaged by EMA."""
        raise NotImplementedError

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, path: Path, metadata: dict[str, str], dtype: torch.dtype, final: bool = False) -> list[Path]:
        """Write the user-facing artifact(s) atomically, their weights in `dtype` (the job's save_precision);
        `final`: the save at the end of the run (not a periodic or interrupted one)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """Method-specific ss_* metadata."""
        return {}

    def summary(self) -> str:
        """One line for the log: what trains."""
        return self.name
