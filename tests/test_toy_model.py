"""The toy hand model: the pretraining script's pieces, and the shipped file it produced."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from library.models import architecture as arch
from library.models.loading import load_sd1
from toy_hands import TOY_MODEL_PATH, count_fingers
from toy_hands import pretrain


def test_latent_rescale_is_exact_and_gives_unit_latents():
    torch.manual_seed(0)
    vae = arch.build_vae(pretrain.TOY_VAE_CONFIG).eval()
    images, _, _ = pretrain.render_set(seed=7, count=12, five_finger_share=0.5, object_share=0.2)
    x = pretrain.to_unit(images)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        means = pretrain.encode_means(vae, images)
        factor = pretrain.rescale_latents(vae, means)
        after_means = vae.encode(x).latent_dist.mean
        after = vae.decode(after_means).sample
    assert factor != pytest.approx(1.0)
    assert torch.allclose(after_means, means * factor, rtol=1e-4, atol=1e-5)
    assert (after_means * pretrain.SCALING_FACTOR).std().item() == pytest.approx(1.0, rel=1e-3)
    assert torch.allclose(after, before, atol=1e-4)  # the decoder sees the same latent as before


@pytest.mark.slow
def test_pretrain_script_writes_a_loadable_sd1_file(tmp_path):
    out = tmp_path / "toy.safetensors"
    pretrain.main(["--out", str(out), "--images", "64", "--vae_steps", "2", "--vae_batch", "4",
                   "--unet_steps", "3", "--unet_batch", "4", "--save_every", "0", "--threads", "1",
                   "--check_images", "4"])
    model = load_sd1(out)
    assert model.vae_scale_factor == 4 and model.vae.config.block_out_channels == [32, 64, 64]
    assert model.unet.config.block_out_channels == [32, 64, 64]
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["pentadactyl.toy_hands"])
        assert {f.get_tensor(k).dtype for k in list(f.keys())[:20]} == {torch.float16}
    assert meta["unet_steps"] == 3 and meta["final"] is True and meta["seed"] == 0
    log = json.loads(out.with_suffix(".log.json").read_text())
    assert [e["stage"] for e in log["log"]].count("unet") >= 1

    # a second stage continues from that file on another mix: the VAE stays, the U-Net moves
    second = tmp_path / "toy2.safetensors"
    pretrain.main(["--out", str(second), "--init", str(out), "--seed", "1", "--images", "32",
                   "--five_finger_share", "0.2", "--wrong_counts", "extra", "--unet_steps", "2",
                   "--unet_batch", "4", "--save_every", "0", "--threads", "1"])
    a, b = load_sd1(out), load_sd1(second)
    b_vae, b_unet = b.vae.state_dict(), b.unet.state_dict()
    for key, value in a.vae.state_dict().items():
        assert torch.equal(value, b_vae[key]), key
    assert any(not torch.equal(v, b_unet[k]) for k, v in a.unet.state_dict().items())
    with safe_open(str(second), "pt") as f:
        meta2 = json.loads(f.metadata()["pentadactyl.toy_hands"])
    assert meta2["init"]["file"] == out.name and meta2["init"]["unet_steps"] == 3 and meta2["vae_steps"] == 0
    assert meta2["wrong_counts"] == "extra" and meta2["vae_check"] == meta["vae_check"]
    log2 = json.loads(second.with_suffix(".log.json").read_text())
    assert log2["init_log"] == log  # the whole history in one file


def test_pretrain_init_must_be_a_toy_model(tmp_path, tiny_single_file):
    from library.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no 'pentadactyl.toy_hands' record"):
        pretrain.main(["--out", str(tmp_path / "x.safetensors"), "--init", str(tiny_single_file),
                       "--images", "8", "--unet_steps", "1", "--unet_batch", "2", "--threads", "1"])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(not TOY_MODEL_PATH.is_file(), reason="the toy hand model is not in this checkout")
def test_shipped_toy_model_is_sd1_layout_and_draws_hands():
    with safe_open(str(TOY_MODEL_PATH), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["pentadactyl.toy_hands"])
    assert meta["final"] is True and meta["wall_seconds"] > 0
    assert meta["init"]["final"] is True and meta["init"]["seed"] == 0  # the second of two runs (see pretrain)
    assert TOY_MODEL_PATH.stat().st_size < 16e6
    assert arch.detect_family(list(keys), None) == "SD1.x"
    model = load_sd1(TOY_MODEL_PATH)
    assert model.vae_scale_factor == 4
    # same module classes and names as SD1.5, smaller: every U-Net key of the toy is an SD1.5 U-Net key
    sd15 = arch.build_unet(arch.SD15_UNET_CONFIG, empty=True).state_dict().keys()
    assert set(model.unet.state_dict()) <= set(sd15)

    from library.sampling.pipeline import Sampler
    from library.sampling.prompts import PromptSpec

    sampler = Sampler(model.unet, model.vae, model.text_encoder, model.tokenizer, progress=False)
    spec = PromptSpec("front of fair-skinned female right hand", width=64, height=64, steps=20, cfg_scale=7.5,
                      sampler="ddim")
    with torch.no_grad():
        images = sampler.generate(spec, seeds=list(range(12)), batch_size=12)
    counts = [count_fingers(im.image) for im in images]
    # a hand in most images, mostly a wrong one: the toy analogue of SD1.5's hands
    assert sum(c > 0 for c in counts) >= 9, counts
    assert sum(c == 5 for c in counts) <= 6, counts
