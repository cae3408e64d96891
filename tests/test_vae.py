"""`vae = …`: a separate VAE replaces the checkpoint's own in training (cached latents, metadata) and in
sample.py (decoded images, the PNG's VAE fields), from a single LDM file, a whole checkpoint or a diffusers
folder; a wrong file is refused before the checkpoint loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.config import load_job
from library.errors import ModelLoadError
from library.models import ldm_keys
from library.models.architecture import VAE_PREFIX
from library.models.loading import load_sd1, load_vae, use_vae
from tests.support import parse_parameters, run_job, write_job, write_job_file


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """The VAE of another tiny model (seed 1) in the three forms users have: (LDM file, diffusers folder,
    its whole checkpoint), and its weights."""
    from library.models.tiny import write_tiny_model

    folder = tmp_path_factory.mktemp("vae")
    single, diffusers_folder = write_tiny_model(folder / "model1", seed=1)
    model = load_sd1(single)
    ldm = {k[len(VAE_PREFIX):]: v.contiguous() for k, v in
           ldm_keys.vae_to_ldm(model.vae.state_dict(), model.vae.config).items()}
    ldm["model_ema.decay"] = torch.tensor(0.999)  # the extras a released VAE file can carry are passed over
    save_file(ldm, str(folder / "vae.safetensors"))
    return folder / "vae.safetensors", diffusers_folder, single, model.vae.state_dict()


def test_every_form_loads_the_same_weights(other_vae, tiny_single_file):
    ldm_file, diffusers_folder, checkpoint, expected = other_vae
    for source in (ldm_file, diffusers_folder, diffusers_folder / "vae", checkpoint):
        vae = load_vae(source)
        state = vae.state_dict()
        assert set(state) == set(expected), source
        assert all(torch.equal(state[k], expected[k]) for k in expected), source  # bit-exact: same tensors
    model = load_sd1(tiny_single_file)
    own = model.vae.state_dict()["encoder.conv_in.weight"].clone()
    use_vae(model, load_vae(ldm_file), ldm_file)
    assert torch.equal(model.vae.state_dict()["encoder.conv_in.weight"], expected["encoder.conv_in.weight"])
    assert not torch.equal(own, expected["encoder.conv_in.weight"])


def test_bad_vae_files_are_refused_with_the_key(tmp_path, other_vae, tiny_single_file):
    with pytest.raises(ModelLoadError, match=r'vae = ".*missing.safetensors": no such file or folder.*remove vae'):
        load_vae(tmp_path / "missing.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match=r"not a VAE: it has no encoder/decoder weights"):
        load_vae(tmp_path / "lora.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"the folder has no config.json"):
        load_vae(tmp_path / "empty")
    diffusers_names = load_vae(other_vae[0]).state_dict()
    save_file({k: v.contiguous() for k, v in diffusers_names.items()}, str(tmp_path / "diffusers_vae.safetensors"))
    with pytest.raises(ModelLoadError, match=r"diffusers VAE names .* give the folder"):
        load_vae(tmp_path / "diffusers_vae.safetensors")
    # latents of another shape than the U-Net's: 8 channels instead of 4
    ldm = {k: v for k, v in safe_open_all(other_vae[0]).items() if k != "model_ema.decay"}
    ldm["encoder.conv_out.weight"] = torch.cat([ldm["encoder.conv_out.weight"]] * 2)
    ldm["encoder.conv_out.bias"] = torch.cat([ldm["encoder.conv_out.bias"]] * 2)
    ldm["quant_conv.weight"] = torch.zeros(16, 16, 1, 1)
    ldm["quant_conv.bias"] = torch.zeros(16)
    ldm["post_quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    ldm["post_quant_conv.bias"] = torch.zeros(8)
    ldm["decoder.conv_in.weight"] = torch.cat([ldm["decoder.conv_in.weight"]] * 2, dim=1)
    save_file(ldm, str(tmp_path / "eight.safetensors"))
    model = load_sd1(tiny_single_file)
    with pytest.raises(ModelLoadError, match=r"latents of 8 channels at 1/\d+ .* U-Net works on 4 channels"):
        use_vae(model, load_vae(tmp_path / "eight.safetensors"), tmp_path / "eight.safetensors")


def safe_open_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.mark.slow
def test_training_caches_latents_with_the_separate_vae_and_records_it(tmp_path, tiny_single_file, shapes_dir,
                                                                      other_vae, monkeypatch):
    from library.dataset import TrainDataset

    ldm_file = other_vae[0]
    cached = []
    original = TrainDataset.cache_latents

    def spy(self, vae, *args, **kwargs):
        cached.append(vae.state_dict()["encoder.conv_in.weight"].clone())
        return original(self, vae, *args, **kwargs)

    monkeypatch.setattr(TrainDataset, "cache_latents", spy)
    result = run_job(write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=2, vae=str(ldm_file)))
    assert torch.equal(cached[0], other_vae[3]["encoder.conv_in.weight"])
    with safe_open(str(result.final_files[0]), "pt") as handle:
        meta = handle.metadata()
    data = ldm_file.read_bytes()
    assert meta["ss_vae_name"] == "vae.safetensors"
    assert meta["ss_new_vae_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_vae_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # a wrong path stops the run before the checkpoint is read, naming the key
    with pytest.raises(ModelLoadError, match=r'vae = ".*nothere.safetensors": no such file'):
        run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, vae=str(tmp_path / "nothere.safetensors")))


@pytest.mark.slow
def test_sample_job_decodes_with_the_separate_vae_and_writes_its_hash(tmp_path, tiny_single_file, other_vae):
    from PIL import Image

    from library.sampling.run import run_sample_job

    keys = {"pretrained_model_name_or_path": str(tiny_single_file), "prompts": ["a red circle"], "seeds": [5],
            "steps": 3, "width": 64, "height": 64, "grid": False}
    images = {}
    for name, vae in (("own", None), ("other", str(other_vae[0]))):
        job_path = write_job_file(tmp_path / name, {**keys, "output_dir": str(tmp_path / name / "out"), "vae": vae})
        result = run_sample_job(load_job("sample", ["--config", str(job_path)]), progress=False)
        images[name] = result.images[0]
    assert images["own"].image.tobytes() != images["other"].image.tobytes()  # the same latents, another decoder
    with Image.open(images["other"].path) as png:
        _, _, fields = parse_parameters(png.info["parameters"])
    assert fields["VAE"] == "vae.safetensors"
    assert fields["VAE hash"] == hashlib.sha256(other_vae[0].read_bytes()).hexdigest()[:10]
    with Image.open(images["own"].path) as png:
        assert "VAE" not in parse_parameters(png.info["parameters"])[2]
