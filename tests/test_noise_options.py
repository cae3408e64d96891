"""sd-scripts' noise and loss options: pyramid noise, input perturbation, the adaptive noise offset and the
debiased-estimation weight, each checked against values worked out here from the same generator draws."""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

from library.config import UNSUPPORTED, load_job, schema
from library.errors import ConfigError
from library.training import loop
from library.training import noise as nz

from support import run_job, write_job

NEW_KEYS = ("multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength",
            "adaptive_noise_scale", "debiased_estimation_loss")


def std(values: torch.Tensor) -> float:
    """The sample standard deviation (N − 1), written out."""
    flat = [float(v) for v in values.flatten()]
    mean = sum(flat) / len(flat)
    return math.sqrt(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1))


def bilinear(small: torch.Tensor, size: int) -> torch.Tensor:
    """A [h, w] grid resized to [size, size] as torch's bilinear mode with align_corners=False does it: output
    pixel d samples the input at (d + ½)·in/out − ½, clamped to the grid, interpolated linearly."""
    h, w = small.shape

    def taps(d: int, n: int) -> tuple[int, int, float]:
        x = max((d + 0.5) * n / size - 0.5, 0.0)
        lo = min(int(x), n - 1)
        return lo, min(lo + 1, n - 1), x - lo

    out = torch.empty(size, size)
    for i in range(size):
        y0, y1, fy = taps(i, h)
        for j in range(size):
            x0, x1, fx = taps(j, w)
            top = small[y0, x0] * (1 - fx) + small[y0, x1] * fx
            bottom = small[y1, x0] * (1 - fx) + small[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


# ----------------------------------------------------------------------------------- pyramid noise


def test_pyramid_noise_one_iteration_adds_one_full_size_layer():
    base = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 10
    got = nz.pyramid_noise(base.clone(), torch.Generator().manual_seed(5), iterations=1, discount=0.5)
    g = torch.Generator().manual_seed(5)
    torch.rand(1, generator=g)  # r of layer 0 (r⁰ = 1: the layer is full size)
    layer = torch.randn(1, 1, 4, 4, generator=g)
    summed = base + layer  # discount⁰ = 1
    torch.testing.assert_close(got, summed / std(summed))


def test_pyramid_noise_second_layer_is_one_pixel_times_discount_then_stops():
    base = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 10
    g = torch.Generator().manual_seed(6)
    torch.rand(1, generator=g)
    layer0 = torch.randn(1, 1, 4, 4, generator=g)
    u1 = torch.rand(1, generator=g).item()
    assert u1 > 0  # r = 2 + 2·u1 > 2, so ⌊4 / r⌋ = 1: a 1×1 layer, upsampled to a constant
    layer1 = torch.randn(1, 1, 1, 1, generator=g)
    after = torch.randn(1, generator=g)
    summed = base + layer0 + 0.5 * layer1.item()
    expected = summed / std(summed)
    for iterations in (2, 5):  # a 1-pixel side ends the pyramid: more iterations change nothing
        used = torch.Generator().manual_seed(6)
        got = nz.pyramid_noise(base.clone(), used, iterations=iterations, discount=0.5)
        torch.testing.assert_close(got, expected)
        assert torch.equal(torch.randn(1, generator=used), after)  # and draw nothing more


def test_pyramid_noise_upsamples_a_smaller_layer_bilinearly():
    base = torch.zeros(1, 1, 8, 8)
    g = torch.Generator().manual_seed(11)
    torch.rand(1, generator=g)
    layer0 = torch.randn(1, 1, 8, 8, generator=g)
    r = 2 + 2 * torch.rand(1, generator=g).item()
    side = int(8 / r)
    assert side in (2, 3)
    layer1 = torch.randn(1, 1, side, side, generator=g)
    summed = layer0[0, 0] + 0.25 * bilinear(layer1[0, 0], 8)
    got = nz.pyramid_noise(base, torch.Generator().manual_seed(11), iterations=2, discount=0.25)
    torch.testing.assert_close(got[0, 0], summed / std(summed))


def test_sample_noise_with_pyramid_uses_the_offset_noise_and_the_same_generator():
    latents = torch.zeros(1, 4, 8, 8)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    noise = noise + 0.1 * torch.randn(1, 4, 1, 1, generator=g)
    expected = nz.pyramid_noise(noise, g, 3, 0.3)
    got = nz.sample_noise(latents, torch.Generator().manual_seed(2), 0.1, None, 3, 0.3)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------ adaptive noise offset


def test_adaptive_noise_scale_adds_abs_channel_mean_times_scale_to_the_offset():
    latents = torch.stack([torch.full((2, 2), 0.5), torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])]).unsqueeze(0)
    # channel means 0.5 and −2: 0.1 + 0.2·0.5 = 0.2 and 0.1 + 0.2·2 = 0.5
    torch.testing.assert_close(nz.offset_strength(latents, 0.1, 0.2), torch.tensor([0.2, 0.5]).view(1, 2, 1, 1))
    # negative scales are clamped at 0: 0.1 − 0.1·0.5 = 0.05 and 0.1 − 0.1·2 < 0
    torch.testing.assert_close(nz.offset_strength(latents, 0.1, -0.1), torch.tensor([0.05, 0.0]).view(1, 2, 1, 1))
    assert nz.offset_strength(latents, 0.1, None) == 0.1
    g = torch.Generator().manual_seed(3)
    plain, offset = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 1, 1, generator=g)
    got = nz.sample_noise(latents, torch.Generator().manual_seed(3), 0.1, 0.2)
    torch.testing.assert_close(got, plain + torch.tensor([0.2, 0.5]).view(1, 2, 1, 1) * offset)
    # without the options the noise is what it always was
    torch.testing.assert_close(nz.sample_noise(latents, torch.Generator().manual_seed(3), 0.1), plain + 0.1 * offset)


