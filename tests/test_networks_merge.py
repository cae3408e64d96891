"""networks/merge.py: LoRAs into a checkpoint, several LoRAs into one (concatenated or SVD), bad input.

The expected weights are computed here from the files' own tensors (W + ratio * alpha/r * up @ down, the 3x3
LoCon case checked through convolution outputs), and diffusers' LoRA loader (`load_lora_weights` +
`fuse_lora`) is the independent oracle for both the merged checkpoint and the merged LoRA file.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.cli import run_main
from library.models.loading import load_sd1, save_sd1_single_file
from networks import NetworkSpec, create_network, merge_weights, save_network, sshs_hashes
from networks.merge import main

REPO = Path(__file__).resolve().parent.parent
EPS = torch.finfo(torch.float32).eps

# three layers named by hand: kohya module name -> the weight's key in the LDM single file
LINEAR = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
CONV3 = ("lora_unet_down_blocks_0_resnets_1_conv1", "model.diffusion_model.input_blocks.2.0.in_layers.2.weight")
TEXT = ("lora_te_text_model_encoder_layers_0_mlp_fc1", "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")

SPEC_A = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, text_encoder_dim=8, text_encoder_alpha=3)
SPEC_B = NetworkSpec(network_dim=8, network_alpha=8, conv_dim=4, conv_alpha=4)  # another alpha/rank everywhere


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_single_file):
    """Two LoCon files (attention, 3x3 convs, text encoder) for the tiny model, float32, random weights."""
    folder = tmp_path_factory.mktemp("loras")
    model = load_sd1(tiny_single_file)
    paths = []
    for name, spec, seed in (("a", SPEC_A, 1), ("b", SPEC_B, 2)):
        network = create_network(spec, model.unet, model.text_encoder)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        path = folder / f"{name}.safetensors"
        save_network(path, network.kohya_state_dict(), {**spec.to_metadata(), "ss_output_name": name,
                                                        "ss_resolution": "(512, 512)"}, save_dtype="fp32")
        paths.append(path)
    return paths


def module_parts(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    return down, up, float(tensors[f"{name}.alpha"]) / down.shape[0]


def delta_of(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """scale * up @ down as a [out, in * k * k] matrix, float64."""
    down, up, scale = module_parts(tensors, name)
    return scale * up.flatten(1) @ down.flatten(1)


def module_names(tensors) -> list[str]:
    return sorted({k.split(".")[0] for k in tensors})


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """run_main as the script runs it: (exit status, stdout, stderr)."""
    try:
        run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_diffusers_models(folder: Path):
    """The tiny model's U-Net, text encoder and VAE as diffusers / transformers load them (not our loader)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            AutoencoderKL.from_pretrained(folder / "vae").eval())


