"""Less memory for training, with results equal to the stock modules' bit for bit.

- `lean_geglu`: the U-Net's feed-forward gate (diffusers' GEGLU, `h * gelu(gate)`) keeps only its input for the
  backward pass and computes `gelu(gate)` again there, instead of keeping that tensor too: one activation of
  the feed-forward's inner width less per transformer block (47 MB in a 256 px SD1.5 step in float32).
- `lean_resnets`: each of the U-Net's residual blocks runs its two GroupNorm → SiLU pairs as one step that keeps
  only the GroupNorm's input (and its statistics) for the backward pass and normalises again there, instead of
  also keeping the normalised tensor: two activations less per block (about 30 MB at 256 px in float32).
- `half_token_embedding`: a frozen float32 token embedding whose values all fit in float16 (an fp16 checkpoint's,
  read into float32 modules) is kept in float16 and its looked-up rows turned back into float32: 76 MB less
  for SD1's 49408 × 768 table, and the same float32 numbers out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.models.cpu_kernels import patch_forward


def lean_geglu(module: nn.Module) -> int:
    """Patch every diffusers GEGLU in `module` (idempotent); returns how many use the lean gate."""
    return sum(patch_forward(m, _LeanGegluForward) for m in module.modules()
               if type(m).__name__ == "GEGLU" and isinstance(getattr(m, "proj", None), nn.Linear))


class _LeanGegluForward:
    def __init__(self, geglu: nn.Module) -> None:
        self.geglu = geglu

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        projected = self.geglu.proj(hidden_states)
        # nothing to keep for a backward pass: the arithmetic alone
        return _GatedGelu.apply(projected) if projected.requires_grad else _gated_gelu(projected)


def _gated_gelu(projected: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after its projection: h * gelu(gate) of [h, gate]."""
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


class _GatedGelu(torch.autograd.Function):
    """h * gelu(gate) of `projected` = [h, gate]; saves `projected` alone. The backward pass does what autograd
    does for the stock expression (mul's and gelu's derivatives, then the chunks' gradients joined), so the
    gradients are the same bits."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projected)
        return _gated_gelu(projected)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        grad_hidden = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
        return torch.cat([grad_hidden, grad_gate], dim=-1)


def lean_resnets(module: nn.Module) -> int:
    """Patch every diffusers ResnetBlock2D of the plain SD1 kind in `module` (idempotent; a block with up- or
    downsampling, another time-embedding norm or activation keeps its own forward); returns how many are lean."""
    return sum(patch_forward(m, _LeanResnetForward) for m in module.modules()
               if type(m).__name__ == "ResnetBlock2D" and _plain_resnet(m))


def _plain_resnet(block: nn.Module) -> bool:
    return (getattr(block, "upsample", 0) is None and getattr(block, "downsample", 0) is None
            and getattr(block, "time_embedding_norm", None) == "default" and not getattr(block, "skip_time_act", True)
            and type(getattr(block, "nonlinearity", None)) is nn.SiLU
            and all(type(getattr(block, n, None)) is nn.GroupNorm and getattr(block, n).affine for n in ("norm1", "norm2")))


class _LeanResnetForward:
    """diffusers' ResnetBlock2D.forward for the plain SD1 block, with each GroupNorm → SiLU through
    `_GroupNormSiLU` when gradients are wanted (the stock modules otherwise)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        b = self.block
        hidden = _norm_silu(b.norm1, b.nonlinearity, input_tensor)
        hidden = b.conv1(hidden)
        if b.time_emb_proj is not None:
            temb = b.time_emb_proj(b.nonlinearity(temb))[:, :, None, None]
        if temb is not None:
            hidden = hidden + temb
        hidden = _norm_silu(b.norm2, b.nonlinearity, hidden)
        hidden = b.dropout(hidden)
        hidden = b.conv2(hidden)
        if b.conv_shortcut is not None:
            if b.training:  # as diffusers: contiguous while training (DDP gradient strides)
                input_tensor = input_tensor.contiguous()
            input_tensor = b.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / b.output_scale_factor


def _norm_silu(norm: nn.GroupNorm, silu: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad) \
            or torch.is_autocast_enabled(x.device.type):
        return silu(norm(x))
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) keeping x, mean and rstd (not the normalised tensor); the backward pass normalises
    again and calls the kernels autograd calls for the two stock modules, with the same layouts, so the bits
    are the same."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        x = x.contiguous(memory_format=_cpu_layout(x))
        n, c = x.shape[:2]
        hw = x.numel() // max(1, n * c)
        weight, bias = weight.contiguous(), bias.contiguous()
        normed, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.sizes = (n, c, hw, groups, eps)
        return F.silu(normed)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, hw, groups, eps = ctx.sizes
        normed = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)[0]
        grad_normed = torch.ops.aten.silu_backward(grad, normed)
        grad_normed = grad_normed.contiguous(memory_format=_cpu_layout(x))
        mask = list(ctx.needs_input_grad[:3])
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(grad_normed, x, mean, rstd, weight, n, c, hw, groups,
                                                               mask)
        return gx, gw, gb, None, None


def _cpu_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout torch's group norm works in: on the CPU the input's own (channels-last stays so), else NCHW."""
    if x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def half_token_embedding(text_encoder: nn.Module) -> bool:
    """Keep a frozen float32 token embedding in float16 when that loses nothing; True if it now is."""
    embedding = _token_embedding(text_encoder)
    if embedding is None:
        return False
    if isinstance(embedding.__dict__.get("forward"), _Float32Lookup):
        return True
    weight = embedding.weight
    if weight.dtype != torch.float32 or weight.requires_grad or "forward" in embedding.__dict__ \
            or embedding.max_norm is not None:
        return False
    half = weight.detach().to(torch.float16)
    if not torch.equal(half.to(torch.float32), weight.detach()):
        return False  # values float16 cannot hold exactly (a float32 checkpoint): left as they are
    embedding.weight = nn.Parameter(half, requires_grad=False)
    embedding.forward = _Float32Lookup(embedding)
    return True


def full_token_embedding(text_encoder: nn.Module) -> None:
    """Undo `half_token_embedding` (before rows are written into the table: they keep their float32 bits)."""
    embedding = _token_embedding(text_encoder)
    if embedding is not None and isinstance(embedding.__dict__.get("forward"), _Float32Lookup):
        del embedding.forward
        embedding.weight = nn.Parameter(embedding.weight.detach().to(torch.float32), requires_grad=False)


def _token_embedding(text_encoder: nn.Module) -> nn.Embedding | None:
    getter = getattr(text_encoder, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    return embedding if isinstance(embedding, nn.Embedding) else None


class _Float32Lookup:
    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        rows = F.embedding(ids, e.weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return rows.to(torch.float32)