def test_noise_offset_random_strength_scales_the_offset_by_a_uniform_draw():
    latents = torch.zeros(1, 2, 2, 2)
    g = torch.Generator().manual_seed(5)
    plain, u, offset = torch.randn(1, 2, 2, 2, generator=g), torch.rand(1, generator=g).item(), \
        torch.randn(1, 2, 1, 1, generator=g)
    got = nz.sample_noise(latents, torch.Generator().manual_seed(5), 0.1, offset_random_strength=True)
    torch.testing.assert_close(got, plain + 0.1 * u * offset)
    assert 0 <= u < 1
    # over many samples the strength spreads over [0, 0.1): the mean |offset part| is about half the fixed one
    fixed = [nz.sample_noise(latents, torch.Generator().manual_seed(s), 0.1) for s in range(400)]
    rand = [nz.sample_noise(latents, torch.Generator().manual_seed(s), 0.1, offset_random_strength=True)
            for s in range(400)]
    base = [torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(s)) for s in range(400)]
    ratio = sum((r - b).abs().mean().item() for r, b in zip(rand, base)) / \
        sum((f - b).abs().mean().item() for f, b in zip(fixed, base))
    assert 0.4 < ratio < 0.6


# --------------------------------------------------------------------------- debiased estimation


def test_debiased_weight_is_one_over_root_snr_capped_at_1000():
    alphas = nz.sd1_alphas_cumprod()
    # t = 0: ᾱ = 1 − 0.00085, SNR = 0.99915 / 0.00085 ≈ 1175 > 1000, so the weight is 1/√1000
    assert float(alphas[0] / (1 - alphas[0])) == pytest.approx(0.99915 / 0.00085, rel=1e-4)
    a = float(alphas[500])
    weights = nz.debiased_weights(torch.tensor([0, 500]), alphas)
    torch.testing.assert_close(weights, torch.tensor([1 / math.sqrt(1000), math.sqrt((1 - a) / a)]))


# ------------------------------------------------------------------------------ the loop's batch loss


