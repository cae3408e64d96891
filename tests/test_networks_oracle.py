"""Independent oracle: our file, loaded by diffusers' own LoRA loader on the full-size SD1.5 layout.

The models are built on the meta device and their parameters materialised from a cheap repeating random
pattern (regenerable per layer, so no copy of the base weights is kept). The file goes through
`StableDiffusionPipeline.load_lora_weights` + `fuse_lora` (diffusers' loader needs `peft`, a test
requirement); every targeted weight must then have moved by exactly m·α/r·up@down.
"""

from __future__ import annotations

import time
import zlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from library.models.architecture import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, build_text_encoder, build_unet
from networks import NetworkSpec, create_network, save_network

MULTIPLIER = 0.8
POOL = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02


def pattern_values(name: str, shape: torch.Size, out: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic pseudo-random values for one parameter, cheap for 860M numbers (slices of POOL)."""
    out = torch.empty(shape) if out is None else out.view(shape)
    flat = out.view(-1)
    start = zlib.crc32(name.encode()) % POOL.numel()
    position = 0
    while position < flat.numel():
        take = min(flat.numel() - position, POOL.numel() - start)
        flat[position:position + take] = POOL[start:start + take]
        position += take
        start = 0
    if name.endswith(".weight") and out.dim() == 1:  # norm scales near 1, not near 0
        out += 1.0
    return out


def materialise(model: nn.Module) -> nn.Module:
    for module_name, module in model.named_modules():
        for param_name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                full = f"{module_name}.{param_name}" if module_name else param_name
                module._parameters[param_name] = nn.Parameter(pattern_values(full, param.shape), requires_grad=False)
    return model


def diffusers_fuse_with_peft(path, unet, text_encoder, multiplier) -> set[str]:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from library.models.architecture import TINY_VAE_CONFIG

    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**TINY_VAE_CONFIG), text_encoder=text_encoder, tokenizer=None,
                                   unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="oracle")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=multiplier)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the adapter layers
    return set()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_diffusers_loads_our_file_and_fuses_to_our_update(tmp_path):
    started = time.perf_counter()
    torch.manual_seed(0)
    unet = materialise(build_unet(SD15_UNET_CONFIG, empty=True)).eval()
    text_encoder = materialise(build_text_encoder(SD15_TEXT_CONFIG, empty=True)).eval()

    # attention (rank 4, alpha 2) + conv (3x3 rank 2 alpha 1) + text encoder (rank 8, alpha 3)
    spec = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, text_encoder_dim=8,
                       text_encoder_alpha=3)
    network = create_network(spec, unet, text_encoder)
    assert len(network) == 192 + 86 + 72
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():  # fp16-representable, so the fp16 file holds exactly these values
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).half().float())
    network.set_multiplier(MULTIPLIER)
    network.apply_to()

    sample = torch.randn(1, 4, 8, 8, generator=g)
    timestep = torch.tensor([500])
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2463, 49407]])
    with torch.no_grad():
        te_patched = text_encoder(tokens).last_hidden_state
        unet_patched = unet(sample, timestep, encoder_hidden_states=te_patched).sample
    network.restore()

    path = tmp_path / "oracle.safetensors"
    save_network(path, network.kohya_state_dict(), spec.to_metadata(), save_dtype="fp16")
    tensors = load_file(str(path))
    checkpoint = time.perf_counter()
    diffusers_fuse_with_peft(path, unet, text_encoder, MULTIPLIER)

    fused_at = time.perf_counter()
    # every targeted weight changed by exactly multiplier * alpha / r * up @ down (values from the file)
    # two scratch buffers reused for every layer: fresh weight-sized temporaries dominated the run time
    largest = max(m.base.weight.numel() for m in network.locon.values())
    scratch_before, scratch_expected = torch.empty(largest), torch.empty(largest)
    for module in network.locon.values():
        name, layer = module.target.kohya_name, module.base
        up = tensors[f"{name}.lora_up.weight"].float().flatten(1)
        down = tensors[f"{name}.lora_down.weight"].float().flatten(1)
        alpha = float(tensors[f"{name}.alpha"])
        numel = layer.weight.numel()
        expected = torch.matmul(up, down, out=scratch_expected[:numel].view(up.shape[0], down.shape[1]))
        expected = expected.view(layer.weight.shape).mul_(MULTIPLIER * alpha / up.shape[1])
        # residual = W_before - W' + expected, which must be ~0
        before = pattern_values(f"{module.target.path}.weight", layer.weight.shape, out=scratch_before[:numel])
        residual = before.sub_(layer.weight).add_(expected)
        low, high = torch.aminmax(residual)
        scale = torch.aminmax(expected)
        tolerance = 1e-6 + 1e-4 * max(-float(scale[0]), float(scale[1]))
        assert max(-float(low), float(high)) <= tolerance, name

    checked_at = time.perf_counter()
    # the fused models give the same outputs as our patched forward
    with torch.no_grad():
        te_fused = text_encoder(tokens).last_hidden_state
        unet_fused = unet(sample, timestep, encoder_hidden_states=te_fused).sample
    torch.testing.assert_close(te_fused, te_patched, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unet_fused, unet_patched, atol=1e-4, rtol=1e-4)
    print(f"\noracle test: {time.perf_counter() - started:.1f}s (setup+patched forward {checkpoint - started:.1f}s, "
          f"diffusers load+fuse {fused_at - checkpoint:.1f}s, weight check {checked_at - fused_at:.1f}s)")
