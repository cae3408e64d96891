"""Files that are not what a command needs are named for what they are, before any work, without a traceback:
inpainting checkpoints for training and sampling, full checkpoints and SDXL LoRAs for check_lora."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ModelLoadError, NetworkFileError
from library.models.loading import load_sd1
from library.toy_data import write_shape_folder
from networks import load_network_file
from networks.check_lora import main as check_lora_main

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
INPAINTING = r"this is an inpainting checkpoint \(conv_in takes 9 channels"


@pytest.fixture(scope="module")
def inpainting_file(tiny_single_file, tmp_path_factory):
    """The tiny model with sd-v1-5-inpainting's U-Net input: latents + mask + masked-image latents."""
    state = load_file(str(tiny_single_file))
    conv_in = state[CONV_IN]
    state[CONV_IN] = torch.cat([conv_in, torch.zeros(conv_in.shape[0], 5, *conv_in.shape[2:])], dim=1)
    path = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting.safetensors"
    save_file(state, str(path))
    return path


def test_inpainting_single_file_is_refused_naming_the_base_model(inpainting_file):
    with pytest.raises(ModelLoadError) as err:
        load_sd1(inpainting_file)
    message = str(err.value)
    assert message.startswith(f"{inpainting_file}: this is an inpainting checkpoint (conv_in takes 9 channels")
    assert "matching non-inpainting base model" in message and "A1111 and ComfyUI" in message


def test_inpainting_diffusers_folder_is_refused(tiny_model_paths, tmp_path):
    folder = tmp_path / "inpainting"
    shutil.copytree(tiny_model_paths[1], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 9
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"inpainting: {INPAINTING}"):
        load_sd1(folder)


def _cli_error(main, argv, capsys) -> str:
    from library.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err


def test_train_network_refuses_an_inpainting_checkpoint(inpainting_file, tmp_path, capsys):
    import train_network

    images = tmp_path / "images"
    write_shape_folder(images, count=2, size=(64, 64), seed=1, shapes=("circle",), colours=("red",))
    job = tmp_path / "job.toml"
    job.write_text("\n".join([
        f"pretrained_model_name_or_path = {json.dumps(str(inpainting_file))}",
        f"output_dir = {json.dumps(str(tmp_path / 'out'))}", 'output_name = "lora"', "max_train_steps = 1",
        "[general]", "resolution = 64", "min_bucket_reso = 64", "max_bucket_reso = 64",
        "[[datasets]]", "[[datasets.subsets]]", f"image_dir = {json.dumps(str(images))}"]) + "\n")
    err = _cli_error(train_network.main, ["--config", str(job)], capsys)
    assert f"error: {inpainting_file}: " in err and "inpainting checkpoint (conv_in takes 9 channels" in err
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_sample_refuses_an_inpainting_checkpoint(inpainting_file, tmp_path, capsys):
    import sample

    err = _cli_error(sample.main, ["--pretrained_model_name_or_path", str(inpainting_file), "--prompt", "a hand",
                                   "--output_dir", str(tmp_path / "images")], capsys)
    assert f"error: {inpainting_file}: " in err and "inpainting checkpoint (conv_in takes 9 channels" in err
    assert "non-inpainting base model" in err
    assert not list(tmp_path.glob("images/*.png"))


# --- check_lora and network files: things that are no SD1.x LoRA --------------------------------------
def test_check_lora_calls_a_full_checkpoint_a_full_checkpoint(tiny_single_file, capsys):
    assert check_lora_main([str(tiny_single_file)]) == 1
    captured = capsys.readouterr()
    assert f"error: {tiny_single_file}: this is a full SD1.x model checkpoint (model.diffusion_model.* keys), not a LoRA" \
        in captured.err
    assert "pretrained_model_name_or_path" in captured.err and "LoRA/LoCon" not in captured.out
    with pytest.raises(NetworkFileError, match="full SD1.x model checkpoint"):
        load_network_file(tiny_single_file)


def _pair(module: str, down_in: int, rank: int = 4, up_out: int = 640) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_down.weight": torch.zeros(rank, down_in), f"{module}.lora_up.weight": torch.zeros(up_out, rank),
            f"{module}.alpha": torch.tensor(float(rank))}


SDXL_LORAS = {
    # sd-scripts' SDXL naming: two text encoders
    "te1_te2": ({**_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 768, up_out=3072),
                 **_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", 1280, up_out=5120)},
                "lora_te1_/lora_te2_ text-encoder keys"),
    # U-Net only, LDM names: SDXL's 2048-wide cross-attention context
    "unet_context": (_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048),
                     "cross-attention inputs are 2048 wide"),
    # U-Net only, self-attention only: SD1.x has one transformer block per attention layer
    "unet_depth": (_pair("lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q", 1280, up_out=1280),
                   "second or later transformer block"),
}


@pytest.mark.parametrize("kind", sorted(SDXL_LORAS))
def test_check_lora_names_an_sdxl_lora(tmp_path, capsys, kind):
    tensors, evidence = SDXL_LORAS[kind]
    path = tmp_path / f"sdxl_{kind}.safetensors"
    save_file(tensors, str(path))
    assert check_lora_main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: this is an SDXL LoRA (" in err and evidence in err
    assert "does not fit Stable Diffusion 1.x" in err
    with pytest.raises(NetworkFileError, match="SDXL LoRA"):
        load_network_file(path)


def test_sd2_lora_is_named(tmp_path, capsys):
    path = tmp_path / "sd2.safetensors"
    save_file(_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 1024), str(path))
    assert check_lora_main([str(path)]) == 1
    assert "this is an SD2.x LoRA (its cross-attention inputs are 1024 wide" in capsys.readouterr().err


def test_sd1_lora_with_ldm_names_is_still_a_lora(tmp_path, capsys):
    path = tmp_path / "sd1.safetensors"
    save_file(_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 768, up_out=640), str(path))
    assert check_lora_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "algorithm: LoRA/LoCon" in out and "map onto SD1.5 layers with matching shapes" in out
