"""networks/resize.py and networks/extract.py.

The SVD maths is checked against independent full SVDs (torch.linalg.svdvals of the whole update): the
error of a rank-k file is the sum of the dropped squared singular values, and the "kept" line printed per
module is that share. The dynamic rank rules are checked on an update built with known singular values,
against ranks worked out by hand. The files are loaded by diffusers' own LoRA loader (load_lora_weights +
fuse_lora), which must move every weight by alpha/r * up @ down; an extracted file on the base model must
give the tuned model's weights and outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from library.errors import ConfigError, ModelLoadError, NetworkFileError
from networks import NetworkSpec, create_network, save_network
from networks import extract as extract_tool
from networks import resize as resize_tool

REPO = Path(__file__).resolve().parent.parent
SOURCE_SPEC = NetworkSpec(network_dim=8, network_alpha=4, conv_dim=4, conv_alpha=2)
RUN_METADATA = {
    "ss_output_name": "hands_v2",
    "ss_steps": "1200",
    "ss_learning_rate": "0.0001",
    "ss_training_comment": "palms only",
    "ss_tag_frequency": json.dumps({"10_hand": {"hand": 20}}),
}
KEPT_LINE = re.compile(r"^(lora_\S+)  rank (\d+)(?: -> (\d+))?  alpha \S+(?: -> \S+)?  kept ([\d.]+) %", re.M)


# --- helpers ------------------------------------------------------------------------------------------
def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def updates(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> (alpha / r) * up @ down as a float64 [out, in*kh*kw] matrix, written out independently."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down = tensors[key].double().flatten(1)
            up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
            alpha = float(tensors[f"{name}.alpha"])
            out[name] = alpha / down.shape[0] * (up @ down)
    return out


def rank_of(tensors: dict[str, torch.Tensor], name: str) -> int:
    return int(tensors[f"{name}.lora_down.weight"].shape[0])


def is_kxk_conv(tensors: dict[str, torch.Tensor], name: str) -> bool:
    down = tensors[f"{name}.lora_down.weight"]
    return down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


def printed_kept(text: str) -> dict[str, float]:
    return {m[1]: float(m[4]) for m in KEPT_LINE.finditer(text)}


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def layer(unet, text_encoder, model: str, path: str):
    root = unet if model == "unet" else text_encoder
    for name, module in root.named_modules():
        if name == path or name.endswith("." + path) or name == path.removeprefix("text_model."):
            return module
    raise KeyError(path)


def diffusers_fuse(path: Path, unet, text_encoder, multiplier: float = 1.0) -> None:
    """diffusers' own loader: load_lora_weights + fuse_lora, then drop the adapters (fused weights stay)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    from library.models.architecture import TINY_VAE_CONFIG

    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**TINY_VAE_CONFIG), text_encoder=text_encoder, tokenizer=None,
                                   unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="under_test")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=multiplier)
    pipe.unload_lora_weights()


def cli_error(main, argv, capsys) -> str:
    from library.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    # one error line, the last thing printed (a library's import-time notice may come before it)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    return lines[-1]


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_single_file):
    from library.models.loading import load_sd1

    return load_sd1(tiny_single_file)


@pytest.fixture(scope="module")
def source_lora(tiny, tmp_path_factory):
    """A LoCon on the tiny model (rank 8 / alpha 4, 3x3 convs rank 4 / alpha 2) with random weights, fp32."""
    network = create_network(SOURCE_SPEC, tiny.unet, tiny.text_encoder)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("resize") / "source.safetensors"
    save_network(path, network.kohya_state_dict(), {**SOURCE_SPEC.to_metadata(), **RUN_METADATA}, save_dtype="float")
    return path


# The update of the dynamic-rank tests: singular values 8, 4, 2, 1, 0.5, 0.25 (sum 15.75, squares 85.3125).
KNOWN_SV = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
KNOWN_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32 x 32 on the tiny model