def diffusers_fuse(folder: Path, files: list[tuple[Path, float]]):
    """Fuse LoRA files one after the other with diffusers' own loader; returns the pipeline's unet, text encoder."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    unet, text_encoder, vae = tiny_diffusers_models(folder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for index, (path, scale) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{index}")
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[f"lora{index}"])
        pipe.unload_lora_weights()  # keeps the fused weights
    return pipe.unet, pipe.text_encoder


def forward(unet, text_encoder):
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2463, 49407]])
    with torch.no_grad():
        context = text_encoder(tokens).last_hidden_state
        return context, unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


# --- into a checkpoint --------------------------------------------------------------------------------
def test_checkpoint_weight_is_base_plus_scaled_updates_and_the_rest_is_untouched(tmp_path, tiny_single_file, loras,
                                                                                  capsys):
    a, b = loras
    out = tmp_path / "merged.safetensors"
    code, stdout, _ = run_cli(["--sd_model", tiny_single_file, "--models", a, b, "--ratios", "0.8", "-0.5",
                               "--save_to", out], capsys)
    assert code == 0 and f"wrote {out}" in stdout
    base, merged, ta, tb = (load_file(str(p)) for p in (tiny_single_file, out, a, b))
    assert merged.keys() == base.keys()
    assert {v.dtype for v in merged.values()} == {torch.float32}  # the base's precision is kept

    for name, key in (LINEAR, TEXT):  # linear: W' = W + 0.8 s_a up_a down_a - 0.5 s_b up_b down_b
        expected = base[key].double() + 0.8 * delta_of(ta, name) - 0.5 * delta_of(tb, name)
        tolerance = 8 * EPS * float(expected.abs().max())
        assert float((merged[key].double() - expected).abs().max()) <= tolerance, name

    # 3x3 LoCon: a 3x3 down then a 1x1 up, checked as what the merged conv computes
    name, key = CONV3
    x = torch.randn(2, base[key].shape[1], 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = F.conv2d(x, base[key].double(), padding=1)
    for tensors, ratio in ((ta, 0.8), (tb, -0.5)):
        down, up, scale = module_parts(tensors, name)
        assert down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1)
        want += ratio * scale * F.conv2d(F.conv2d(x, down, padding=1), up)
    got = F.conv2d(x, merged[key].double(), padding=1)
    assert float((got - want).abs().max()) <= 64 * EPS * float(want.abs().max())

    # exactly one weight per LoRA module changed; everything else (VAE, norms, biases, other layers) is bit-identical
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert len(changed) == len(set(module_names(ta)) | set(module_names(tb)))
    assert {LINEAR[1], CONV3[1], TEXT[1]} <= changed and all(k.endswith(".weight") for k in changed)
    assert not any(k.startswith("first_stage_model.") for k in changed)

    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "merged"
    record = json.loads(meta["pentadactyl.merged_from"])
    assert record["sd_model"] == tiny_single_file.name
    assert [(r["file"], r["ratio"]) for r in record["loras"]] == [("a.safetensors", 0.8), ("b.safetensors", -0.5)]
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]  # no temporary left


@pytest.mark.filterwarnings("ignore")
def test_merged_checkpoint_matches_diffusers_fusing_the_same_loras(tmp_path, tiny_model_paths, loras, capsys):
    single, folder = tiny_model_paths
    a, b = loras
    out = tmp_path / "merged.safetensors"
    assert run_cli(["--sd_model", single, "--models", a, b, "--ratios", "0.8", "0.5", "--save_to", out], capsys)[0] == 0
    ours = load_sd1(out)  # the project's loader reads it back
    unet, text_encoder = diffusers_fuse(folder, [(a, 0.8), (b, 0.5)])
    for mine, theirs in ((ours.unet, unet), (ours.text_encoder, text_encoder)):
        want, got = theirs.state_dict(), mine.state_dict()
        assert want.keys() == got.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=key)
    for got, want in zip(forward(ours.unet, ours.text_encoder), forward(unet, text_encoder)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fp16_checkpoint_stays_fp16_unless_told(tmp_path, tiny_single_file, loras, capsys):
    half = tmp_path / "half.safetensors"
    save_sd1_single_file(half, load_sd1(tiny_single_file), torch.float16)
    a, _ = loras
    out, full = tmp_path / "out" / "m16.safetensors", tmp_path / "out" / "m32.safetensors"
    assert run_cli(["--sd_model", half, "--models", a, "--save_to", out], capsys)[0] == 0
    assert run_cli(["--sd_model", half, "--models", a, "--save_to", full, "--save_precision", "float"], capsys)[0] == 0
    base, merged, wide = load_file(str(half)), load_file(str(out)), load_file(str(full))
    assert {v.dtype for v in merged.values()} == {torch.float16} and {v.dtype for v in wide.values()} == {torch.float32}
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert len(changed) == len(module_names(load_file(str(a))))  # untouched fp16 weights are bit-identical
    name, key = LINEAR
    expected = base[key].double() + delta_of(load_file(str(a)), name)
    assert float((wide[key].double() - expected).abs().max()) <= 8 * EPS * float(expected.abs().max())


# --- into one LoRA ------------------------------------------------------------------------------------
def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8:8 + size])


@pytest.mark.filterwarnings("ignore")
def test_concatenated_lora_is_exactly_the_weighted_sum_and_loads_in_diffusers(tmp_path, tiny_model_paths, loras,
                                                                              capsys):
    a, b = loras
    out = tmp_path / "ab.safetensors"
    code, stdout, _ = run_cli(["--models", a, b, "--ratios", "1", "0.5", "--save_to", out], capsys)
    assert code == 0 and "concat" in stdout
    ta, tb, merged = load_file(str(a)), load_file(str(b)), load_file(str(out))
    assert module_names(merged) == sorted(set(module_names(ta)) | set(module_names(tb)))
    assert {v.dtype for k, v in merged.items() if not k.endswith(".alpha")} == {torch.float32}  # as the inputs
    for name in module_names(merged):
        down_a, _, _ = module_parts(ta, name)
        down_b, _, _ = module_parts(tb, name)
        rank = merged[f"{name}.lora_down.weight"].shape[0]
        assert rank == down_a.shape[0] + down_b.shape[0]  # ranks add
        alpha_sum = float(ta[f"{name}.alpha"]) + float(tb[f"{name}.alpha"])
        assert float(merged[f"{name}.alpha"]) == alpha_sum  # and alphas add
        want = delta_of(ta, name) + 0.5 * delta_of(tb, name)
        assert float((delta_of(merged, name) - want).abs().max()) <= 8 * EPS * float(want.abs().max()), name

    _, header = header_of(out)
    meta = header["__metadata__"]
    assert meta["ss_network_dim"] == "12" and meta["ss_network_alpha"] == "10"  # 4 + 8, 2 + 8
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "6" and args["conv_alpha"] == "5"  # 2 + 4, 1 + 4
    assert args["text_encoder_dim"] == "16" and args["text_encoder_alpha"] == "11"  # 8 + 8, 3 + 8
    assert meta["ss_merge_method"] == "concat" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_resolution"] == "(512, 512)"
    sources = json.loads(meta["ss_merged_from"])
    assert [(s["file"], s["ratio"], s["ss_output_name"]) for s in sources] == [("a.safetensors", 1.0, "a"),
                                                                              ("b.safetensors", 0.5, "b")]
    assert sources[0]["sshs_model_hash"] == load_meta(a)["sshs_model_hash"]
    data = out.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + size:]).hexdigest()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(merged, meta)

    # diffusers reads the merged file as dW_a + 0.5 dW_b: the same weights as the sampler merging a and b
    single, folder = tiny_model_paths
    unet, text_encoder = diffusers_fuse(folder, [(out, 1.0)])
    reference_unet, reference_te, _ = tiny_diffusers_models(folder)
    merge_weights(ta, reference_unet, reference_te, 1.0)
    merge_weights(tb, reference_unet, reference_te, 0.5)
    for mine, theirs in ((reference_unet, unet), (reference_te, text_encoder)):
        got = theirs.state_dict()
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=key)


def load_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_same_scale_parts_are_copied_and_fp16_inputs_give_fp16(tmp_path, loras, capsys):
    _, b = loras
    half = tmp_path / "b16.safetensors"
    save_network(half, load_file(str(b)), load_meta(b), save_dtype="fp16")
    out = tmp_path / "bb.safetensors"
    assert run_cli(["--models", half, half, "--save_to", out], capsys)[0] == 0
    source, merged = load_file(str(half)), load_file(str(out))
    assert {v.dtype for k, v in merged.items() if not k.endswith(".alpha")} == {torch.float16}
    for name in module_names(source):  # b's alpha/rank is 1 everywhere: the result's too, nothing rescaled
        for part, dim in (("lora_down.weight", 0), ("lora_up.weight", 1)):
            assert torch.equal(merged[f"{name}.{part}"], torch.cat([source[f"{name}.{part}"]] * 2, dim=dim)), name


def test_svd_merge_error_equals_the_dropped_singular_values(tmp_path, loras, capsys):
    a, b = loras
    out = tmp_path / "svd.safetensors"
    code, stdout, _ = run_cli(["--models", a, b, "--ratios", "1", "0.5", "--save_to", out, "--new_rank", "5",
                               "--new_conv_rank", "3"], capsys)
    assert code == 0 and "kept energy" in stdout
    ta, tb, merged = load_file(str(a)), load_file(str(b)), load_file(str(out))
    lines = {line.split()[0]: line for line in stdout.splitlines()}
    for name in module_names(merged):
        true = delta_of(ta, name) + 0.5 * delta_of(tb, name)
        sigma = torch.linalg.svdvals(true)
        conv = ta[f"{name}.lora_down.weight"].shape[2:] == (3, 3)
        k = min(3 if conv else 5, int((sigma > 1e-12 * sigma[0]).sum()))
        assert merged[f"{name}.lora_down.weight"].shape[0] == k and float(merged[f"{name}.alpha"]) == k
        error = float(torch.linalg.matrix_norm(delta_of(merged, name) - true))
        dropped = float(sigma[k:].square().sum().sqrt())
        assert abs(error - dropped) <= 1e-5 * float(sigma.norm()), name
        kept = float(sigma[:k].square().sum() / sigma.square().sum())
        assert f"{100 * kept:.4f} %" in lines[name]
    meta = load_meta(out)
    assert meta["ss_network_dim"] == "5" and meta["ss_network_alpha"] == "5"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "3"
    assert meta["ss_merge_method"] == "svd new_rank=5 new_conv_rank=3"

    # a rank above the sum of the inputs' ranks keeps everything: exact, at rank r_a + r_b
    exact = tmp_path / "exact.safetensors"
    assert run_cli(["--models", a, b, "--ratios", "1", "0.5", "--save_to", exact, "--new_rank", "64"], capsys)[0] == 0
    merged = load_file(str(exact))
    for name in module_names(merged):
        want = delta_of(ta, name) + 0.5 * delta_of(tb, name)
        assert merged[f"{name}.lora_down.weight"].shape[0] == ta[f"{name}.lora_down.weight"].shape[0] + \
            tb[f"{name}.lora_down.weight"].shape[0]
        assert float((delta_of(merged, name) - want).abs().max()) <= 1e-5 * float(want.abs().max()), name


def test_tucker_and_ldm_named_modules_merge_by_svd_only(tmp_path, capsys):
    """A LyCORIS file (LDM-style name, Tucker core) is merged through its full update; concatenation refuses it."""
    g = torch.Generator().manual_seed(5)
    name = "lora_unet_input_blocks_2_0_in_layers_2"  # = down_blocks_0_resnets_1_conv1
    r, channels = 3, 32
    file = {f"{name}.lora_down.weight": torch.randn(r, channels, 1, 1, generator=g),
            f"{name}.lora_mid.weight": torch.randn(r, r, 3, 3, generator=g),
            f"{name}.lora_up.weight": torch.randn(channels, r, 1, 1, generator=g), f"{name}.alpha": torch.tensor(1.5)}
    path = tmp_path / "tucker.safetensors"
    save_file(file, str(path))
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(["--models", path, "--save_to", out], capsys)
    assert code == 2 and "Tucker" in err and "--new_rank" in err and not out.exists()
    assert run_cli(["--models", path, "--ratios", "0.5", "--save_to", out, "--new_rank", "64"], capsys)[0] == 0
    merged = load_file(str(out))
    down = merged[f"{CONV3[0]}.lora_down.weight"].double()
    up = merged[f"{CONV3[0]}.lora_up.weight"].double()
    assert down.shape[1:] == (channels, 3, 3) and up.shape[2:] == (1, 1)
    x = torch.randn(1, channels, 8, 8, generator=g, dtype=torch.float64)
    d, m, u = (file[f"{name}.lora_{p}.weight"].double() for p in ("down", "mid", "up"))
    want = 0.5 * 1.5 / r * F.conv2d(F.conv2d(F.conv2d(x, d), m, padding=1), u)
    scale = float(merged[f"{CONV3[0]}.alpha"]) / down.shape[0]
    got = scale * F.conv2d(F.conv2d(x, down, padding=1), up)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


# --- bad input ----------------------------------------------------------------------------------------
def foreign_lora(folder: Path) -> Path:
    """A LoRA whose module names exist in no SD1 model (a fifth down block)."""
    name = "lora_unet_down_blocks_5_attentions_0_proj_in"
    path = folder / "foreign.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)}, str(path))
    return path


def sd15_sized_lora(folder: Path) -> Path:
    """An SD1.5 LoRA: its names exist in the tiny model, its shapes do not."""
    name = LINEAR[0]
    path = folder / "sd15.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


def sdxl_checkpoint(folder: Path) -> Path:
    path = folder / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    return path


CASES = {
    "ratio count": (lambda f, a, base: ["--models", a, a, "--ratios", "1", "0.5", "0.2"],
                    "--ratios has 3 value(s) for 2 file(s) in --models"),
    "missing lora": (lambda f, a, base: ["--sd_model", base, "--models", a, f / "nope.safetensors"],
                     "nope.safetensors: no such file"),
    "missing checkpoint": (lambda f, a, base: ["--sd_model", f / "nope.safetensors", "--models", a],
                           "--sd_model " + "{f}/nope.safetensors: no such file or folder"),
    "foreign lora into a lora": (lambda f, a, base: ["--models", a, foreign_lora(f)],
                                 "foreign.safetensors: 1 module(s) match no layer of SD1.x"),
    "foreign lora into a checkpoint": (lambda f, a, base: ["--sd_model", base, "--models", a, foreign_lora(f)],
                                       "foreign.safetensors: 1 module(s) match no layer of this SD1 model"),
    "other base model": (lambda f, a, base: ["--sd_model", base, "--models", sd15_sized_lora(f)],
                         "does not fit the model layer"),
    "shapes differ between loras": (lambda f, a, base: ["--models", a, sd15_sized_lora(f)],
                                    "made for different base models"),
    "non-SD1 checkpoint": (lambda f, a, base: ["--sd_model", sdxl_checkpoint(f), "--models", a],
                           "this is SDXL, not an SD1.x checkpoint"),
    "checkpoint given as a lora": (lambda f, a, base: ["--models", base],
                                   "not a LoRA; use it as --sd_model"),
    "new rank with a checkpoint": (lambda f, a, base: ["--sd_model", base, "--models", a, "--new_rank", "4"],
                                   "--new_rank applies when LoRAs are merged into one LoRA"),
    "bad ratio": (lambda f, a, base: ["--models", a, "--ratios", "half"], "argument --ratios: invalid float value"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_single_file, loras, case, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make, message = CASES[case]
    argv = make(inputs, loras[0], tiny_single_file)
    out = tmp_path / "out" / "merged.safetensors"
    code, stdout, stderr = run_cli([*argv, "--save_to", out], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message.format(f=inputs) in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_output_that_would_replace_an_input_or_is_no_safetensors_is_refused(tmp_path, loras, capsys):
    a, _ = loras
    copy = tmp_path / "a.safetensors"
    copy.write_bytes(a.read_bytes())
    code, _, err = run_cli(["--models", copy, "--save_to", copy], capsys)
    assert code == 2 and "is one of the input files" in err and copy.read_bytes() == a.read_bytes()
    code, _, err = run_cli(["--models", copy, "--save_to", tmp_path / "m.ckpt"], capsys)
    assert code == 2 and "written as .safetensors" in err and not (tmp_path / "m.ckpt").exists()


@pytest.mark.slow
def test_runs_as_a_script(tmp_path, loras):
    out = tmp_path / "ab.safetensors"
    result = subprocess.run([sys.executable, "networks/merge.py", "--models", str(loras[0]), str(loras[1]),
                             "--save_to", str(out), "--new_rank", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kept energy" in result.stdout and out.is_file()
    result = subprocess.run([sys.executable, "networks/merge.py", "--models", str(tmp_path / "nope.safetensors"),
                             "--save_to", str(tmp_path / "x.safetensors")], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ")
