"""Faster CPU kernels for SD1's convolutions, chosen per call; the results equal torch's defaults up to rounding.

torch's default CPU convolution (oneDNN) reorders the weight into its own blocked layout on every call. For the
U-Net's widest layers at low resolution — 1280 to 2560 input channels at 8×8 or 4×4 latent positions, the
lowest blocks at 256 px — that reorder costs more than the arithmetic: on a 2-core AMD EPYC a 2560→1280 3×3
convolution at 4×4 took 112 ms forward + backward through oneDNN and 25 ms as im2col + one matrix product
(torch's own `thnn_conv2d`), in fp32; 63 against 14 ms in bf16. Larger feature maps are faster through oneDNN;
in bf16, faster still in channels-last memory format (no activation reorders around each call).
bench/RESULTS.md has the measurements.
"""

from __future__ import annotations

import torch
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
    return sum(patch_forward(conv, _Im2colForward) for conv in module.modules()
               if type(conv) is nn.Conv2d and conv.in_channels >= MIN_CHANNELS and conv.groups == 1
               and conv.padding_mode == "zeros" and tuple(conv.dilation) == (1, 1) and isinstance(conv.padding, tuple))


def patch_forward(module: nn.Module, kind: type) -> bool:
    """Give `module` the forward `kind(module)` (an instance attribute) unless it has one already; True when
    its forward is of that kind now. A forward patched by something else (a network) is left alone."""
    current = module.__dict__.get("forward")
    if current is None:
        module.forward = current = kind(module)
    return isinstance(current, kind)


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