class RecordingUNet:
    """Predicts zeros (so the l2 loss of a sample is the mean square of its target) and keeps its input."""

    def __init__(self):
        self.inputs = []

    def __call__(self, noisy, t, encoder_hidden_states):
        self.inputs.append(noisy.clone())
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def fake_run(monkeypatch, **keys):
    values = {key: field.default for key, field in schema("train_network").fields.items()}
    values.update(seed=9, **keys)
    monkeypatch.setattr(loop, "encode_captions", lambda run, captions: torch.zeros(len(captions), 77, 8))
    return SimpleNamespace(job=SimpleNamespace(**values), device=torch.device("cpu"),
                           alphas_cumprod=nz.sd1_alphas_cumprod(), model=SimpleNamespace(unet=RecordingUNet()),
                           accelerator=SimpleNamespace(autocast=contextlib.nullcontext), weight_dtype=torch.float32)


LATENTS = torch.linspace(-1, 1, 2 * 4 * 4 * 4).view(2, 4, 4, 4)
BATCH = {"latents": LATENTS, "captions": ["a", "b"], "loss_weights": torch.tensor([1.0, 0.5])}


def draws(seed: int, step: int, index: int, gamma: float = 0.0, random_strength: bool = False):
    """(timestep, noise, input-perturbation noise) of one sample, drawn here as the loop draws them."""
    g = torch.Generator().manual_seed(loop.sample_seed(seed, step, index))
    t = torch.randint(0, 1000, (1,), generator=g)
    noise = torch.randn(1, 4, 4, 4, generator=g)
    strength = gamma * torch.rand(1, generator=g).item() if random_strength else gamma
    return t, noise, strength * torch.randn(1, 4, 4, 4, generator=g)


@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_changes_the_unet_input_but_not_the_target(monkeypatch, random_strength):
    run = fake_run(monkeypatch, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength)
    loss = loop.batch_loss(run, BATCH, step=3, first_index=4)
    (t0, n0, p0), (t1, n1, p1) = (draws(9, 3, 4 + i, 0.1, random_strength) for i in range(2))
    t, noise, extra = torch.cat([t0, t1]), torch.cat([n0, n1]), torch.cat([p0, p1])
    assert extra.abs().max() > 0
    torch.testing.assert_close(run.model.unet.inputs[0], nz.add_noise(LATENTS, noise + extra, t, run.alphas_cumprod))
    # zero prediction: the loss is the mean square of the target, the unperturbed noise
    torch.testing.assert_close(loss, ((noise ** 2).mean(dim=(1, 2, 3)) * BATCH["loss_weights"]).mean())
    plain = fake_run(monkeypatch)
    torch.testing.assert_close(loop.batch_loss(plain, BATCH, step=3, first_index=4), loss)  # same target
    assert not torch.allclose(plain.model.unet.inputs[0], run.model.unet.inputs[0])


def test_debiased_and_min_snr_weights_multiply(monkeypatch):
    run = fake_run(monkeypatch, debiased_estimation_loss=True, min_snr_gamma=5.0)
    loss = loop.batch_loss(run, BATCH, step=0, first_index=0)
    (t0, n0, _), (t1, n1, _) = (draws(9, 0, i) for i in range(2))
    alphas = nz.sd1_alphas_cumprod()
    weights = []
    for t, w in zip((t0, t1), BATCH["loss_weights"]):
        a = float(alphas[t])
        snr = a / (1 - a)
        weights.append(float(w) * min(snr, 5.0) / snr / math.sqrt(min(snr, 1000.0)))
    per_sample = torch.cat([n0, n1]).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_sample * torch.tensor(weights)).mean())


