"""Pure parts of sampling: prompt files, sampler names, A1111 weighting, PNG parameters, grids, modes."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from library.errors import ConfigError
from library.sampling.attention import chunk_weighted_tokens, parse_prompt_attention
from library.sampling.grid import image_grid, wrap_text
from library.sampling.infotext import (
    a1111_parameters, infotext_quote, lora_short_hash, prompt_with_lora_tags, save_png_atomic,
)
from library.sampling.networks import choose_network_modes
from library.sampling.pipeline import image_problem, image_seeds, initial_noise, to_pil
from library.sampling.prompts import PromptSpec, parse_prompt_file, parse_prompt_line
from library.sampling.schedulers import SAMPLERS, make_scheduler, resolve_sampler
from support import parse_parameters

DEFAULTS = PromptSpec(prompt="")


# --------------------------------------------------------------------------------- prompt files


def test_txt_line_every_option():
    spec = parse_prompt_line("a photo of a hand, 1girl --n disfigured, blurry --w 768 --h 512 --d 1234 "
                             "--s 20 --l 5.5 --ss k_euler_a", DEFAULTS, "p.txt line 1")
    assert spec == PromptSpec("a photo of a hand, 1girl", "disfigured, blurry", 768, 512, 20, 5.5, 1234, "euler_a")
    assert spec.source == "p.txt line 1"


def test_txt_defaults_and_caller_defaults():
    spec = parse_prompt_line("just a prompt", DEFAULTS, "x")
    assert (spec.width, spec.height, spec.steps, spec.cfg_scale, spec.seed, spec.sampler) == (512, 512, 30, 7.5, None, None)
    tiny = PromptSpec(prompt="", width=64, height=64, steps=4)
    assert parse_prompt_line("p --h 128", tiny, "x").height == 128
    assert parse_prompt_line("p", tiny, "x").width == 64


def test_txt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\nfirst --d 1\n   # indented comment\nsecond --ss \"DPM++ 2M Karras\"\n".replace('"', ""),
                    encoding="utf-8")
    specs = parse_prompt_file(path)
    assert [s.prompt for s in specs] == ["first", "second"]
    assert specs[0].seed == 1 and specs[1].sampler == "dpm++_2m_karras"
    assert specs[1].source == f"{path} line 5"


def test_txt_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("ok\nhand --x 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.txt line 2: unknown option '--x'"):
        parse_prompt_file(path)
    path.write_text("hand --ss turbo\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 1: unknown sampler 'turbo'.*ddim.*Euler a"):
        parse_prompt_file(path)
    path.write_text("hand --w 500\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="multiple of 8"):
        parse_prompt_file(path)
    path.write_text("hand --s many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="--s.*not an integer"):
        parse_prompt_file(path)
    path.write_text("a <lora:style:0.8> hand\n", encoding="utf-8")  # WebUI's tag: taken out, kept with the prompt
    assert [(s.prompt, s.loras) for s in parse_prompt_file(path)] == [("a hand", (("style", 0.8),))]
    path.write_text("a <hypernet:style:0.8> hand\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1: '<hypernet:style:0.8>' in a prompt is not read .* networks ="):
        parse_prompt_file(path)
    with pytest.raises(ConfigError, match="prompt file not found"):
        parse_prompt_file(tmp_path / "missing.txt")
    path.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompts"):
        parse_prompt_file(path)


def test_toml_prompt_file(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text(
        '[prompt]\nnegative_prompt = "disfigured"\nwidth = 640\nheight = 448\nscale = 6\nsample_steps = 25\n'
        'sample_sampler = "Euler a"\n\n'
        '[[prompt.subset]]\nprompt = "a hand"\nseed = 7\n\n'
        '[[prompt.subset]]\nprompt = "a foot"\nnegative_prompt = "ugly"\nsteps = 10\ncfg_scale = 9.0\n'
        'sampler = "ddim"\nwidth = 512\n', encoding="utf-8")
    first, second = parse_prompt_file(path)
    assert first == PromptSpec("a hand", "disfigured", 640, 448, 25, 6.0, 7, "euler_a")
    assert second == PromptSpec("a foot", "ugly", 512, 448, 10, 9.0, None, "ddim")
    path.write_text('[prompt]\nwidht = 3\n[[prompt.subset]]\nprompt = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'widht'. Did you mean 'width'"):
        parse_prompt_file(path)


def test_json_prompt_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([
        "a hand --n bad --d 3",
        {"prompt": "a foot", "negative_prompt": "ugly", "width": 256, "height": 320, "seed": 5,
         "sample_steps": 12, "scale": 4, "sample_sampler": "dpmsolver++"},
    ]), encoding="utf-8")
    first, second = parse_prompt_file(path)
    assert (first.prompt, first.negative_prompt, first.seed) == ("a hand", "bad", 3)
    assert second == PromptSpec("a foot", "ugly", 256, 320, 12, 4.0, 5, "dpmsolver++")
    path.write_text('[{"prompt": "x", "seed": "one"}]', encoding="utf-8")
    with pytest.raises(ConfigError, match="item 1: 'seed'.*not an integer"):
        parse_prompt_file(path)
    path.write_text('[{"prompt": "x",}]', encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON syntax error at line 1"):
        parse_prompt_file(path)


# --------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name, canonical, cls, options", [
    ("ddim", "ddim", "DDIMScheduler", {}),
    ("DDIM", "ddim", "DDIMScheduler", {}),
    ("k_euler_a", "euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("Euler a", "euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("euler", "euler", "EulerDiscreteScheduler", {}),
    ("pndm", "pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    ("PLMS", "pndm", "PNDMScheduler", {}),
    ("heun", "heun", "HeunDiscreteScheduler", {}),
    ("dpm_2", "dpm_2", "KDPM2DiscreteScheduler", {}),
    ("k_dpm_2_a", "dpm_2_a", "KDPM2AncestralDiscreteScheduler", {}),
    ("dpmsolver++", "dpmsolver++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M", "dpmsolver++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M Karras", "dpm++_2m_karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("dpmpp_2m_sde_karras", "dpm++_2m_sde_karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("dpmsolver", "dpmsolver", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    ("dpmsingle", "dpmsingle", "DPMSolverSinglestepScheduler", {}),
    ("UniPC", "unipc", "UniPCMultistepScheduler", {}),
])
def test_sampler_names_map_to_sd1_schedulers(name, canonical, cls, options):
    sampler = resolve_sampler(name)
    assert sampler.name == canonical
    scheduler = make_scheduler(name)
    assert type(scheduler).__name__ == cls
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.num_train_timesteps == 1000 and config.prediction_type == "epsilon"
    for key, value in options.items():
        assert config[key] == value


def test_every_sampler_builds_or_names_its_missing_package():
    import importlib.util

    for sampler in SAMPLERS:
        if sampler.requires and importlib.util.find_spec(sampler.requires) is None:
            with pytest.raises(ConfigError, match=f"pip install {sampler.requires}"):
                make_scheduler(sampler)
        else:
            make_scheduler(sampler).set_timesteps(5)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        resolve_sampler("DPM++ 2M Karass", "job.toml: 'sampler'")
    message = str(err.value)
    assert "job.toml: 'sampler': unknown sampler 'DPM++ 2M Karass'" in message
    assert "Did you mean 'DPM++ 2M Karras'" in message
    for name in ("ddim", "euler_a", "dpmsolver++", "'Euler a'", "'DPM++ 2M Karras'"):
        assert name in message


# --------------------------------------------------------------------------------- attention


def _rounded(pieces):
    return [(text, round(weight, 4)) for text, weight in pieces]


@pytest.mark.parametrize("text, expected", [
    ("a photo", [("a photo", 1.0)]),
    ("a (red) hat", [("a ", 1.0), ("red", 1.1), (" hat", 1.0)]),
    ("((red))", [("red", 1.21)]),
    ("[red]", [("red", round(1 / 1.1, 4))]),
    ("(red:1.5) hat", [("red", 1.5), (" hat", 1.0)]),
    ("(red hat: 0.5)", [("red hat", 0.5)]),
    ("((red:1.5), hat)", [("red", 1.65), (", hat", 1.1)]),
    (r"\(literal\) [x]", [("(literal) ", 1.0), ("x", round(1 / 1.1, 4))]),
    ("a) b]", [("a) b]", 1.0)]),
    ("(open", [("open", 1.1)]),
    ("time: 3 o'clock", [("time: 3 o'clock", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    assert _rounded(parse_prompt_attention(text)) == expected


def test_chunking_pads_like_training_and_breaks():
    tokens = chunk_weighted_tokens([([5] * 70, 1.0), ([6] * 10, 1.5)], bos=1, eos=2, pad=2)
    assert tokens.ids.shape == (2, 77) and tokens.weights.shape == (2, 77)
    assert tokens.ids[0, 0] == 1 and tokens.ids[0, 76] == 2 and tokens.ids[1, 5] == 6 and tokens.ids[1, 6] == 2
    assert tokens.weights[0, 71:76].tolist() == [1.5] * 5 and tokens.weights[0, 76] == 1.0
    broken = chunk_weighted_tokens([([5] * 3, 1.0), ([], -1.0), ([6] * 3, 1.0)], bos=1, eos=2, pad=2)
    assert broken.ids.shape == (2, 77) and broken.ids[1, 1] == 6
    assert chunk_weighted_tokens([([5] * 200, 1.0)], 1, 2, 2, max_chunks=2).ids.shape == (2, 77)
    assert chunk_weighted_tokens([], 1, 2, 2).ids.shape == (1, 77)


# --------------------------------------------------------------------------------- infotext


def test_parameters_text_parses_back():
    text = a1111_parameters(
        prompt_with_lora_tags("a photo of a hand, (detailed:1.2)", {"my:lora,v2": 0.75, "off": 0.0}),
        "disfigured, EasyNegative", steps=30, sampler="DPM++ 2M Karras", cfg_scale=7.5, seed=1234,
        width=512, height=768, model_hash="6ce0161689", model_name="v1-5-pruned", clip_skip=2,
        lora_hashes={"my:lora,v2": "0123456789ab"}, ti_hashes={"EasyNegative": "c74b4e810b03"})
    prompt, negative, fields = parse_parameters(text)
    assert prompt == "a photo of a hand, (detailed:1.2) <lora:mylorav2:0.75>"
    assert negative == "disfigured, EasyNegative"
    assert fields == {"Steps": "30", "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": "1234",
                      "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned", "Clip skip": "2",
                      "Lora hashes": "mylorav2: 0123456789ab", "TI hashes": "EasyNegative: c74b4e810b03"}
    assert 'Lora hashes: "mylorav2: 0123456789ab"' in text  # quoted like A1111


def test_parameters_text_without_optional_parts():
    text = a1111_parameters("p", "", steps=4, sampler="Euler a", cfg_scale=7.0, seed=1, width=64, height=64)
    assert text == "p\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
    assert infotext_quote("plain") == "plain" and infotext_quote('a, "b"') == '"a, \\"b\\""'


def test_lora_hash_prefers_metadata_and_computes_otherwise(tmp_path):
    from safetensors.torch import save_file

    from networks.files import safetensors_data_hash

    path = tmp_path / "l.safetensors"
    save_file({"x.lora_down.weight": torch.ones(2, 2)}, str(path), metadata={"ss_output_name": "l"})
    expected = safetensors_data_hash(path.read_bytes())[:12]
    assert lora_short_hash(path, {}) == expected
    assert lora_short_hash(path, {"sshs_model_hash": "ABCDEF0123456789"}) == "abcdef012345"


def test_png_is_written_atomically_with_text_chunk(tmp_path):
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_png_atomic(image, tmp_path / "out" / "x.png", "a prompt ümlaut\nSteps: 1")
    with Image.open(path) as loaded:
        assert loaded.info["parameters"] == "a prompt ümlaut\nSteps: 1"
        assert loaded.size == (16, 8)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]


# --------------------------------------------------------------------------------- seeds, NaN, grids, modes


def test_seeds_and_initial_noise_are_per_image():
    assert image_seeds(None, 42, 3) == [42, 43, 44]
    assert image_seeds(7, 42, 2) == [7, 8]
    assert image_seeds(7, 42, 2, seeds=[1, 5]) == [1, 5]
    batch, _ = initial_noise([3, 4], (4, 2, 2))
    single, _ = initial_noise([4], (4, 2, 2))
    assert torch.equal(batch[1], single[0]) and not torch.equal(batch[0], batch[1])


def test_nan_and_black_images_are_detected():
    good = torch.rand(3, 8, 8) * 2 - 1
    latents = torch.zeros(4, 1, 1)
    assert image_problem(good, latents) is None
    assert "VAE" in image_problem(torch.full((3, 8, 8), float("nan")), latents)
    assert "U-Net" in image_problem(good, torch.full((4, 1, 1), float("nan")))
    assert image_problem(-torch.ones(3, 8, 8), latents) == "black image"
    assert to_pil(torch.full((3, 2, 2), float("nan"))).getextrema() == ((0, 0),) * 3


def test_grid_layout_and_labels():
    red, blue = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    grid = image_grid([[red, blue, red], [blue, None, red]], ["a very long prompt " * 10, "b"], ["1", "2", "3"])
    label_w, label_h = grid.width - 3 * 64, grid.height - 2 * 48
    assert label_w >= 64 and label_h > 0
    assert grid.getpixel((label_w + 5, label_h + 5)) == (255, 0, 0)
    assert grid.getpixel((label_w + 64 + 5, label_h + 48 + 5)) == (255, 255, 255)  # the missing cell
    plain = image_grid([[red, blue]])
    assert plain.size == (128, 48)
    from library.sampling.grid import _font

    lines = wrap_text("word " * 50, _font(10), 60, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("…")


def test_network_modes():
    assert choose_network_modes(3, None, "auto") == ["merge"] * 3
    assert choose_network_modes(3, 1, "auto") == ["merge", "patch", "merge"]
    assert choose_network_modes(2, None, "patch") == ["patch", "patch"]
    with pytest.raises(ConfigError, match="sweep_multipliers cannot"):
        choose_network_modes(2, 0, "merge")
    with pytest.raises(ConfigError, match="must be one of"):
        choose_network_modes(1, None, "fuse")


@pytest.mark.parametrize("name", ["sample_compare.toml", "sample_quickstart.toml"])
def test_shipped_sample_jobs_validate(name):
    from pathlib import Path

    from library.config import load_job
    from library.sampling.job import specs_from_job

    path = Path(__file__).resolve().parent.parent / "dataset_configs" / name
    job = load_job("sample", ["--config", str(path)])
    specs = specs_from_job(job)
    assert specs and all(s.sampler for s in specs) and job.sweep_multipliers


def test_panel_grid_puts_panels_side_by_side_under_their_titles():
    from library.sampling.grid import panel_grid

    red, blue = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    cells = [[red, blue], [blue, red]]
    alone = image_grid(cells, ["prompt a", "prompt b"], ["seed 1", "seed 2"])
    second = image_grid(cells, (), ["seed 1", "seed 2"])
    panels = panel_grid([("lora × 0", cells), ("lora × 1", cells)], ["prompt a", "prompt b"], ["seed 1", "seed 2"])
    title_h = panels.height - alone.height
    gap = panels.width - alone.width - second.width
    assert title_h > 0 and gap > 0 and second.width == 2 * 64  # row labels only left of the first panel
    assert panels.crop((0, title_h, alone.width, panels.height)).tobytes() == alone.tobytes()
    x = alone.width + gap
    assert panels.crop((x, title_h, x + second.width, panels.height)).tobytes() == second.tobytes()


def test_seed_minus_one_draws_a_random_seed_once_per_run():
    from library.sampling.prompts import PromptSpec
    from library.sampling.run import random_seeds

    specs = [PromptSpec("a"), PromptSpec("b", seed=-1), PromptSpec("c", seed=5)]
    drawn, seed, seeds = random_seeds(specs, -1, None)
    assert 0 <= seed < 2 ** 32 and seeds is None
    assert drawn[0].seed is None and 0 <= drawn[1].seed < 2 ** 32 and drawn[2].seed == 5
    _, seed, seeds = random_seeds(specs[:1], 7, [3, -1])
    assert seed == 7 and seeds[0] == 3 and 0 <= seeds[1] < 2 ** 32
    assert len({random_seeds(specs[:1], -1, None)[1] for _ in range(5)}) > 1


def test_lora_tags_in_training_sample_prompts_are_refused(tmp_path):
    from types import SimpleNamespace

    from library.sampling.training import make_training_sampler

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a hand\na hand <lora:other:0.5>\n", encoding="utf-8")
    job = SimpleNamespace(sample_prompts=str(prompts), sample_sampler="ddim", output_name="x", datasets=None)
    with pytest.raises(ConfigError, match=r"prompts.txt line 2: <lora:other:…> in a prompt applies in sample.py only"):
        make_training_sampler(job, None, "cpu", size=(64, 64))
