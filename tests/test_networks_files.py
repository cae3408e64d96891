"""kohya files: round trip, metadata, hashes (recomputed from the bytes), foreign files, bad input, tools."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from library.errors import NetworkFileError
from library.sampling.networks import attach_networks, detach_networks, load_sampling_networks
from library.models.architecture import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, build_text_encoder, build_unet
from networks import (
    NetworkSpec, create_network, load_network_file, merge_weights, network_from_weights,
    normalize_names, parse_network_arg, save_network,
)
from networks.check_lora import format_report, inspect_file, main as check_lora_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return build_unet(TINY_UNET_CONFIG).eval(), build_text_encoder(TINY_TEXT_CONFIG).eval()


@pytest.fixture()
def models(tiny_models):
    return copy.deepcopy(tiny_models[0]), copy.deepcopy(tiny_models[1])


def trained_network(unet, te, spec=None, seed=2):
    network = create_network(spec or NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), unet, te)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return network


RUN_METADATA = {
    "ss_output_name": "hand_v1",
    "ss_training_started_at": "1700000000.5",
    "ss_training_finished_at": "1700003600.25",
    "ss_resolution": "(512, 512)",
    "ss_steps": "1000",
    "ss_tag_frequency": json.dumps({"10_hand": {"hand": 20, "fingers": 7}}),
    "ss_dataset_dirs": json.dumps({"10_hand": {"n_repeats": 10, "img_count": 20}}),
    "ss_datasets": json.dumps([{"batch_size_per_device": 1}]),
    "ss_bucket_info": json.dumps({"buckets": {}}),
}


def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8:8 + size])


def test_round_trip_keeps_tensors_and_metadata(models, tmp_path):
    unet, te = models
    network = trained_network(unet, te)
    spec_meta = network.spec.to_metadata()
    path = tmp_path / "net.safetensors"
    written = save_network(path, network.kohya_state_dict(), {**spec_meta, **RUN_METADATA}, save_dtype="fp32")
    tensors, metadata = load_network_file(path)
    assert metadata == written
    for key, value in network.kohya_state_dict().items():
        assert torch.equal(tensors[key], value), key
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(a.dtype == torch.float32 and a.dim() == 0 for a in alphas)
    assert {"modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title", "modelspec.resolution",
            "modelspec.date", "modelspec.prediction_type"} <= set(metadata)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "hand_v1" and metadata["modelspec.resolution"] == "512x512"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    # loading back into a network of the same spec restores it exactly
    fresh = create_network(network.spec, unet, te)
    fresh.load_kohya_state_dict(tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in fresh.kohya_state_dict().items())
    # and no temporary file is left behind by the atomic write
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision(models, tmp_path, precision, dtype):
    network = trained_network(*models)
    path = tmp_path / f"{precision}.safetensors"
    save_network(path, network.kohya_state_dict(), network.spec.to_metadata(), save_dtype=precision)
    tensors = load_file(str(path))
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {dtype}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}


def test_hashes_recomputed_from_file_bytes(models, tmp_path):
    # rank 32 on the tiny model makes a file larger than 1 MiB + 64 KiB, so the legacy hash reads real data
    network = trained_network(*models, spec=NetworkSpec(network_dim=32, network_alpha=16, conv_dim=8))
    path = tmp_path / "hashed.safetensors"
    extra = {"modelspec.title": "Custom title", "my_note": "not an ss key"}
    metadata = save_network(path, network.kohya_state_dict(), {**RUN_METADATA, **extra}, save_dtype="fp16")
    data = path.read_bytes()
    assert len(data) > 0x110000
    (header_size,) = struct.unpack("<Q", data[:8])
    # model hash: sha256 of everything after the header of the file itself
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_size:]).hexdigest()
    # legacy hash: the same tensors serialised with only the ss_* metadata, 64 KiB at 1 MiB
    tensors = load_file(str(path))
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialized = save(tensors, metadata=ss_only)
    (ss_header,) = struct.unpack("<Q", serialized[:8])
    assert serialized[8 + ss_header:] == data[8 + header_size:]
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["modelspec.title"] == "Custom title" and metadata["my_note"] == "not an ss key"


def test_dataset_metadata_can_be_left_out(models, tmp_path):
    network = trained_network(*models)
    path = tmp_path / "private.safetensors"
    save_network(path, network.kohya_state_dict(), RUN_METADATA, include_dataset_metadata=False)
    _, header = header_of(path)
    kept = header["__metadata__"]
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_bucket_info"):
        assert key not in kept
    assert kept["ss_output_name"] == "hand_v1" and kept["ss_steps"] == "1000"


# --- foreign files -----------------------------------------------------------------------------------
def to_ldm_name(name: str) -> str:
    """The few LDM-style names used below, written out by hand."""
    table = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_resnets_1_conv1": "lora_unet_input_blocks_2_0_in_layers_2",
        "lora_unet_up_blocks_1_attentions_2_proj_out": "lora_unet_output_blocks_5_1_proj_out",
    }
    return table[name]


def test_lycoris_ldm_names_without_alpha_and_tucker(models, tmp_path):
    unet, te = models
    g = torch.Generator().manual_seed(5)
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    conv = unet.down_blocks[0].resnets[1].conv1
    proj = unet.up_blocks[1].attentions[2].proj_out
    r = 3
    file = {
        # LDM-style name, no alpha (alpha = rank)
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(r, q.in_features, generator=g),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(q.out_features, r, generator=g),
        # LyCORIS Tucker conv: 1x1 down, k x k mid, 1x1 up
        "lora_unet_input_blocks_2_0_in_layers_2.lora_down.weight": torch.randn(r, conv.in_channels, 1, 1, generator=g),
        "lora_unet_input_blocks_2_0_in_layers_2.lora_mid.weight": torch.randn(r, r, 3, 3, generator=g),
        "lora_unet_input_blocks_2_0_in_layers_2.lora_up.weight": torch.randn(conv.out_channels, r, 1, 1, generator=g),
        "lora_unet_input_blocks_2_0_in_layers_2.alpha": torch.tensor(1.5),
        # plain 1x1 conv in our naming
        "lora_unet_up_blocks_1_attentions_2_proj_out.lora_down.weight": torch.randn(r, proj.in_channels, 1, 1, generator=g),
        "lora_unet_up_blocks_1_attentions_2_proj_out.lora_up.weight": torch.randn(proj.out_channels, r, 1, 1, generator=g),
        "lora_unet_up_blocks_1_attentions_2_proj_out.alpha": torch.tensor(6.0),
    }
    path = tmp_path / "lycoris.safetensors"
    save_file(file, str(path))
    tensors, _ = load_network_file(path)
    names = {k.split(".")[0] for k in normalize_names(tensors)}
    assert "lora_unet_down_blocks_0_resnets_1_conv1" in names

    x_lin = torch.randn(2, q.in_features)
    x_conv = torch.randn(1, conv.in_channels, 8, 8)
    with torch.no_grad():
        base_lin, base_conv = q(x_lin), conv(x_conv)
        # independent expectation of the three updates
        up, down = file["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight"], \
            file["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]
        want_lin = base_lin + 0.5 * (x_lin @ down.T @ up.T)  # alpha missing -> scale 1
        d = file["lora_unet_input_blocks_2_0_in_layers_2.lora_down.weight"]
        m = file["lora_unet_input_blocks_2_0_in_layers_2.lora_mid.weight"]
        u = file["lora_unet_input_blocks_2_0_in_layers_2.lora_up.weight"]
        h = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x_conv, d), m, padding=1)
        want_conv = base_conv + 0.5 * (1.5 / r) * torch.nn.functional.conv2d(h, u)

    network = network_from_weights(tensors, unet, te, multiplier=0.5)
    network.apply_to()
    with torch.no_grad():
        assert torch.allclose(q(x_lin), want_lin, atol=1e-4)
        assert torch.allclose(conv(x_conv), want_conv, atol=1e-4)
    network.restore()
    merge_weights(tensors, unet, te, multiplier=0.5)
    with torch.no_grad():
        assert torch.allclose(q(x_lin), want_lin, atol=1e-4)
        assert torch.allclose(conv(x_conv), want_conv, atol=1e-4)


def test_dora_scale_is_merged(models, tmp_path):
    unet, te = models
    layer = te.encoder.layers[0].mlp.fc1
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(2, layer.in_features, generator=g), torch.randn(layer.out_features, 2, generator=g)
    magnitude = torch.rand(1, layer.in_features, generator=g) + 0.5  # A1111/LyCORIS shape [1, in]
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0),
               f"{name}.dora_scale": magnitude}
    w0 = layer.weight.detach().clone()
    combined = w0 + 0.5 * up @ down
    directional = combined / combined.norm(dim=0, keepdim=True)
    expected = w0 + 0.8 * (magnitude * directional - w0)
    # patched (the <lora:name:m> prompt tags, sweeps): the same layer output as the merged weight
    network = network_from_weights(tensors, None, te, multiplier=0.8)
    network.apply_to()
    x = torch.randn(3, layer.in_features, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected, layer.bias), atol=1e-5, rtol=1e-5)
    network.restore()
    merge_weights(tensors, None, te, multiplier=0.8)
    assert torch.allclose(layer.weight, expected, atol=1e-5)


def test_several_files_with_multipliers(models, tmp_path):
    unet, te = models
    a, b = trained_network(unet, te, seed=3), trained_network(unet, te, seed=4)
    save_network(tmp_path / "a.safetensors", a.kohya_state_dict(), {}, save_dtype="fp32")
    save_network(tmp_path / "b.safetensors", b.kohya_state_dict(), {}, save_dtype="fp32")
    a.set_multiplier(0.75)
    b.set_multiplier(0.5)
    a.apply_to()
    b.apply_to()
    tokens = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        want = te(tokens).last_hidden_state
    b.restore()
    a.restore()
    args = [f"{tmp_path / 'a.safetensors'}:0.75", f"{tmp_path / 'b.safetensors'}:0.5"]
    loaded = load_sampling_networks(args)
    attach_networks(loaded, ["patch", "patch"], unet, te)
    with torch.no_grad():
        assert torch.allclose(te(tokens).last_hidden_state, want, atol=1e-5)
    detach_networks(loaded)
    attach_networks(loaded, ["merge", "merge"], unet, te)
    assert all(n.patched is None for n in loaded)
    with torch.no_grad():
        assert torch.allclose(te(tokens).last_hidden_state, want, atol=1e-4)


def test_parse_network_arg():
    arg = parse_network_arg("a.safetensors:0.75")
    assert (arg.path, arg.multiplier) == (Path("a.safetensors"), 0.75)
    assert parse_network_arg("dir/a.safetensors").multiplier == 1.0
    assert parse_network_arg(r"C:\loras\a.safetensors").path == Path(r"C:\loras\a.safetensors")
    assert parse_network_arg(r"C:\loras\a.safetensors:-0.5").multiplier == -0.5


# --- bad input --------------------------------------------------------------------------------------
def test_unknown_keys_are_named(models, tmp_path):
    network = trained_network(*models)
    tensors = {**network.kohya_state_dict(), "emb_params": torch.zeros(2, 64)}
    path = tmp_path / "with_embedding.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(NetworkFileError, match=r"with_embedding.safetensors: 1 key\(s\) are not LoRA tensors: emb_params"):
        load_network_file(path)


def test_truncated_file_is_a_clear_error(models, tmp_path):
    network = trained_network(*models)
    path = tmp_path / "cut.safetensors"
    save_network(path, network.kohya_state_dict(), {}, save_dtype="fp16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NetworkFileError, match=r"cut.safetensors: not a readable .safetensors file.*truncated"):
        load_network_file(path)
    path.write_bytes(data[:5])
    with pytest.raises(NetworkFileError, match="truncated"):
        load_network_file(path)
    with pytest.raises(NetworkFileError, match="no such file"):
        load_network_file(tmp_path / "missing.safetensors")


def test_other_algorithms_are_not_supported_yet(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    glora = {f"{name}.a1.weight": torch.zeros(4, 2), f"{name}.a2.weight": torch.zeros(2, 4),
             f"{name}.b1.weight": torch.zeros(4, 2), f"{name}.b2.weight": torch.zeros(2, 4), f"{name}.alpha": torch.tensor(1.0)}
    save_file(glora, str(tmp_path / "glora.safetensors"))
    with pytest.raises(NetworkFileError, match=r"GLoRA, which is not supported yet \(keys such as .*a1.weight"):
        load_network_file(tmp_path / "glora.safetensors")
    oft = {f"{name}.oft_blocks": torch.zeros(4, 4, 4), f"{name}.alpha": torch.tensor(1.0)}
    save_file(oft, str(tmp_path / "oft.safetensors"))
    with pytest.raises(NetworkFileError, match="OFT"):
        load_network_file(tmp_path / "oft.safetensors")
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 4),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 1)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(NetworkFileError, match="SDXL"):
        load_network_file(tmp_path / "sdxl.safetensors")


def test_file_for_another_model_is_a_clear_error(models, tmp_path):
    unet, te = models
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(NetworkFileError, match=r"does not fit the model layer.*SD2.x / SDXL"):
        merge_weights(tensors, unet, te)
    tensors = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(NetworkFileError, match="match no layer"):
        network_from_weights(tensors, unet, te)


# --- check_lora -------------------------------------------------------------------------------------
def test_check_lora_reports_parts_metadata_and_fit(tmp_path, capsys):
    from library.models.architecture import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, build_text_encoder as bte, build_unet as bu

    unet, te = bu(SD15_UNET_CONFIG, empty=True), bte(SD15_TEXT_CONFIG, empty=True)
    spec = NetworkSpec.from_args(32, 1, {"conv_dim": 8, "conv_alpha": 4})
    network = create_network(spec, unet, te)
    tensors = {k: torch.zeros(v.shape) if v.dim() else torch.tensor(float(v)) for k, v in network.kohya_state_dict().items()
               if "up_blocks_3" in k or "encoder_layers_0_" in k or "mid_block" in k}
    path = tmp_path / "third_party.safetensors"
    save_network(path, tensors, {**spec.to_metadata(), **RUN_METADATA}, save_dtype="fp16")
    report = inspect_file(path)
    text = format_report(report)
    assert "text encoder" in text and "U-Net attention" in text and "U-Net conv (LoCon)" in text
    assert "map onto SD1.5 layers with matching shapes" in text
    assert "sshs_model_hash" in text and "matches the file" in text
    assert "hand (20)" in text  # tag frequencies summarised
    parts = {m.part for m in report.modules}
    assert parts == {"te", "unet_attention", "unet_conv"}
    counts = {p: sum(m.part == p for m in report.modules) for p in parts}
    assert counts["te"] == 6 and counts["unet_attention"] == 12 * 4
    assert check_lora_main([str(path)]) == 0
    assert "U-Net attention" in capsys.readouterr().out
    assert check_lora_main([str(tmp_path / "nope.safetensors")]) == 1


@pytest.mark.slow
def test_check_lora_runs_as_a_script():
    result = subprocess.run([sys.executable, "networks/check_lora.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "LoRA" in result.stdout