@pytest.fixture(scope="module")
def known_lora(tmp_path_factory):
    """One module, rank 6, alpha 3 (scale 1/2): up @ down = U diag(2 * KNOWN_SV) V^T, so dW = U diag(KNOWN_SV) V^T."""
    g = torch.Generator().manual_seed(3)
    u, v = random_orthonormal(32, 6, g), random_orthonormal(32, 6, g)
    root = (2 * KNOWN_SV).sqrt()
    tensors = {f"{KNOWN_MODULE}.lora_up.weight": (u * root).float(),
               f"{KNOWN_MODULE}.lora_down.weight": (root[:, None] * v.T).float(),
               f"{KNOWN_MODULE}.alpha": torch.tensor(3.0)}
    path = tmp_path_factory.mktemp("known") / "known.safetensors"
    save_network(path, tensors, SOURCE_SPEC.to_metadata(), save_dtype="float")
    return path


# tuned = base + a known rank-3 update on these layers (everything else identical)
CHANGED = {
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): [0.6, 0.3, 0.15],
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"): [0.8, 0.4, 0.1],
    ("unet", "down_blocks.0.attentions.0.proj_in"): [0.5, 0.25, 0.2],
    ("unet", "down_blocks.1.resnets.0.conv1"): [1.2, 0.6, 0.3],  # 3 x 3 conv: needs --conv_dim
    ("text_encoder", "text_model.encoder.layers.1.self_attn.q_proj"): [2.0, 1.0, 0.5],
}
CHANGED_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_1_resnets_0_conv1",
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj",
}


@pytest.fixture(scope="module")
def tuned_pair(tiny_single_file, tmp_path_factory):
    """(base file, tuned file, {(model, path): the exact float32 difference tuned - base})."""
    from library.models.loading import load_sd1, save_sd1_single_file

    model = load_sd1(tiny_single_file)
    g = torch.Generator().manual_seed(5)
    differences = {}
    with torch.no_grad():
        for (part, path), sv in CHANGED.items():
            weight = layer(model.unet, model.text_encoder, part, path).weight
            rows, cols = weight.shape[0], weight[0].numel()
            delta = random_orthonormal(rows, 3, g) @ torch.diag(torch.tensor(sv, dtype=torch.float64)) \
                @ random_orthonormal(cols, 3, g).T
            before = weight.detach().clone()
            weight.add_(delta.reshape(weight.shape).float())
            differences[(part, path)] = (weight - before).double().flatten(1)
    tuned = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_sd1_single_file(tuned, model)
    return Path(tiny_single_file), tuned, differences


def kohya(part: str, path: str) -> str:
    from networks.targets import kohya_name_for

    return kohya_name_for(part, path)


