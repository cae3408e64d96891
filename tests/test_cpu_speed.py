"""What the speed and memory work changed, checked against the plain computation: the im2col route of wide CPU
convolutions, the LoRA branch fused into the base output, the precision chosen on CPUs without bf16, the VAE
let go after caching (and loaded again when asked for), and reading only a checkpoint's VAE."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.models import cpu_kernels
from library.models.loading import load_sd1, load_vae
from networks.locon import ForwardPatch, LoConModule
from networks.targets import Target


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = b.abs().max().item() or 1.0
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item() / scale


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, [p.grad.clone() for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("size", [4, 32])  # 4×4: the im2col route; 32×32: past MAX_POSITIONS, the default one
def test_wide_convolution_route_matches_the_default_kernel(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(cpu_kernels.MIN_CHANNELS, 16, 3, padding=1)
    routed = nn.Conv2d(cpu_kernels.MIN_CHANNELS, 16, 3, padding=1)
    routed.load_state_dict(conv.state_dict())
    model = nn.Sequential(routed, nn.Conv2d(16, 16, 1))  # the narrow one keeps torch's forward
    assert cpu_kernels.use_fast_cpu_convolutions(model, torch.float32) == 1
    assert cpu_kernels.use_fast_cpu_convolutions(model, torch.bfloat16) == 1  # idempotent
    assert "forward" not in model[1].__dict__
    x = torch.randn(1, cpu_kernels.MIN_CHANNELS, size, size)
    grad = torch.randn(1, 16, size, size)
    want, want_dx, want_dw = _forward_backward(conv, x, grad)
    got, got_dx, got_dw = _forward_backward(routed, x, grad)
    _close(got, want)
    _close(got_dx, want_dx)
    for g, w in zip(got_dw, want_dw):
        _close(g, w, 1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cast as autocast casts a conv2d
        want_bf16, got_bf16 = conv(x), routed(x)
    assert got_bf16.dtype == want_bf16.dtype == torch.bfloat16
    _close(got_bf16.float(), want_bf16.float(), 2e-2)


def test_a_network_patched_over_a_routed_convolution_still_adds_its_branch():
    torch.manual_seed(0)
    base = nn.Conv2d(cpu_kernels.MIN_CHANNELS, 8, 3, padding=1)
    plain = nn.Conv2d(cpu_kernels.MIN_CHANNELS, 8, 3, padding=1)
    plain.load_state_dict(base.state_dict())
    cpu_kernels.use_fast_cpu_convolutions(base, torch.float32)
    target = Target("lora_unet_x", "x", "unet", "conv", "conv", 0, 4, 2.0)
    modules = [LoConModule(target, layer) for layer in (base, plain)]
    modules[1].load_state_dict(modules[0].state_dict())
    with torch.no_grad():
        for m in modules:
            m.lora_up.weight.fill_(0.01)
    for m in modules:
        m.apply_to()
    x = torch.randn(1, cpu_kernels.MIN_CHANNELS, 4, 4)
    _close(base(x), plain(x))
    modules[0].restore()
    assert isinstance(base.__dict__["forward"], cpu_kernels._Im2colForward)  # the route survives un-patching


def _lora_pair(base: nn.Module, kind: str, rank: int = 4):
    """A LoConModule with random weights, and the same module taking the unfused path."""
    torch.manual_seed(1)
    target = Target("lora_unet_x", "x", "unet", kind, kind, 0, rank, 2.0)
    module = LoConModule(target, base)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module


@pytest.mark.parametrize("layout", ["linear", "conv", "conv-channels-last", "conv-1x1"])
def test_fused_lora_branch_equals_base_plus_scaled_up_down(layout):
    torch.manual_seed(0)
    if layout == "linear":
        base, x = nn.Linear(32, 24), torch.randn(2, 7, 32)
    elif layout == "conv-1x1":
        base, x = nn.Conv2d(16, 24, 1), torch.randn(2, 16, 6, 6)
    else:
        base, x = nn.Conv2d(16, 24, 3, stride=2, padding=1), torch.randn(2, 16, 9, 9)
    if layout == "conv-channels-last":
        base = base.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    module = _lora_pair(base, "conv" if "conv" in layout else "attn")
    module.multiplier = 0.7
    module.apply_to()
    grad = torch.randn_like(base(x))
    got, got_dx, _ = _forward_backward(base, x, grad)
    got_up, got_down = module.lora_up.weight.grad.clone(), module.lora_down.weight.grad.clone()
    module.lora_up.weight.grad = module.lora_down.weight.grad = None
    # the reference: the unfused sum, written out
    x2 = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        plain = type(base).forward(base, x2)
    if isinstance(base, nn.Conv2d):
        h = F.conv2d(x2, module.lora_down.weight, None, base.stride, base.padding)
        branch = F.conv2d(h, module.lora_up.weight)
    else:
        branch = F.linear(F.linear(x2, module.lora_down.weight), module.lora_up.weight)
    want = type(base).forward(base, x2) + 0.7 * module.scale * branch
    want.backward(grad)
    _close(got, want.detach())
    _close(got_dx, x2.grad)
    _close(got_up, module.lora_up.weight.grad)
    _close(got_down, module.lora_down.weight.grad)
    assert plain.shape == got.shape
    if layout == "conv-channels-last":
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_dropout_and_tucker_modules_take_the_unfused_path(monkeypatch):
    base = nn.Linear(8, 8)
    target = Target("lora_unet_x", "x", "unet", "attn", "attn", 0, 2, 2.0)
    module = LoConModule(target, base, dropout=0.5)
    calls = []
    monkeypatch.setattr(LoConModule, "_fused_add", lambda self, out, x: calls.append(1) or out)
    module.apply_to()
    module.train()
    base(torch.randn(3, 8))
    assert calls == []
    module.eval()  # dropout is off outside training: the fused path
    base(torch.randn(3, 8))
    assert calls == [1]
    assert ForwardPatch.add_branch is not LoConModule.add_branch


# ---- precision on CPUs without bf16 instructions


def _job(tmp_path, **keys):
    from library.config import load_job

    lines = ['pretrained_model_name_or_path = "m.safetensors"', f'output_dir = "{tmp_path}"',
             *(f"{k} = {v!r}".replace("'", '"') for k, v in keys.items()), f'train_data_dir = "{tmp_path}"']
    (tmp_path / "1_hand").mkdir(exist_ok=True)
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_job("train_network", config_path=str(path))


def test_bf16_becomes_fp32_on_a_cpu_without_bf16_and_the_log_says_so(tmp_path, monkeypatch, caplog):
    from library.training import runtime

    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    job = _job(tmp_path, mixed_precision="bf16")
    with caplog.at_level(logging.WARNING, logger="pentadactyl"):
        chosen = runtime.choose_precision(job)
    assert chosen.mixed_precision == "no" and job.mixed_precision == "bf16"
    assert "no bf16 instructions" in caplog.text and 'cpu_bf16 = "always"' in caplog.text
    assert runtime.choose_precision(_job(tmp_path, mixed_precision="bf16", cpu_bf16="always")).mixed_precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.choose_precision(job).mixed_precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: None)  # not x86: torch cannot tell, keep what was asked
    assert runtime.choose_precision(job).mixed_precision == "bf16"


def test_cpu_bf16_takes_only_its_two_values(tmp_path):
    from library.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_bf16"):
        _job(tmp_path, cpu_bf16="yes")


# ---- the VAE


def test_load_vae_of_a_whole_checkpoint_reads_only_its_vae(tiny_single_file, monkeypatch):
    from library.models import loading

    whole = load_sd1(tiny_single_file)
    read = []
    inner = loading._read_converted
    monkeypatch.setattr(loading, "_read_converted",
                        lambda *a, **k: read.append(out := inner(*a, **k)) or out)
    vae = load_vae(tiny_single_file)
    assert read and all(k.startswith("first_stage_model.") for k in read[0])
    for (name, want), got in zip(whole.vae.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(got, want), name


def test_released_vae_is_loaded_again_when_asked_for(tiny_single_file):
    model = load_sd1(tiny_single_file)
    want = {k: v.clone() for k, v in model.vae.state_dict().items()}
    calls = []
    model.release_vae(lambda: calls.append(1) or load_vae(tiny_single_file))
    assert model.__dict__["_vae"] is None and calls == []
    got = model.vae.state_dict()
    assert calls == [1] and model.vae is model.vae and calls == [1]
    assert all(torch.equal(got[k], v) for k, v in want.items())
