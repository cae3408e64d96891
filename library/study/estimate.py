"""How long a study's rows will take, from measured seconds per step, before anything runs (`study.py --plan`).

Which figures apply: the base model's U-Net parameter count, read from the safetensors header (the 8-byte
length and the JSON table of names, dtypes and shapes at the start of the file; no weight is read, so a
2 GB checkpoint costs a few hundred kilobytes of reading). The count names the architecture whatever the
file's precision, its EMA copy or its text encoder and VAE: every SD1.x checkpoint (SD1.5, its fine-tunes and
merges) has an 859,520,964-parameter U-Net, the toy hand model 1,489,028, the tiny test model 1,120,548. The
file size cannot tell these apart (the fp32 tiny model is larger than the fp16 toy model) and says nothing
of the architecture. A count within 0.1 % of a table entry takes that entry (an SD1.5 inpainting U-Net's
wider input layer adds 0.002 %; SD2's U-Net, 0.74 % larger, is not SD1.x). A diffusers folder is read from
unet/diffusion_pytorch_model.safetensors. A file with no safetensors header (.ckpt, .bin) falls back on its
size: over 1 GB is taken as the SD1.x layout.
Anything else, or a model that does not exist yet, is "unknown model: no estimate".

Scaling, from one measured figure per model (and training kind and precision):

    training  = s/step × (pixels / measured pixels) × (images per step / measured batch) × steps
    sampling  = s per image per denoising step × (pixels / measured pixels) × denoising steps × images

pixels: width × height of the row's `resolution` (the bucket area; [[datasets]], then [general], then the
job's top level, as the dataset loader looks them up; 512 when none is set); images per step: the batch
size × gradient_accumulation_steps (the largest over the job's datasets); steps: max_train_steps (the
script's default when unset). A job with max_train_epochs has an unknown length here: its steps depend on
the number of images, repeats and buckets, which the plan does not count. Images sampled: the row's
checkpoints before its last step and its final weights at each multiplier, times prompts × seeds.

What this leaves out, so read the numbers as the order of magnitude they are: cost grows faster than the
pixel count at larger sizes (attention is quadratic in the latent's positions), so estimates far above the
measured size are low; a lighter network (attention only, no text encoder) trains faster than the measured
LoRA + LoCon + text encoder, gradient checkpointing slower; model loading, latent caching and saving are
not counted (except in the toy figures, which time whole runs); sampling was measured with CFG (two U-Net
passes per step), so cfg_scale = 1 (one pass, which the sampler then does) is halved, an approximation.
The figures are CPU figures of one machine; none was measured on a GPU yet, so a GPU run gets the CPU
estimate, far too long (the basis names the CPU each figure comes from).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from library.errors import PentadactylError
from library.schema import load_toml
from library.scripts import SCRIPTS
from library.study.plan import Row, Study

CPU = "2 vCPU Intel Xeon @ 2.80 GHz (AVX-512, no bf16), CPU only"
SIZE_FALLBACK_BYTES = 1_000_000_000  # a checkpoint without a safetensors header and over 1 GB: the SD1.x layout
PARAMETER_TOLERANCE = 0.001  # a U-Net within 0.1 % of an entry's parameter count is taken as that architecture
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the header's length


@dataclass(frozen=True)
class Measured:
    """One measurement: seconds per training step, or per sampled image per denoising step."""

    seconds: float
    width: int
    height: int
    batch: int  # training: images per step; sampling: images denoised together when it was timed
    source: str  # the bench and what was timed
    cpu: str = CPU  # the machine it ran on

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class ModelFigures:
    name: str
    unet_parameters: int
    # training kind ("adapter": LoRA, LoCon, textual inversion, DreamBooth LoRA; "full": every U-Net and text
    # encoder weight) → mixed_precision ("no", "bf16", "fp16") → the measurement; absent: not measured
    train: Mapping[str, Mapping[str, Measured]]
    sample: Measured | None  # fp32, with CFG


# Every figure below is from bench/RESULTS.md, measured on the CPU named in CPU; the line numbers are that
# file's. No figure was measured on a GPU yet (fp16 training runs on CUDA only): none is listed.
FIGURES: tuple[ModelFigures, ...] = (
    ModelFigures(
        "SD1.x layout", 859_520_964,
        train={"adapter": {
            # bench/bench_train_sd15.py, 2 vCPU Xeon, fp32 (mixed_precision = "no"), 256×256, batch 1, LoRA
            # rank 16 on attention + text encoder and LoCon conv rank 8, cached latents: steady-state step
            # 5.09 s (RESULTS.md line 21)
            "no": Measured(5.09, 256, 256, 1, "bench_train_sd15.py, fp32"),
            # the same bench and CPU in bf16 (slower: this CPU has no bf16 instructions): 8.27 s (line 21)
            "bf16": Measured(8.27, 256, 256, 1, "bench_train_sd15.py, bf16"),
        }},
        # bench/bench_sampling.py, 2 vCPU Xeon (other jobs running: an upper bound), fp32, 256×256, one
        # image, DDIM 20 steps, CFG 7.5 (two U-Net passes per step), VAE decode included, 1 torch thread:
        # 114.5 s/image (line 180), i.e. 5.725 s per image per step
        sample=Measured(114.5 / 20, 256, 256, 1, "bench_sampling.py, fp32, CFG, 1 thread"),
    ),
    ModelFigures(
        "toy hand model", 1_489_028,
        train={
            # the first toy study driver, 2 CPU cores of the same Xeon with 2 threads, fp32, 64×64, batch 8:
            # 60–113 s per 300-step training run (bench/RESULTS.md, "The study in miniature"); the slowest,
            # 113 s / 300 = 0.377 s/step (contrastive negative TI), whole runs with loading, caching and saving
            "adapter": {"no": Measured(113 / 300, 64, 64, 8, "toy study, 300-step runs, fp32")},
            # toy_hands.pretrain run 2, 2 CPU cores of the same Xeon, fp32, 64×64, batch 32, every U-Net and
            # text-encoder weight: 0.55–0.65 s/step (line 281); the slower end
            "full": {"no": Measured(0.65, 64, 64, 32, "toy_hands.pretrain, fp32")},
        },
        # toy_hands.study, 2 CPU cores of the same Xeon, fp32, 64×64, DDIM 30 steps, CFG 7.5, batch 25:
        # about 0.45 s per image (line 308), i.e. 0.015 s per image per step
        sample=Measured(0.45 / 30, 64, 64, 25, "toy study, fp32, CFG, batch 25"),
    ),
    ModelFigures(
        "tiny test model", 1_120_548,
        train={},  # no training figure was recorded for the tiny model
        # bench/bench_sampling.py, 2 vCPU Xeon (other jobs running), fp32, 64×64, one image, DDIM 20 steps,
        # CFG 7.5, 1 torch thread: 0.54–0.72 s/image (line 179); the slower end, 0.036 s per image per step
        sample=Measured(0.72 / 20, 64, 64, 1, "bench_sampling.py, fp32, CFG, 1 thread"),
    ),
)


@dataclass(frozen=True)
class RowEstimate:
    train_seconds: float | None  # None: no estimate (see basis); 0 for a row that trains nothing
    sample_seconds: float | None
    basis: str  # how the numbers were reached, or why there are none

    @property
    def total_seconds(self) -> float | None:
        if self.train_seconds is None or self.sample_seconds is None:
            return None
        return self.train_seconds + self.sample_seconds


# ------------------------------------------------------------------------------------------ the model

def figures_for_unet_parameters(count: int) -> ModelFigures | None:
    """The table entry whose U-Net has (within PARAMETER_TOLERANCE) `count` parameters, or None."""
    if count <= 0:
        return None
    best = min(FIGURES, key=lambda f: abs(math.log(count / f.unet_parameters)))
    return best if abs(count - best.unet_parameters) <= PARAMETER_TOLERANCE * best.unet_parameters else None


def figures_for_file_size(size: int) -> ModelFigures | None:
    """For a checkpoint without a safetensors header: the SD1.x layout when over 1 GB, else None."""
    return FIGURES[0] if size > SIZE_FALLBACK_BYTES else None


def safetensors_shapes(path: Path) -> dict[str, list[int]] | None:
    """Tensor name → shape from a safetensors file's header, without reading any weight; None when the file
    has no readable safetensors header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length <= 1 or length > _MAX_HEADER:
                return None
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)):
            return None
        shapes[name] = info["shape"]
    return shapes