# --- resize -------------------------------------------------------------------------------------------
def test_resize_error_is_the_dropped_singular_values(source_lora, tmp_path, capsys):
    out = tmp_path / "r3.safetensors"
    written = resize_tool.main(["--model", str(source_lora), "--save_to", str(out), "--new_rank", "3",
                                "--new_conv_rank", "2", "--save_precision", "float"])
    text = capsys.readouterr().out
    assert "note:" not in text  # fixed ranks: one alpha per kind, which diffusers reads right
    printed = printed_kept(text)
    source, source_meta = read(source_lora)
    resized, metadata = read(out)
    before, after = updates(source), updates(resized)
    assert set(after) == set(before) == set(printed) and len(before) == 141
    for name, delta in before.items():
        s = torch.linalg.svdvals(delta)
        k = 2 if is_kxk_conv(source, name) else 3
        assert rank_of(resized, name) == k, name
        # alpha_new = alpha * k / r: alpha/rank (the scale) is unchanged
        assert float(resized[f"{name}.alpha"]) == pytest.approx(float(source[f"{name}.alpha"]) * k / rank_of(source, name))
        total, dropped = float(s.square().sum()), float(s[k:].square().sum())
        error = float((delta - after[name]).square().sum())
        assert error == pytest.approx(dropped, abs=1e-6 * total), name  # Eckart-Young: the best rank-k error
        assert printed[name] == pytest.approx(100 * (1 - dropped / total), abs=1e-4), name
    # metadata: the source's ss_* keys, the new rank and alpha, the resize recorded, hashes of this file
    assert metadata == written
    for key, value in RUN_METADATA.items():
        if key != "ss_training_comment":
            assert metadata[key] == value
    assert metadata["ss_network_dim"] == "3" and metadata["ss_network_alpha"] == "1.5"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert metadata["ss_training_comment"].startswith("resized to rank 3 (conv 2) from rank ")
    assert metadata["ss_training_comment"].endswith("; palms only")
    record = json.loads(metadata["pentadactyl.resize"])
    assert record["new_rank"] == 3 and record["new_conv_rank"] == 2 and record["source"] == "source.safetensors"
    assert record["source_sshs_model_hash"] == source_meta["sshs_model_hash"]
    data = out.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert metadata["sshs_model_hash"] != source_meta["sshs_model_hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["r3.safetensors"]  # atomic: no temporary left


def test_resize_to_full_rank_reproduces_the_update_and_never_raises_a_rank(source_lora, tmp_path, capsys):
    source = read(source_lora)[0]
    before = updates(source)
    for new_rank, conv_rank in ((8, 4), (64, 64)):
        out = tmp_path / f"full{new_rank}.safetensors"
        resize_tool.main(["--model", str(source_lora), "--save_to", str(out), "--new_rank", str(new_rank),
                          "--new_conv_rank", str(conv_rank)])
        printed = printed_kept(capsys.readouterr().out)
        resized = read(out)[0]
        assert {v.dtype for k, v in resized.items() if not k.endswith(".alpha")} == {torch.float32}  # the source's
        for name, delta in updates(resized).items():
            assert rank_of(resized, name) == rank_of(source, name)  # capped at the module's current rank
            assert float(resized[f"{name}.alpha"]) == float(source[f"{name}.alpha"])
            torch.testing.assert_close(delta, before[name], rtol=0, atol=1e-6 * float(before[name].abs().max()))
            assert printed[name] == pytest.approx(100.0, abs=1e-4)


def test_resize_expands_a_tucker_core_into_plain_locon(tmp_path):
    name = "lora_unet_down_blocks_1_resnets_0_conv1"  # 3x3, 32 -> 64
    g = torch.Generator().manual_seed(2)
    tensors = {f"{name}.lora_down.weight": torch.randn(4, 32, 1, 1, generator=g),
               f"{name}.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g),
               f"{name}.lora_up.weight": torch.randn(64, 4, 1, 1, generator=g),
               f"{name}.alpha": torch.tensor(2.0)}
    source = tmp_path / "tucker.safetensors"
    save_network(source, tensors, {}, save_dtype="float")
    out = tmp_path / "plain.safetensors"
    resize_tool.main(["--model", str(source), "--save_to", str(out), "--new_rank", "4"])
    resized = read(out)[0]
    assert set(resized) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert resized[f"{name}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert resized[f"{name}.lora_up.weight"].shape == (64, 4, 1, 1)
    down, mid, up = (tensors[f"{name}.{p}.weight"].double() for p in ("lora_down", "lora_mid", "lora_up"))
    expected = 0.5 * torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1)).flatten(1)
    torch.testing.assert_close(updates(resized)[name], expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


# Ranks by hand for singular values 8, 4, 2, 1, 0.5, 0.25:
#   sv_ratio X keeps those above 8 / X: X=5 -> above 1.6: {8, 4, 2} = 3; X=10 -> above 0.8: 4; X=100 -> all 6.
#   sv_cumulative t: running sums 8, 12, 14, 15, 15.5, 15.75 over 15.75 = .508, .762, .889, .952, .984, 1:
#     t=0.5 -> 1; t=0.9 -> 4 (.889 < .9 <= .952).
#   sv_fro t: running sums of squares 64, 80, 84, 85, 85.25, 85.3125; sqrt of the shares = .866, .968, .992,
#     .998, ...: t=0.95 -> 2; t=0.99 -> 3.
#   --new_rank caps: sv_ratio 100 at most 5 -> 5; sv_fro 0.99 at most 2 -> 2.
@pytest.mark.parametrize("method, param, new_rank, expected", [
    ("sv_ratio", 5, 8, 3), ("sv_ratio", 10, 8, 4), ("sv_ratio", 100, 5, 5),
    ("sv_cumulative", 0.5, 8, 1), ("sv_cumulative", 0.9, 8, 4),
    ("sv_fro", 0.95, 8, 2), ("sv_fro", 0.99, 8, 3), ("sv_fro", 0.99, 2, 2),
])
def test_dynamic_methods_pick_the_rank_worked_out_by_hand(known_lora, tmp_path, capsys, method, param, new_rank,
                                                           expected):
    out = tmp_path / "dynamic.safetensors"
    metadata = resize_tool.main(["--model", str(known_lora), "--save_to", str(out), "--new_rank", str(new_rank),
                                 "--dynamic_method", method, "--dynamic_param", str(param), "--save_precision", "float"])
    printed = printed_kept(capsys.readouterr().out)
    resized = read(out)[0]
    assert rank_of(resized, KNOWN_MODULE) == expected
    assert float(resized[f"{KNOWN_MODULE}.alpha"]) == pytest.approx(3.0 * expected / 6)
    kept = float(KNOWN_SV[:expected].square().sum() / KNOWN_SV.square().sum())
    assert printed[KNOWN_MODULE] == pytest.approx(100 * kept, abs=1e-4)
    values = torch.linalg.svdvals(updates(resized)[KNOWN_MODULE])
    torch.testing.assert_close(values[:expected], KNOWN_SV[:expected], rtol=1e-6, atol=1e-6)
    assert float(values[expected:].abs().max()) < 1e-6
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert json.loads(metadata["pentadactyl.resize"])["dynamic_method"] == method


def test_dynamic_resize_of_a_whole_file_and_the_diffusers_alpha_note(source_lora, tmp_path, capsys):
    out = tmp_path / "fro.safetensors"
    resize_tool.main(["--model", str(source_lora), "--save_to", str(out), "--new_rank", "6", "--new_conv_rank", "3",
                      "--dynamic_method", "sv_fro", "--dynamic_param", "0.9", "--save_precision", "float"])
    text = capsys.readouterr().out
    source, resized = read(source_lora)[0], read(out)[0]
    for name, delta in updates(source).items():
        s = torch.linalg.svdvals(delta)
        shares = (s.square().cumsum(0) / s.square().sum()).sqrt()
        wanted = min(int((shares < 0.9).sum()) + 1, 3 if is_kxk_conv(source, name) else 6)
        assert rank_of(resized, name) == wanted, name
        # alpha/rank unchanged whatever the rank
        assert float(resized[f"{name}.alpha"]) / wanted == pytest.approx(
            float(source[f"{name}.alpha"]) / rank_of(source, name))
    # the ranks (so the alphas) vary: diffusers' loader would scale some attention layers wrongly, and says so
    assert len({float(v) for k, v in resized.items() if k.endswith(".alpha")}) > 1
    assert "note: " in text and "diffusers" in text


def test_choose_rank_edges():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert resize_tool.choose_rank(s, 8, "sv_ratio", 8) == 3  # "above s1 / X": 1 is not above 8 / 8
    assert resize_tool.choose_rank(s, 8, "sv_ratio", 0.5) == 1  # nothing above 16: still rank 1
    assert resize_tool.choose_rank(s, 8, "sv_cumulative", 1.0) == 4
    assert resize_tool.choose_rank(torch.zeros(4), 8, "sv_fro", 0.9) == 1  # a zero update keeps rank 1
    assert resize_tool.choose_rank(s, 2) == 2 and resize_tool.choose_rank(s, 9) == 4


def test_resized_file_loads_in_diffusers_and_moves_each_weight_by_its_update(source_lora, tiny, tmp_path, capsys):
    out = tmp_path / "r4.safetensors"
    resize_tool.main(["--model", str(source_lora), "--save_to", str(out), "--new_rank", "4", "--new_conv_rank", "2",
                      "--save_precision", "fp16", "--verbose"])
    assert "first dropped" in capsys.readouterr().out
    resized = read(out)[0]
    assert {v.dtype for k, v in resized.items() if not k.endswith(".alpha")} == {torch.float16}
    unet, text_encoder = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    diffusers_fuse(out, unet, text_encoder, multiplier=0.8)
    from networks.targets import iter_layers, kohya_name_for

    checked = 0
    for part, fused_model, base_model in (("unet", unet, tiny.unet), ("text_encoder", text_encoder, tiny.text_encoder)):
        base_layers = dict(base_model.named_modules())
        for path, module, _ in iter_layers(fused_model):
            name = kohya_name_for(part, path)
            before = base_layers[path].weight.double()
            if f"{name}.alpha" not in resized:
                assert torch.equal(module.weight, base_layers[path].weight), name
                continue
            down = resized[f"{name}.lora_down.weight"].double()
            up = resized[f"{name}.lora_up.weight"].double()
            alpha = float(resized[f"{name}.alpha"])
            expected = before + 0.8 * alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
            torch.testing.assert_close(module.weight.double(), expected, rtol=0,
                                       atol=1e-6 + 1e-5 * float(expected.abs().max()))
            checked += 1
    assert checked == 141


def test_resize_bad_input_is_one_line_and_status_2(source_lora, tiny_single_file, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    good = ["--model", str(source_lora), "--save_to", out]
    cases = [
        (["--model", str(tiny_single_file), "--save_to", out, "--new_rank", "4"], "full SD1.x model checkpoint"),
        ([*good, "--new_rank", "0"], "--new_rank 0: a rank must be at least 1"),
        ([*good, "--new_rank", "4", "--new_conv_rank", "-1"], "--new_conv_rank -1"),
        (["--model", str(tmp_path / "missing.safetensors"), "--save_to", out, "--new_rank", "4"], "no such file"),
        ([*good, "--new_rank", "4", "--dynamic_method", "sv_max", "--dynamic_param", "2"],
         "--dynamic_method 'sv_max' is unknown"),
        ([*good, "--new_rank", "4", "--dynamic_method", "sv_fro"], "needs --dynamic_param"),
        ([*good, "--new_rank", "4", "--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "share in (0, 1]"),
        ([*good, "--new_rank", "4", "--save_precision", "fp8"], "save_precision"),
        ([*good, "--new_rank", "four"], "invalid int value"),
    ]
    for argv, message in cases:
        line = cli_error(resize_tool.main, argv, capsys)
        assert message in line, (argv, line)
    assert not Path(out).exists()


# --- extract ------------------------------------------------------------------------------------------
def extract(base: Path, tuned: Path, out: Path, *options: str) -> dict[str, str]:
    return extract_tool.main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out), *options])


def test_extract_recovers_a_known_low_rank_update(tuned_pair, tmp_path, capsys):
    from library.models.loading import load_sd1

    base, tuned, differences = tuned_pair
    out = tmp_path / "extracted.safetensors"
    metadata = extract(base, tuned, out, "--dim", "3", "--conv_dim", "3", "--save_precision", "float")
    printed = capsys.readouterr().out
    tensors = read(out)[0]
    # every layer train_network.py covers with these settings, under its kohya names; the identical ones are
    # rank-1 zero updates
    network = create_network(NetworkSpec(network_dim=3, conv_dim=3), load_sd1(base).unet, load_sd1(base).text_encoder)
    assert set(updates(tensors)) == set(network.names())
    for name, update in updates(tensors).items():
        assert (name in CHANGED_NAMES) is bool(update.abs().max() > 0), name
        if name not in CHANGED_NAMES:
            assert rank_of(tensors, name) == 1 and float(tensors[f"{name}.alpha"]) == 3.0
    assert "text encoder: largest weight change" in printed and "> min_diff 0.01: extracted" in printed
    kept = printed_kept(printed)
    assert set(kept) == CHANGED_NAMES
    for (part, path), difference in differences.items():
        name = kohya(part, path)
        assert rank_of(tensors, name) == 3 and float(tensors[f"{name}.alpha"]) == 3.0  # alpha = rank
        # float32 precision: the SVD runs in float32 on the float32 difference
        recovered = updates(tensors)[name]
        torch.testing.assert_close(recovered, difference, rtol=0, atol=1e-5 * float(difference.abs().max()))
        assert float((recovered - difference).norm() / difference.norm()) < 1e-6, name
        assert kept[name] == pytest.approx(100.0, abs=1e-4)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (3, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape == (64, 3, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (3, 32, 1, 1)
    assert tensors["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].shape \
        == (256, 3)
    assert metadata["ss_network_dim"] == "3" and metadata["ss_network_alpha"] == "3"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3"}
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    record = json.loads(metadata["pentadactyl.extract"])
    assert record["text_encoder"] is True and record["identical_layers"] == len(network) - len(CHANGED_NAMES)


def test_extract_at_a_lower_rank_drops_exactly_the_smaller_singular_values(tuned_pair, tmp_path, capsys):
    base, tuned, differences = tuned_pair
    out = tmp_path / "low.safetensors"
    extract(base, tuned, out, "--dim", "2", "--conv_dim", "1", "--save_precision", "float")
    kept = printed_kept(capsys.readouterr().out)
    tensors = read(out)[0]
    for (part, path), difference in differences.items():
        name = kohya(part, path)
        k = 1 if path.endswith("conv1") else 2
        assert rank_of(tensors, name) == k
        s = torch.linalg.svdvals(difference)
        total, dropped = float(s.square().sum()), float(s[k:].square().sum())
        error = float((difference - updates(tensors)[name]).square().sum())
        assert error == pytest.approx(dropped, abs=1e-6 * total), name
        assert kept[name] == pytest.approx(100 * (1 - dropped / total), abs=1e-4)


def test_extract_dynamic_rank(tuned_pair, tmp_path, capsys):
    base, tuned, differences = tuned_pair
    out = tmp_path / "dynamic.safetensors"
    # sv_ratio 3 keeps the singular values above s1 / 3; the layers' values are CHANGED's (float32-exact enough)
    metadata = extract(base, tuned, out, "--dim", "8", "--conv_dim", "8", "--dynamic_method", "sv_ratio",
                       "--dynamic_param", "3", "--save_precision", "float")
    capsys.readouterr()
    tensors = read(out)[0]
    for (part, path), sv in CHANGED.items():
        expected = sum(v > sv[0] / 3 for v in sv)
        name = kohya(part, path)
        assert rank_of(tensors, name) == expected and float(tensors[f"{name}.alpha"]) == expected, name
    assert metadata["ss_network_dim"] == "Dynamic"


@pytest.mark.parametrize("options, with_text_encoder", [
    ([], True),
    (["--min_diff", "10"], False),  # the text encoder changed by less than 10: left out
    (["--min_diff", "10", "--text_encoder"], True),
    (["--no_text_encoder"], False),
])
def test_extract_text_encoder_rule(tuned_pair, tmp_path, capsys, options, with_text_encoder):
    base, tuned, _ = tuned_pair
    out = tmp_path / "te.safetensors"
    extract(base, tuned, out, "--dim", "3", *options)
    printed = capsys.readouterr().out
    names = set(updates(read(out)[0]))
    assert ("lora_te_text_model_encoder_layers_1_self_attn_q_proj" in names) is with_text_encoder
    assert len([n for n in names if n.startswith("lora_te_")]) == (24 if with_text_encoder else 0)  # 4 layers x 6
    assert "lora_unet_down_blocks_1_resnets_0_conv1" not in names  # no --conv_dim: 3x3 convs are not extracted
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    if not options:
        assert re.search(r"largest weight change [\d.]+ > min_diff 0.01: extracted", printed)
    if options == ["--min_diff", "10"]:
        assert "<= min_diff 10: left out (U-Net only)" in printed


def test_extracted_file_in_diffusers_gives_the_tuned_model(tuned_pair, tmp_path, capsys):
    from library.models.loading import load_sd1

    base, tuned, differences = tuned_pair
    out = tmp_path / "lora.safetensors"
    extract(base, tuned, out, "--dim", "3", "--conv_dim", "3", "--save_precision", "float")
    capsys.readouterr()
    org, target = load_sd1(base), load_sd1(tuned)
    diffusers_fuse(out, org.unet, org.text_encoder)
    for (part, path) in differences:
        fused = layer(org.unet, org.text_encoder, part, path).weight
        wanted = layer(target.unet, target.text_encoder, part, path).weight
        torch.testing.assert_close(fused, wanted, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2463, 49407]])
    sample, timestep = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        results = []
        for model in (org, target):
            context = model.text_encoder(tokens).last_hidden_state
            results.append((context, model.unet(sample, timestep, encoder_hidden_states=context).sample))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def test_extract_refuses_models_of_another_architecture(tiny_single_file, tmp_path, capsys):
    from library.models import architecture as arch
    from library.models.loading import SD1Model, save_sd1_single_file
    from library.models.tiny import build_tiny_model

    model = build_tiny_model()
    torch.manual_seed(0)
    wider = arch.build_unet({**arch.TINY_UNET_CONFIG, "block_out_channels": [32, 96]})
    other = tmp_path / "other.safetensors"
    save_sd1_single_file(other, SD1Model(wider, model.vae, model.text_encoder, model.tokenizer, "wider"))
    out = tmp_path / "never.safetensors"
    with pytest.raises(ModelLoadError, match=r"not the same architecture \(U-Net block_out_channels: "
                                             r"\[32, 64\] vs \[32, 96\]\)"):
        extract(Path(tiny_single_file), other, out, "--dim", "4")
    line = cli_error(extract_tool.main, ["--model_org", str(tiny_single_file), "--model_tuned", str(other),
                                         "--save_to", str(out), "--dim", "4"], capsys)
    assert "not the same architecture" in line and "fine-tune and the base model" in line
    assert not out.exists()


def test_extract_bad_input_is_one_line_and_status_2(tiny_single_file, tmp_path, capsys):
    base, out = str(tiny_single_file), str(tmp_path / "out.safetensors")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    cases = [
        ([base, str(tmp_path / "missing.safetensors"), "--dim", "4"], "no such file or folder"),
        ([base, str(pickle), "--dim", "4"], "never unpickles"),
        ([base, base, "--dim", "0"], "--dim 0: a rank must be at least 1"),
        ([base, base, "--dim", "4", "--dynamic_method", "sv_ratio"], "needs --dynamic_param"),
        ([base, base, "--dim", "4", "--text_encoder", "--no_text_encoder"], "not allowed with argument"),
        ([base, base, "--dim", "4"], "nothing to extract"),  # a model against itself
    ]
    for (org, tuned, *rest), message in cases:
        line = cli_error(extract_tool.main, ["--model_org", org, "--model_tuned", tuned, "--save_to", out, *rest],
                         capsys)
        assert message in line, (rest, line)
    assert not Path(out).exists()


def test_errors_are_pentadactyl_errors():
    with pytest.raises(ConfigError):
        resize_tool.check_dynamic("sv_ratio", 0)
    with pytest.raises(NetworkFileError, match="DoRA"):
        resize_tool.resize_module("x", {"lora_down.weight": torch.ones(1, 2), "lora_up.weight": torch.ones(2, 1),
                                        "dora_scale": torch.ones(2, 1)}, 1, None, None, torch.device("cpu"))


@pytest.mark.slow
def test_both_tools_run_as_scripts(source_lora, tmp_path):
    out = tmp_path / "script.safetensors"
    done = subprocess.run([sys.executable, "networks/resize.py", "--model", str(source_lora), "--save_to", str(out),
                           "--new_rank", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept energy mean" in done.stdout and out.is_file()
    failed = subprocess.run([sys.executable, str(REPO / "networks" / "extract.py"), "--model_org", "a.safetensors", "--model_tuned",
                             "b.safetensors", "--save_to", str(tmp_path / "x.safetensors"), "--dim", "4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        "error: --model_org a.safetensors: no such file or folder; give an SD1.x .safetensors file or diffusers folder"]