@pytest.mark.parametrize("keys", [
    {"multires_noise_iterations": 3}, {"multires_noise_iterations": 3, "multires_noise_discount": 0.8},
    {"noise_offset": 0.1, "adaptive_noise_scale": 1.0}, {"ip_noise_gamma": 0.2},
    {"debiased_estimation_loss": True},
])
def test_each_option_changes_the_batch_loss_or_the_unet_input(monkeypatch, keys):
    baseline = {"noise_offset": 0.1} if "adaptive_noise_scale" in keys else {}
    if "multires_noise_discount" in keys:
        baseline = {"multires_noise_iterations": 3}
    plain, changed = fake_run(monkeypatch, **baseline), fake_run(monkeypatch, **keys)
    before, after = (loop.batch_loss(r, BATCH, step=1, first_index=0) for r in (plain, changed))
    inputs_differ = not torch.allclose(plain.model.unet.inputs[0], changed.model.unet.inputs[0])
    assert inputs_differ or not torch.isclose(before, after)


# ---------------------------------------------------------------------------------------- job keys


def test_the_keys_load_with_sd_scripts_defaults_and_ranges(tmp_path):
    assert not set(NEW_KEYS) & set(UNSUPPORTED)
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.png").write_bytes(b"")

    def load(body: str):
        path = tmp_path / "job.toml"
        path.write_text(f'pretrained_model_name_or_path = "m.safetensors"\n{body}\n'
                        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n')
        return load_job("train_network", config_path=str(path))

    job = load("")
    assert (job.multires_noise_iterations, job.multires_noise_discount, job.ip_noise_gamma,
            job.ip_noise_gamma_random_strength, job.adaptive_noise_scale, job.debiased_estimation_loss) == \
        (0, 0.3, 0.0, False, None, False)
    job = load("multires_noise_iterations = 6\nmultires_noise_discount = 0.4\nip_noise_gamma = 0.1\n"
               "ip_noise_gamma_random_strength = true\nnoise_offset = 0.05\nadaptive_noise_scale = -0.01\n"
               "debiased_estimation_loss = true\n")
    assert (job.multires_noise_iterations, job.multires_noise_discount, job.ip_noise_gamma,
            job.ip_noise_gamma_random_strength, job.adaptive_noise_scale, job.debiased_estimation_loss) == \
        (6, 0.4, 0.1, True, -0.01, True)
    assert load("ip_noise_gamma = 0\nmultires_noise_iterations = 0\n").ip_noise_gamma == 0.0  # as GUIs write "off"
    for body, message in (("multires_noise_iterations = -1", "'multires_noise_iterations' = -1 must be at least 0"),
                          ("multires_noise_discount = 1.5", "'multires_noise_discount' = 1.5 must be at most 1"),
                          ("ip_noise_gamma = -0.1", "'ip_noise_gamma' = -0.1 must be at least 0"),
                          ("multires_noise_iterations = 2.5", "'multires_noise_iterations' must be an integer"),
                          ("debiased_estimation_loss = 1", "'debiased_estimation_loss' must be true or false"),
                          ("adaptive_noise_scale = 0.01", r"adaptive_noise_scale = 0.01 adds to noise_offset, which "
                                                          r"is 0; set noise_offset")):
        with pytest.raises(ConfigError, match=message):
            load(body)


# ------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_training_with_every_option_runs_differs_and_resumes_exactly(tmp_path, tiny_single_file, shapes_dir):
    keys = dict(noise_offset=0.1, adaptive_noise_scale=0.5, multires_noise_iterations=4, multires_noise_discount=0.4,
                ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, min_snr_gamma=5.0,
                debiased_estimation_loss=True)
    plain = run_job(write_job(tmp_path / "plain", tiny_single_file, shapes_dir, max_train_steps=2))
    full = run_job(write_job(tmp_path / "a", tiny_single_file, shapes_dir, max_train_steps=4, **keys))
    assert all(math.isfinite(x) for x in full.losses)
    assert full.losses[0] != plain.losses[0]  # same weights, data and seed: only the options differ
    first = run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, max_train_steps=2,
                              save_state_on_train_end=True, **keys))
    assert first.losses == full.losses[:2]
    assert json.loads((first.state_dir / "progress.json").read_text())["global_step"] == 2
    resumed = run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, max_train_steps=4,
                                resume=str(first.state_dir), **keys))
    assert resumed.losses == full.losses[2:]