def unet_parameters(shapes: Mapping[str, list[int]], prefix: str = "model.diffusion_model.") -> int:
    """Parameters of the tensors under `prefix` (single-file SD1 layout; "" for a diffusers U-Net file)."""
    return sum(math.prod(shape) for name, shape in shapes.items() if name.startswith(prefix))


def identify_model(path: Path) -> tuple[ModelFigures | None, str]:
    """The figures for the model at `path`, and how it was recognised (or why not)."""
    path = Path(path)
    prefix = "model.diffusion_model."
    if path.is_dir():
        path, prefix = path / "unet" / "diffusion_pytorch_model.safetensors", ""
    if not path.is_file():
        return None, f"{path} does not exist yet"
    shapes = safetensors_shapes(path)
    if shapes is None:
        figures = figures_for_file_size(path.stat().st_size)
        how = f"no safetensors header; {path.stat().st_size / 1e9:.2f} GB on disk"
        return figures, how + (f" → {figures.name}" if figures else "")
    count = unet_parameters(shapes, prefix)
    figures = figures_for_unet_parameters(count)
    return figures, f"U-Net of {count:,} parameters" + (f" → {figures.name}" if figures else "")


# ------------------------------------------------------------------------------------------ the row's job

def _pixels(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value * value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return value[0] * value[1]
    return None


def _first(key: str, layers: list[Mapping[str, Any]], default: Any) -> Any:
    for layer in layers:
        if isinstance(layer, Mapping) and layer.get(key) is not None:
            return layer[key]
    return default


def row_job(row: Row) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The row's job with its overrides, as the study writes it: (top-level keys, [general], [[datasets]])."""
    assert row.job is not None
    table = load_toml(row.job)
    overrides = dict(row.overrides)
    general = {**table.pop("general", {}), **overrides.pop("general", {})}
    datasets = overrides.pop("datasets", table.pop("datasets", None))
    keys = {**table, **overrides}
    if not general and not datasets and isinstance(keys.get("dataset_config"), str):
        dataset_file = Path(keys["dataset_config"])  # relative to the folder the command runs in, as in training
        if dataset_file.is_file():
            tables = load_toml(dataset_file)
            general, datasets = tables.get("general", {}), tables.get("datasets")
    return keys, general, list(datasets) if isinstance(datasets, list) and datasets else [{}]


def _default(script: str, key: str) -> Any:
    return SCRIPTS[script].fields[key].default


# ------------------------------------------------------------------------------------------ the estimate

def _ratio(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.2f}"


def estimate_row(study: Study, row: Row, seed_set: str, figures: ModelFigures | None = None) -> RowEstimate:
    """Seconds to train `row` and to sample its checkpoints on the `seed_set` seeds, from the measured table.

    `figures`: the table entry to use; by default the one identify_model finds for the study's model.
    """
    if figures is None:
        figures, how = identify_model(study.model)
        if figures is None:
            return RowEstimate(None, None, f"unknown model: no estimate ({how})")
    seeds = study.seeds.get(seed_set, ())
    notes = [f"{figures.name}"]
    machines: set[str] = set()

    # --- training
    steps: int | None = None
    kind = "adapter"
    if row.script is None:
        train: float | None = 0.0
    else:
        try:
            keys, general, datasets = row_job(row)
        except PentadactylError as exc:
            return RowEstimate(None, None, f"the job could not be read: {exc}")
        kind = "full" if (row.script == "train_dreambooth"
                          and keys.get("dreambooth_mode", "lora") == "full") else "adapter"
        precision = str(keys.get("mixed_precision", "no"))
        accumulation = keys.get("gradient_accumulation_steps", 1)
        per_step = []
        for ds in datasets:  # the largest pixels × batch over the job's datasets
            pixels = _pixels(_first("resolution", [ds, general, keys], 512))
            batch = _first("batch_size", [ds, general], None) or keys.get("train_batch_size", 1)
            if pixels is None or not isinstance(batch, int) or not isinstance(accumulation, int):
                per_step = []
                break
            per_step.append((pixels * batch * accumulation, pixels, batch * accumulation))
        if keys.get("max_train_epochs"):
            length = None
            notes.append(f"train: unknown length ({keys['max_train_epochs']} epochs; the plan does not count "
                         "the images)")
        else:
            length = keys.get("max_train_steps", _default(row.script, "max_train_steps"))
            steps = length if isinstance(length, int) else None
        measured = figures.train.get(kind, {}).get(precision)
        train = None
        if measured is None:
            what = "full fine-tuning" if kind == "full" else "adapter training"
            notes.append(f"train: no measured figure for {what} in {precision} on this model (no GPU figures yet)")
        elif not per_step:
            notes.append("train: the resolution or batch size could not be read")
        elif steps is not None:
            _, pixels, images = max(per_step)
            scale = pixels / measured.pixels
            train = measured.seconds * scale * (images / measured.batch) * steps
            machines.add(measured.cpu)
            notes.append(f"train {measured.seconds:.3g} s/step ({measured.width}×{measured.height}, batch "
                         f"{measured.batch}) × {_ratio(scale)} (pixels) × {_ratio(images / measured.batch)} "
                         f"(batch) × {steps} steps [{measured.source}]")

    # --- sampling
    if row.script is None:
        points = 1
    else:
        saved = [c for c in row.checkpoints if steps is None or c < steps]
        networks = row.script == "train_network" or (row.script == "train_dreambooth" and kind == "adapter")
        points = len(saved) + (len(row.multipliers) if networks else 1)
    images = points * len(study.prompts) * len(seeds)
    sample: float | None = None
    measured = figures.sample
    width = study.sample.get("width", _default("sample", "width"))
    height = study.sample.get("height", _default("sample", "height"))
    denoise = study.sample.get("steps", _default("sample", "steps"))
    cfg = study.sample.get("cfg_scale", _default("sample", "cfg_scale"))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (width, height, denoise, cfg))
    if measured is None:
        notes.append("sample: no measured figure for this model")
    elif not numbers:
        notes.append("sample: width, height, steps or cfg_scale of [sample] could not be read")
    else:
        scale = width * height / measured.pixels
        guidance = 0.5 if cfg == 1.0 else 1.0  # measured with CFG; cfg_scale 1 runs one U-Net pass per step
        sample = measured.seconds * scale * guidance * denoise * images
        machines.add(measured.cpu)
        notes.append(f"sample {measured.seconds:.3g} s/image/step ({measured.width}×{measured.height}, CFG) × "
                     f"{_ratio(scale)} (pixels){' × 0.5 (no CFG)' if guidance != 1.0 else ''} × {denoise} steps "
                     f"× {images} images [{measured.source}]")
    if machines:
        notes.append(f"measured on {', '.join(sorted(machines))}; no GPU figures yet")
    return RowEstimate(train, sample, "; ".join(notes))


def format_duration(seconds: float | None) -> str:
    """"45 s", "4 min 30 s", "25 min", "3 h 20 min", "2 d 5 h"; "unknown" for None."""
    if seconds is None:
        return "unknown"
    s = max(0.0, float(seconds))
    if s < 59.5:
        return f"{round(s)} s"
    if s < 600:
        m, rest = divmod(round(s), 60)
        return f"{m} min {rest} s" if rest else f"{m} min"
    if s < 3600 - 30:
        return f"{round(s / 60)} min"
    if s < 86400 - 1800:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h" if h else f"{d} d"
