"""The sampler on the tiny SD1 model (64x64, a few steps): determinism, LoRA multipliers, PNGs, sample.py."""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import ConfigError
from library.sampling import PromptSpec, Sampler
from library.text_encoding import encode_texts
from support import parse_hash_list, parse_parameters, write_job_file

SPEC = PromptSpec("a photo of a hand", "disfigured", width=64, height=64, steps=3, sampler="ddim")


@pytest.fixture(scope="module")
def tiny(tiny_single_file):
    from library.models.loading import load_sd1

    return load_sd1(tiny_single_file)


@pytest.fixture(scope="module")
def lora_file(tiny, tmp_path_factory):
    """A LoRA with random (non-zero) weights on the tiny model, saved in fp32."""
    from networks import NetworkSpec, create_network, save_network

    network = create_network(NetworkSpec.from_args(network_dim=4, network_alpha=2), tiny.unet, tiny.text_encoder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "myhands.safetensors"
    save_network(path, network.kohya_state_dict(), {"ss_output_name": "myhands"}, save_dtype="fp32")
    return path


def sampler_for(model, unet=None, text_encoder=None, **options) -> Sampler:
    return Sampler(unet or model.unet, model.vae, text_encoder or model.text_encoder, model.tokenizer,
                   progress=False, **options)


def latents_of(sampler: Sampler, spec: PromptSpec = SPEC, seeds=(1,), batch_size: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([g.latents for g in sampler.generate(spec, list(seeds), batch_size)])


def test_same_seed_same_image_independent_of_batch(tiny):
    sampler = sampler_for(tiny)
    spec = replace(SPEC, sampler="euler_a")  # ancestral: its noise draws must follow the seed too
    first = latents_of(sampler, spec, seeds=(5, 6), batch_size=2)
    again = latents_of(sampler, spec, seeds=(5, 6), batch_size=2)
    alone = latents_of(sampler, spec, seeds=(6,))
    assert torch.equal(first, again)  # the same batch: the same kernels, the same bits
    # another batch size sums in another order: the same image up to rounding (3e-6 of the scale on an AVX2
    # CPU; any CPU stays far below 1e-3), not to the bit, while another seed's image differs by the scale
    scale = alone.abs().max()
    assert (first[1] - alone[0]).abs().max() < 1e-3 * scale
    assert (first[0] - first[1]).abs().max() > 0.5 * scale


def test_unweighted_prompts_encode_like_training(tiny):
    sampler = sampler_for(tiny)
    with torch.no_grad():
        text = "a photo of a hand, best quality"
        assert torch.equal(sampler.encode(text), encode_texts(tiny.tokenizer, tiny.text_encoder, [text]))
        long_text = ", ".join(["a photo of a hand"] * 25)  # > 75 tokens: two chunks, like max_token_length 150
        assert sampler.encode(long_text).shape[1] == 154
        assert torch.equal(sampler.encode(long_text), encode_texts(tiny.tokenizer, tiny.text_encoder, [long_text], 150))
        assert sampler_for(tiny, max_token_length=75).encode(long_text).shape[1] == 77
        assert torch.equal(sampler.encode("(hand:1.0)"), sampler.encode("hand"))
        assert not torch.equal(sampler.encode("a (hand:1.5)"), sampler.encode("a hand"))


def test_multiplier_zero_is_base_and_one_equals_merged(tiny, lora_file):
    from library.sampling.networks import attach_networks, detach_networks, load_sampling_networks
    from networks import merge_weights

    base = latents_of(sampler_for(tiny))
    loaded = load_sampling_networks([f"{lora_file}:0"])
    attach_networks(loaded, ["patch"], tiny.unet, tiny.text_encoder)
    try:
        sampler = sampler_for(tiny)
        assert torch.equal(latents_of(sampler), base)
        loaded[0].set_multiplier(1.0)
        patched = latents_of(sampler)
    finally:
        detach_networks(loaded)
    assert not torch.allclose(patched, base, atol=1e-2)  # the LoRA does something
    assert torch.equal(latents_of(sampler_for(tiny)), base)  # restore() gave the base back

    unet, text_encoder = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    merge_weights(loaded[0].tensors, unet, text_encoder, 1.0)
    merged = latents_of(sampler_for(tiny, unet=unet, text_encoder=text_encoder))
    assert torch.allclose(merged, patched, atol=1e-3, rtol=1e-3)


def test_png_parameters_round_trip(tiny, tiny_single_file, lora_file, tmp_path):
    from library.sampling.infotext import model_short_hash
    from library.sampling.networks import load_sampling_networks

    network = load_sampling_networks([f"{lora_file}:0.75"])[0]
    sampler = sampler_for(tiny, clip_skip=2, sampler="DPM++ 2M Karras", model_name="tiny-sd1",
                          model_hash=model_short_hash(tiny_single_file), networks=[network.label()],
                          embedding_hashes={"EasyNeg": "c74b4e810b03"})
    spec = replace(SPEC, negative_prompt="disfigured, EasyNeg", sampler=None, cfg_scale=6.5, steps=2)
    run = sampler.sample([spec], tmp_path, "t", images_per_prompt=2, seed=1234)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["t_000_1234.png", "t_001_1235.png"]
    with Image.open(run.images[1].path) as image:
        prompt, negative, fields = parse_parameters(image.info["parameters"])
        assert image.size == (64, 64)
    assert prompt == "a photo of a hand <lora:myhands:0.75>"
    assert negative == "disfigured, EasyNeg"
    full_hash = hashlib.sha256(tiny_single_file.read_bytes()).hexdigest()
    assert fields == {"Steps": "2", "Sampler": "DPM++ 2M Karras", "CFG scale": "6.5", "Seed": "1235",
                      "Size": "64x64", "Model hash": full_hash[:10], "Model": "tiny-sd1", "Clip skip": "2",
                      "Lora hashes": f"myhands: {network.metadata['sshs_model_hash'][:12]}",
                      "TI hashes": "EasyNeg: c74b4e810b03"}
    assert parse_hash_list(fields["Lora hashes"]) == {"myhands": network.short_hash}


def test_sampling_mid_training_restores_rng_and_train_flags(tiny):
    sampler = sampler_for(tiny)
    tiny.unet.train()
    try:
        torch.manual_seed(123)
        random.seed(4)
        np.random.seed(5)
        expected = (torch.rand(3), random.random(), np.random.rand())
        torch.manual_seed(123)
        random.seed(4)
        np.random.seed(5)
        sampler.sample([replace(SPEC, steps=1)], None)
        assert tiny.unet.training and not tiny.vae.training
        assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
        assert np.random.rand() == expected[2]
    finally:
        tiny.unet.eval()


# --------------------------------------------------------------------------------- sample.py


def write_job(tmp_path, model, **keys) -> str:
    return str(write_job_file(tmp_path, {"pretrained_model_name_or_path": str(model),
                                         "output_dir": str(tmp_path / "out"), **keys}))


def test_sample_job_sweep_with_embedding_and_grid(tiny_single_file, lora_file, tmp_path):
    from library.config import load_job
    from library.embeddings import save_embedding_safetensors
    from library.sampling.run import report, run_sample_job

    (tmp_path / "emb").mkdir()
    save_embedding_safetensors(tmp_path / "emb" / "NegTwo.safetensors", torch.randn(2, 64) * 0.01)
    job = load_job("sample", ["--config", write_job(
        tmp_path, tiny_single_file, prompts=["a photo of a hand", "a (red:1.2) glove --d 9"],
        negative_prompt="NegTwo", sampler="Euler a", steps=2, width=64, height=64, seeds=[1, 2],
        networks=[f"{lora_file}:1.0"], sweep_multipliers=[0, 1.0], embeddings=[str(tmp_path / "emb")],
        output_name="cmp")])
    result = run_sample_job(job, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) == 2 * 2 * 2 + 1 and "cmp_myhands_sweep_grid.png" in names
    assert "cmp_myhands_0_000_1.png" in names and "cmp_myhands_1_003_2.png" in names
    assert not result.images[0].problem
    first_at_zero, first_at_one = result.runs[0].images[0], result.runs[1].images[0]
    assert not torch.equal(first_at_zero.latents, first_at_one.latents)
    prompt, negative, fields = parse_parameters(first_at_one.parameters)
    assert prompt.endswith("<lora:myhands:1>") and negative == "NegTwo" and "TI hashes" in fields
    assert "<lora:" not in parse_parameters(first_at_zero.parameters)[0]
    with Image.open(result.grid_path) as grid:  # a panel per multiplier, prompts down and seeds across in each
        assert grid.width > 2 * 2 * 64 and 2 * 64 < grid.height < 3 * 64 + 80
    assert "wrote 8 image(s)" in report(result)


def test_sample_cli_errors_are_clear(tiny_single_file, tmp_path, capsys):
    import sample
    from library.cli import run_main

    def run(argv):
        with pytest.raises(SystemExit) as exit_info:
            run_main(sample.main, argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    model = str(tiny_single_file)
    err = run(["--pretrained_model_name_or_path", model, "--prompt", "x", "--sampler", "Euler b"])
    assert "unknown sampler 'Euler b'" in err and "'Euler a'" in err and "dpmsolver++" in err
    err = run(["--pretrained_model_name_or_path", model, "--prompt", "x", "--networks", "missing.safetensors:0.5"])
    assert "missing.safetensors: no such file" in err
    err = run(["--pretrained_model_name_or_path", model, "--prompt", "x", "--embeddings", "nowhere"])
    assert "nowhere: no such embedding file or folder" in err
    err = run(["--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"), "--prompt", "x"])
    assert "none.safetensors: no such file or folder" in err
    err = run(["--pretrained_model_name_or_path", model, "--prompt_file", str(tmp_path / "p.txt")])
    assert "p.txt: prompt file not found" in err
    err = run(["--pretrained_model_name_or_path", model])
    assert "nothing to sample" in err
    err = run(["--pretrained_model_name_or_path", model, "--prompt", "x", "--sweep_multipliers", "0,1"])
    assert "needs a network to sweep" in err


def test_training_sampler_with_a_patched_network(tiny, tiny_single_file, lora_file, tmp_path):
    from library.config import Job
    from library.sampling import make_training_sampler
    from library.sampling.networks import attach_networks, detach_networks, load_sampling_networks

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a hand --n disfigured --s 2\n", encoding="utf-8")
    values = {"sample_prompts": str(prompts), "sample_sampler": "euler_a", "clip_skip": 1, "max_token_length": 75,
              "pretrained_model_name_or_path": str(tiny_single_file), "output_dir": str(tmp_path / "out"),
              "output_name": "mine", "seed": 7}
    job = Job("train_network", values, "job.toml", given=values.keys())
    loaded = load_sampling_networks([f"{lora_file}:1"])
    attach_networks(loaded, ["patch"], tiny.unet, tiny.text_encoder)
    network = loaded[0].patched
    network.train()
    tiny.unet.train()
    try:
        sample_now = make_training_sampler(job, tiny, "cpu", eval_modules=[network], size=(64, 64),
                                           trains_network=True)
        torch.manual_seed(0)
        expected = torch.rand(2)
        torch.manual_seed(0)
        run = sample_now(12, 3)
        assert torch.equal(torch.rand(2), expected)
        assert network.training and tiny.unet.training and not tiny.vae.training
    finally:
        detach_networks(loaded)
        tiny.unet.eval()
    assert run.images[0].path == tmp_path / "out" / "sample" / "mine_e000003_s000012_000_7.png"
    prompt, negative, fields = parse_parameters(run.images[0].parameters)
    assert prompt == "a photo of a hand <lora:mine:1>" and fields["Steps"] == "2" and fields["Sampler"] == "Euler a"
    bad = tmp_path / "bad.txt"
    bad.write_text("x --ss nope\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.txt line 1: unknown sampler 'nope'"):
        make_training_sampler(job.replace(sample_prompts=str(bad)), tiny, "cpu")


@pytest.mark.slow
def test_lora_tags_in_prompts_apply_per_prompt_from_lora_dir(tiny_single_file, lora_file, tmp_path):
    """WebUI's `<lora:name:m>`: each prompt's own LoRAs at its multipliers, looked up in lora_dir; the PNGs
    carry the tags as WebUI writes them, and an image equals the one the same LoRA listed in `networks` makes."""
    from library.config import load_job
    from library.sampling.run import run_sample_job

    common = dict(sampler="ddim", steps=2, width=64, height=64, seeds=[1], network_mode="patch")
    job = load_job("sample", ["--config", write_job(
        tmp_path, tiny_single_file, prompts=["a photo of a hand", "a photo of a hand <lora:myhands:0.8>",
                                             "<lora:myhands>, a fist"],
        lora_dir=str(lora_file.parent), output_name="tags", **common)])
    result = run_sample_job(job, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["tags_000_1.png", "tags_001_1.png", "tags_002_1.png", "tags_grid.png"]
    prompts = [parse_parameters(image.parameters)[0] for image in result.images]
    assert prompts == ["a photo of a hand", "a photo of a hand <lora:myhands:0.8>", "a fist <lora:myhands:1>"]
    assert "Lora hashes" in parse_parameters(result.images[1].parameters)[2]
    plain, tagged = result.images[0].latents, result.images[1].latents
    listed = run_sample_job(load_job("sample", ["--config", write_job(
        tmp_path / "listed", tiny_single_file, prompt="a photo of a hand", networks=[f"{lora_file}:0.8"],
        output_name="listed", **common)]), progress=False).images[0].latents
    assert not torch.equal(plain, tagged)
    assert torch.allclose(tagged, listed, atol=1e-5 * float(listed.abs().max()))


def test_lora_tag_mistakes_are_named(tiny_single_file, lora_file, tmp_path):
    from library.config import load_job
    from library.sampling.run import run_sample_job

    def error(**keys) -> str:
        job = load_job("sample", ["--config", write_job(tmp_path, tiny_single_file, steps=1, width=64, height=64,
                                                         **keys)])
        with pytest.raises(ConfigError) as caught:
            run_sample_job(job, progress=False)
        return str(caught.value)

    assert "<lora:myhands:…> needs lora_dir = \"folder\"" in error(prompt="a hand <lora:myhands:0.5>")
    message = error(prompt="a hand <lora:other:0.5>", lora_dir=str(lora_file.parent))
    assert "no other.safetensors in" in message and "(there: myhands)" in message
    assert "cannot go together" in error(prompt="a hand <lora:myhands>", lora_dir=str(lora_file.parent),
                                         networks=[str(lora_file)], sweep_multipliers=[0, 1])
    assert "in the negative prompt: WebUI applies LoRA tags only from the prompt" in error(
        prompt="a hand", negative_prompt="<lora:myhands:1>")
    assert "<lyco:x:1>' in a prompt is not read" in error(prompt="a hand <lyco:x:1>")
