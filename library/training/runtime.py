"""What a training run needs from its surroundings: the accelerator and precision, the attention backend,
signals, memory figures, TensorBoard, and the small tensor helpers of DDP and EMA."""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from pathlib import Path

import torch

from library.job_types import TrainingJob
from library.errors import ConfigError

log = logging.getLogger("pentadactyl")


def cpu_has_bf16() -> bool | None:
    """Whether this x86 CPU has bf16 instructions (AVX512-BF16 or AMX); None where torch cannot tell (not x86)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without these probes
        return None


def choose_precision(job: TrainingJob) -> TrainingJob:
    """The job as it will run: mixed_precision = "bf16" on an x86 CPU without bf16 instructions becomes "no"
    (fp32), which runs faster there (1.6× on an AVX-512 Xeon without them), unless cpu_bf16 = "always"."""
    if job.mixed_precision != "bf16" or torch.cuda.is_available() or job.cpu_bf16 == "always":
        return job
    if cpu_has_bf16() is not False:
        return job
    log.warning("mixed_precision = \"bf16\": this CPU has no bf16 instructions (AVX512-BF16 or AMX), where bf16 "
                "steps run about 1.6× slower than fp32; training in fp32 instead (frozen weights take twice the "
                "memory). Set cpu_bf16 = \"always\" to keep bf16 for its memory.")
    return job.replace(mixed_precision="no")


def make_accelerator(job: TrainingJob):
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


def check_dynamo_backend(job: TrainingJob) -> None:
    """dynamo_backend: "no" (any case) is off; torch.compile is not wired, so any other backend is refused.

    Why not compile: sd-scripts itself compiles only with torch_compile = true, which pentadactyl lacks; the
    LoRA branch patches each layer's forward and draws module dropout on the CPU (graph breaks), every bucket
    resolution is a new shape to compile, and the compile time outweighs the gain on runs of a few thousand
    steps. Attention is already fused (sdpa, or xformers)."""
    backend = job.dynamo_backend
    if backend is not None and backend.lower() != "no":
        raise ConfigError(f"{job.source}: dynamo_backend = \"{backend}\": pentadactyl does not torch.compile the "
                          "U-Net (sd-scripts, too, compiles only with torch_compile = true). Set dynamo_backend = "
                          "\"no\" or remove it; attention is already fused (sdpa = true, the default, or "
                          "xformers = true).")


def set_attention_backend(unet, job: TrainingJob, device: torch.device) -> str:
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


class StopFlag:
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


def peak_memory_text(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB → GiB on Linux
    text = f"peak RSS {rss:.2f} GiB"
    if device.type == "cuda":
        text += f", peak CUDA {torch.cuda.max_memory_allocated(device) / 1024 ** 3:.2f} GiB"
    return text


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
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
def ema_update(ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    for key, value in current.items():
        ema[key].mul_(decay).add_(value.detach().float(), alpha=1 - decay)


def tensorboard_writer(job: TrainingJob):
    if not job.logging_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    run = f"{job.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    return SummaryWriter(str(Path(job.logging_dir) / run))
