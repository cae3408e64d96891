"""Faster CPU kernels for SD1's convolutions, chosen per call; the results equal torch's defaults up to rounding.

torch's default CPU convolution (oneDNN) reorders the weight into its own blocked layout on every call. For the
U-Net's widest layers at low resolution — 1280 to 2560 input channels at 8×8 or 4×4 latent positions, the
lowest blocks at 256 px — that reorder costs more than the arithmetic: on a 2-core AMD EPYC a 2560→1280 3×3
convolution at 4×4 took 112 ms forward + backward through oneDNN and 25 ms as im2col + one matrix product
(torch's own `thnn_conv2d`), in fp32; 63 against 14 ms in bf16. Larger feature maps are faster through oneDNN,
and faster still in channels-last memory format (no activation reorders around each call), which the modules
are switched to here. bench/RESULTS.md has the measurements.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

MAX_POSITIONS = 256  # batch × height × width at or below which a wide convolution goes through im2col
MIN_CHANNELS = 1280  # input channels from which the weight reorder outweighs the work at those sizes


def use_fast_cpu_convolutions(module: nn.Module, dtype: torch.dtype) -> int:
    """Route `module`'s wide convolutions through im2col when they meet few positions (on the CPU; on a GPU,
    calls go to the default kernel) and, for bf16, put its convolution weights in channels-last format (the
    activations follow). Returns how many convolutions were routed. Idempotent; no weight's value changes.

    Channels-last only for bf16, as measured: with the im2col route, a LoRA step at 256 px took 1.51 s in
    channels-last and 1.76 s without in bf16, but 3.27 s against 2.95 s in fp32."""
    if dtype == torch.bfloat16:
        module.to(memory_format=torch.channels_last)
    routed = 0
    for conv in module.modules():
        if type(conv) is not nn.Conv2d or conv.in_channels < MIN_CHANNELS:
            continue
        if conv.groups != 1 or conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1) \
                or not isinstance(conv.padding, tuple):
            continue
        if isinstance(conv.__dict__.get("forward"), _Im2colForward):
            routed += 1
            continue
        if "forward" in conv.__dict__:  # already patched by something else (a network): leave it
            continue
        conv.forward = _Im2colForward(conv)
        routed += 1
    return routed


def use_onednn_linears(module: nn.Module) -> int:
    """Route `module`'s fp32 Linear layers through oneDNN (as a 1×1 convolution over a free view of the input)
    where a probe on this CPU finds that faster than torch's fp32 matrix product (MKL, which on AMD CPUs runs
    about half as fast: 155 against 330 GFLOP/s forward + backward for 1024 tokens × 320 → 320 on a 2-core EPYC).
    Returns how many layers were routed; 0 where the probe finds no gain. Idempotent."""
    if not onednn_linear_is_faster():
        return 0
    routed = 0
    for linear in module.modules():
        if type(linear) is not nn.Linear:
            continue
        if isinstance(linear.__dict__.get("forward"), _OneDnnLinearForward):
            routed += 1
        elif "forward" not in linear.__dict__:  # already patched by something else (a network): leave it
            linear.forward = _OneDnnLinearForward(linear)
            routed += 1
    return routed


def _linear_as_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed by oneDNN's 1×1 convolution: [T, C] is viewed as a channels-last
    [1, C, T, 1] image, so neither the input nor the output is copied."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    image = flat.view(1, flat.shape[0], 1, flat.shape[1]).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight.reshape(*weight.shape, 1, 1), bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def onednn_linear_is_faster() -> bool:
    """Time one typical fp32 layer (1024 tokens, 320 → 320, forward + backward) both ways on this CPU, once."""
    if not torch.backends.mkldnn.is_available() or torch.get_num_threads() < 2:
        return False  # with one thread torch takes its own 1×1 kernel: nothing to gain
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(320, 320, generator=generator) * 0.05
    x = torch.randn(1024, 320, generator=generator).requires_grad_(True)

    def best(fn) -> float:
        times = []
        for _ in range(4):
            begun = time.perf_counter()
            fn(x, weight, None).sum().backward()
            times.append(time.perf_counter() - begun)
        return min(times[1:])

    return best(_linear_as_conv) < 0.8 * best(F.linear)


class _OneDnnLinearForward:
    """A Linear's forward that takes oneDNN for fp32 inputs on the CPU (outside autocast), else F.linear."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if (x.device.type != "cpu" or x.dtype != torch.float32 or linear.weight.dtype != torch.float32
                or x.dim() < 2 or torch.is_autocast_enabled("cpu")):
            return F.linear(x, linear.weight, linear.bias)
        return _linear_as_conv(x, linear.weight, linear.bias)


class _Im2colForward:
    """A Conv2d's forward that takes the im2col kernel for small inputs on the CPU, else the default one."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type != "cpu" or x.dim() != 4 or x.shape[0] * x.shape[2] * x.shape[3] > MAX_POSITIONS:
            return conv._conv_forward(x, conv.weight, conv.bias)
        weight, bias = conv.weight, conv.bias
        if torch.is_autocast_enabled("cpu"):  # as autocast would cast a conv2d's operands
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif x.dtype != weight.dtype:
            return conv._conv_forward(x, conv.weight, conv.bias)  # let torch report the mismatch
        if conv.kernel_size != (1, 1):
            # the input in the weight's memory format: torch's im2col backward computes a wrong weight gradient
            # for a channels-last weight and a contiguous input (torch 2.13)
            x = x.contiguous(memory_format=torch.contiguous_format if weight.is_contiguous() else torch.channels_last)
        return torch._C._nn.thnn_conv2d(x, weight, conv.kernel_size, bias, conv.stride, conv.padding)
