"""Model I/O: LDM single files and diffusers folders load, save and round-trip exactly; bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ModelLoadError
from library.models import architecture as arch
from library.models import ldm_keys
from library.models.loading import ldm_state_dict, load_sd1, save_sd1_diffusers, save_sd1_single_file
from library.models.tokenizer import load_tokenizer


def _sd15_meta_modules():
    return (arch.build_unet(arch.SD15_UNET_CONFIG, empty=True), arch.build_vae(arch.SD15_VAE_CONFIG, empty=True),
            arch.build_text_encoder(arch.SD15_TEXT_CONFIG, empty=True))


def test_tokenizer_known_ids():
    tok = load_tokenizer()
    assert tok("a photo of a hand").input_ids == [49406, 320, 1125, 539, 320, 2463, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407


def test_single_file_round_trip_is_bit_exact(tiny_single_file, tmp_path):
    original = load_file(str(tiny_single_file))
    model = load_sd1(tiny_single_file)
    out = tmp_path / "again.safetensors"
    save_sd1_single_file(out, model)
    again = load_file(str(out))
    assert set(again) == set(original)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key


def test_diffusers_folder_round_trip(tiny_model_paths, tmp_path):
    single, folder = tiny_model_paths
    from_folder = load_sd1(folder)
    ldm = tmp_path / "from_folder.safetensors"
    save_sd1_single_file(ldm, from_folder)
    save_sd1_diffusers(tmp_path / "again", load_sd1(ldm))
    again = load_sd1(tmp_path / "again")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_folder, part).state_dict(), getattr(again, part).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # the single file and the folder hold the same weights
    assert all(torch.equal(v, from_folder.unet.state_dict()[k]) for k, v in load_sd1(single).unet.state_dict().items())


def test_key_mapping_matches_diffusers_converter(tiny_single_file):
    """diffusers' own LDM converter is the independent oracle for our key table."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = load_file(str(tiny_single_file))
    unet_cfg, vae_cfg = dict(arch.TINY_UNET_CONFIG), dict(arch.TINY_VAE_CONFIG)
    ours, theirs = ldm_keys.unet_from_ldm(state, unet_cfg), convert_ldm_unet_checkpoint(dict(state), unet_cfg)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours, theirs = ldm_keys.vae_from_ldm(state, vae_cfg), convert_ldm_vae_checkpoint(dict(state), vae_cfg)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)


def test_sd15_layout_keys_and_parameter_counts_on_meta():
    unet, vae, text = _sd15_meta_modules()
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    state = ldm_state_dict(unet, vae, text)
    assert sum(k.startswith(arch.UNET_PREFIX) for k in state) == 686
    assert sum(k.startswith(arch.VAE_PREFIX) for k in state) == 248
    assert sum(k.startswith(arch.TEXT_PREFIX) for k in state) == 196
    # spot checks written by hand from the SD1.5 file layout
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.bias"):
        assert key in state, key
    assert tuple(state["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    configs = arch.infer_configs(shapes, "sd15")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim"):
        assert list(configs.unet[key]) == list(arch.SD15_UNET_CONFIG[key]) if isinstance(configs.unet[key], list) \
            else configs.unet[key] == arch.SD15_UNET_CONFIG[key]
    assert configs.vae["block_out_channels"] == arch.SD15_VAE_CONFIG["block_out_channels"]
    assert configs.text == arch.SD15_TEXT_CONFIG


def test_loads_fp16_files_with_ema_and_scheduler_buffers(tiny_single_file, tmp_path):
    state = load_file(str(tiny_single_file))
    half = {k: v.half() for k, v in state.items()}
    half["model_ema.decay"] = torch.tensor(0.9999)
    half["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    half["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model = load_sd1(path, dtype=torch.float32)
    assert model.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(model.unet.conv_in.weight, state["model.diffusion_model.input_blocks.0.0.weight"].half().float())
    assert "alphas_cumprod" in model.extra["ignored_keys"]


def test_ckpt_loads_with_weights_only(tiny_single_file, tmp_path):
    state = load_file(str(tiny_single_file))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    model = load_sd1(path)
    assert torch.equal(model.vae.quant_conv.weight, state["first_stage_model.quant_conv.weight"])


def test_missing_path_and_non_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope\.safetensors: no such file"):
        load_sd1(tmp_path / "nope.safetensors")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"photos: this folder is not a diffusers model.*unet/config.json"):
        load_sd1(tmp_path / "photos")


def test_truncated_safetensors(tiny_single_file, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(Path(tiny_single_file).read_bytes()[:100_000])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors: not a readable safetensors file.*truncated"):
        load_sd1(path)


@pytest.mark.parametrize("key,family", [
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "SDXL"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "SD2.x"),
])
def test_other_families_are_named(tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)},
              str(path))
    with pytest.raises(ModelLoadError, match=rf"this is {family}, not an SD1.x checkpoint; pentadactyl trains"):
        load_sd1(path)


def test_sdxl_diffusers_folder_is_named(tmp_path):
    for part in ("unet", "vae", "text_encoder"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    (tmp_path / "text_encoder_2").mkdir()
    with pytest.raises(ModelLoadError, match="this is SDXL"):
        load_sd1(tmp_path)


def test_tiny_model_forward_runs_with_loaded_modules(tiny_single_file):
    model = load_sd1(tiny_single_file)
    ids = model.tokenizer(["a photo of a hand"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = model.text_encoder(ids).last_hidden_state
        latents = model.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        noise = model.unet(latents, torch.tensor([10]), encoder_hidden_states=context).sample
    assert context.shape == (1, 77, 64) and latents.shape == (1, 4, 8, 8) and noise.shape == latents.shape
    assert model.vae_scale_factor == 8


def test_parts_load_in_their_own_dtype_as_if_cast_after_a_float32_load(tiny_single_file, tiny_model_paths, tmp_path):
    # an fp16 file, as released checkpoints are: its tensors are converted one at a time as they are read
    from library.models.loading import load_sd1, save_sd1_single_file

    fp16 = tmp_path / "fp16.safetensors"
    save_sd1_single_file(fp16, load_sd1(tiny_single_file), torch.float16)
    dtypes = {"unet": torch.bfloat16, "text_encoder": torch.bfloat16}
    for source in (fp16, tiny_model_paths[1]):  # a single file, and a diffusers folder
        reference = load_sd1(source, dtype=torch.float32)
        mixed = load_sd1(source, dtype=torch.float32, part_dtypes=dtypes)
        for part, dtype in (("unet", torch.bfloat16), ("text_encoder", torch.bfloat16), ("vae", torch.float32)):
            ours = getattr(mixed, part).state_dict()
            theirs = getattr(reference, part).state_dict()
            assert {v.dtype for v in ours.values() if v.is_floating_point()} == {dtype}, (source, part)
            # bit-exact by construction: fp16 → fp32 is exact, so converting once or twice rounds the same
            assert all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in theirs), (source, part)
