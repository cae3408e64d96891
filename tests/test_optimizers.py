"""Optimizers and schedules by name; the noise/loss helpers against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import ConfigError
from library.training import noise as nz
from library.training.optimizers import build_optimizer, build_scheduler, parse_optimizer_args


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGD", "SGDNesterov", "torch.optim.Adam"])
def test_every_optimizer_steps_on_cpu(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # 8-bit states need tensors of a few thousand values
    before = weight.detach().clone()
    optimizer = build_optimizer(name, [{"params": [weight], "lr": 1e-2}], 1e-3, ["weight_decay=0.0"])
    assert optimizer.param_groups[0]["lr"] == 1e-2  # the group's own rate wins
    (weight ** 2).sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), before)
    if name in ("AdamW8bit", "Lion8bit"):
        assert type(optimizer).__module__.startswith("bitsandbytes")


def test_optimizer_errors():
    weight = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match=r"\"Adafactorr\" is unknown. Did you mean 'Adafactor'\? Use one of AdamW"):
        build_optimizer("Adafactorr", [{"params": [weight]}], 1e-3, None)
    with pytest.raises(ConfigError, match=r"optimizer_type = \"AdamW8bt\" is unknown. Did you mean 'AdamW8bit'\?"):
        build_optimizer("AdamW8bt", [{"params": [weight]}], 1e-3, None)
    with pytest.raises(ConfigError, match=r"optimizer_args: AdamW takes no argument 'momentum'"):
        build_optimizer("AdamW", [{"params": [weight]}], 1e-3, ["momentum=0.9"])
    with pytest.raises(ConfigError, match=r"optimizer_args do not fit AdamW: .*beta"):
        build_optimizer("AdamW", [{"params": [weight]}], 1e-3, ["betas=(2.0, 0.9)"])
    with pytest.raises(ConfigError, match=r"'weight_decay' is not of the form name=value"):
        parse_optimizer_args(["weight_decay"])
    assert parse_optimizer_args(["betas=(0.9, 0.99)", "foreach=False"]) == {"betas": (0.9, 0.99), "foreach": False}


def test_schedules():
    weight = torch.nn.Parameter(torch.zeros(1))

    def lrs(name, **kw):
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scheduler = build_scheduler(name, optimizer, kw.pop("warmup", 0), 10, **kw)
        out = []
        for _ in range(10):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs("constant") == [1.0] * 10
    assert lrs("constant_with_warmup", warmup=2)[:3] == [0.0, 0.5, 1.0]
    assert lrs("linear")[5] == pytest.approx(0.5)
    assert lrs("cosine")[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs("polynomial", power=2.0)[5] == pytest.approx((1 - 0.5) ** 2, abs=1e-6)
    restarts = lrs("cosine_with_restarts", num_cycles=2)
    assert restarts[5] == pytest.approx(1.0) and restarts[4] < 0.5
    with pytest.raises(ConfigError, match="lr_scheduler = \"warmup\" is unknown"):
        lrs("warmup")


def test_sd1_schedule_and_noising_match_diffusers():
    from diffusers import DDPMScheduler

    from library.models.architecture import SD1_SCHEDULER_CONFIG

    reference = DDPMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    torch.testing.assert_close(nz.sd1_alphas_cumprod(), reference.alphas_cumprod)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(nz.add_noise(latents, noise, t, nz.sd1_alphas_cumprod()),
                               reference.add_noise(latents, noise, t))


def test_min_snr_weights_and_losses():
    alphas = nz.sd1_alphas_cumprod()
    t = torch.tensor([10, 500, 990])
    snr = alphas[t] / (1 - alphas[t])
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(nz.min_snr_weights(t, alphas, 5.0), expected)
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(nz.per_sample_loss(pred, target, "l2"), torch.tensor([1.0, 9.0]))
    c = 0.1
    huber = 2 * c * (torch.sqrt(torch.tensor([1.0, 9.0]) + c * c) - c)
    torch.testing.assert_close(nz.per_sample_loss(pred, target, "huber", c), huber)
    # sd-scripts' smooth_l1 is the pseudo-Huber without the factor c; l1 the mean absolute error
    torch.testing.assert_close(nz.per_sample_loss(pred, target, "smooth_l1", c),
                               2 * (torch.sqrt(torch.tensor([1.0, 9.0]) + c * c) - c))
    torch.testing.assert_close(nz.per_sample_loss(pred, target, "l1"), torch.tensor([1.0, 3.0]))
    # one threshold per sample: each sample's loss uses its own c
    cs = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(nz.per_sample_loss(pred, target, "huber", cs),
                               2 * cs * (torch.sqrt(torch.tensor([1.0, 9.0]) + cs * cs) - cs))


def test_huber_schedules_by_hand():
    alphas = nz.sd1_alphas_cumprod()
    t = torch.tensor([0, 500, 999])
    a = alphas[t].double()
    sigma = ((1 - a) / a).sqrt()
    torch.testing.assert_close(nz.huber_threshold(t, alphas, "snr", 0.1), ((0.9 / (1 + sigma) ** 2) + 0.1).float())
    # exponential: 1·scale at t = 0, falling to c·scale at t = 1000 (here 999: one step short)
    exp = nz.huber_threshold(t, alphas, "exponential", 0.1, 2.0)
    assert exp[0].item() == pytest.approx(2.0)
    assert exp[1].item() == pytest.approx(2.0 * 0.1 ** 0.5, rel=1e-6)
    assert exp[2].item() == pytest.approx(2.0 * 0.1 ** (999 / 1000), rel=1e-6)
    torch.testing.assert_close(nz.huber_threshold(t, alphas, "constant", 0.1, 3.0), torch.full((3,), 0.3))
    snr = nz.huber_threshold(t, alphas, "snr", 0.1)
    assert snr[0] > 0.8 and snr[2] < 0.11  # low noise: near 1 (MSE-like); high noise: near c (robust)
