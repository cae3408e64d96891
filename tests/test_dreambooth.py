"""DreamBooth: the prior-preservation weight exactly, class images made once and never over the user's, a
LoRA that learns the subject without wrecking the class, and a full fine-tune whose checkpoint reloads exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from library.config import load_job
from library.errors import ConfigError, DatasetError
from library.models.loading import load_sd1
from library.toy_data import write_shape_folder
from library.training import dreambooth
from library.training.class_images import generate_class_images, plan_class_images

import train_dreambooth
from support import fixed_noise_loss, write_job_file

REPO = Path(__file__).resolve().parent.parent


def instance_folder(folder: Path, count: int = 4) -> Path:
    """Red circles without caption files: their caption is the subset's class_tokens ("sks circle")."""
    write_shape_folder(folder, count=count, size=(64, 64), seed=5, shapes=("circle",), colours=("red",),
                       backgrounds=("white",))
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return instance_folder(tmp_path_factory.mktemp("data") / "sks")


def write_job(tmp_path: Path, model: Path, instance: Path, class_dir: Path, **keys) -> Path:
    base = {
        "pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"), "output_name": "db",
        "network_dim": 4, "network_alpha": 4.0, "learning_rate": 2e-3, "max_train_steps": 4, "seed": 7,
        "train_batch_size": 1, "cache_latents": True, "save_precision": "float", "class_prompt": "a circle",
        "class_image_steps": 1, "class_image_cfg_scale": 1.0,  # the cheapest images: tests need files, not art
    }
    return write_job_file(tmp_path, {**base, **keys}, [
        {"image_dir": str(instance), "class_tokens": "sks circle"}, {"image_dir": str(class_dir), "is_reg": True}])


def run(path: Path, *args: str):
    return train_dreambooth.main(["--config", str(path), *args])


# ------------------------------------------------------------------------------------------ the loss


def test_class_loss_is_weighted_by_prior_loss_weight_exactly(tmp_path, tiny_single_file, subject, monkeypatch):
    """Per-sample losses 1 (instance) and 3 (class), λ = 0.5: each step's loss is (Σ inst + λ Σ class) / B."""
    from library.dataset import TrainDataset
    from library.training import noise as nz

    classes = tmp_path / "class"
    write_shape_folder(classes, count=4, size=(64, 64), seed=9, shapes=("square",), colours=("blue",))
    seen: list[dict] = []
    real_batches = TrainDataset.batches

    def recording_batches(self, *args, **kwargs):
        for batch in real_batches(self, *args, **kwargs):
            seen.append(batch)
            yield batch

    def known_losses(pred, target, *args):  # 1 per instance sample, 3 per class sample, still differentiable
        values = torch.where(seen[-1]["is_reg"], 3.0, 1.0).to(pred.device)
        return values + 0.0 * pred.float().mean(dim=(1, 2, 3))

    monkeypatch.setattr(TrainDataset, "batches", recording_batches)
    monkeypatch.setattr(nz, "per_sample_loss", known_losses)
    result = run(write_job(tmp_path, tiny_single_file, subject, classes, train_batch_size=2, max_train_steps=4,
                           prior_loss_weight=0.5))
    lam = 0.5
    assert len(seen) == len(result.losses) == 4  # one epoch: 4 instance + 4 class samples, batches of 2
    for batch, loss in zip(seen, result.losses):
        n_class = int(batch["is_reg"].sum())
        assert loss == ((2 - n_class) * 1.0 + lam * n_class * 3.0) / 2
        assert batch["loss_weights"].tolist() == [lam if r else 1.0 for r in batch["is_reg"].tolist()]
    flags = [r for b in seen for r in b["is_reg"].tolist()]
    assert flags.count(True) == flags.count(False) == 4  # balanced: as many class as instance samples
    assert any(0 < int(b["is_reg"].sum()) < 2 for b in seen)  # instance and class samples share batches
    assert sum(result.losses) / 4 == (1.0 + lam * 3.0) / 2  # epoch mean = ½ (L_instance + λ L_class)


# ------------------------------------------------------------------------------------------ class images


@pytest.fixture(scope="module")
def tiny_sampler(tiny_single_file):
    from library.sampling import Sampler

    model = load_sd1(tiny_single_file)
    return Sampler(model.unet, model.vae, model.text_encoder, model.tokenizer, progress=False)


def make(plans, sampler):
    return generate_class_images(plans, sampler, "", steps=1, cfg_scale=1.0, sampler_name="ddim", batch_size=2)


def test_class_images_fill_the_folder_once_and_are_reused(tmp_path, tiny_sampler):
    folder = tmp_path / "class"
    plan = plan_class_images(folder, "a circle", wanted=3, seed=10, size=(64, 64))
    assert plan.existing == 0 and [(p.name, s) for p, s in plan.missing] == [
        ("class_00000.png", 10), ("class_00001.png", 11), ("class_00002.png", 12)]
    written = make([plan], tiny_sampler)
    assert sorted(p.name for p in folder.iterdir()) == [
        "class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt", "class_00002.png", "class_00002.txt"]
    assert written == [p for p, _ in plan.missing]
    assert (folder / "class_00001.txt").read_text() == "a circle"
    from PIL import Image

    assert "Seed: 11" in Image.open(folder / "class_00001.png").info["parameters"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = plan_class_images(folder, "a circle", wanted=3, seed=10, size=(64, 64))
    assert again.existing == 3 and again.missing == [] and make([again], tiny_sampler) == []
    more = plan_class_images(folder, "a circle", wanted=4, seed=10, size=(64, 64))
    assert [(p.name, s) for p, s in more.missing] == [("class_00003.png", 13)]
    make([more], tiny_sampler)
    assert all((folder / n).stat().st_mtime_ns == t for n, t in before.items())  # reused, not rewritten
    # filled in two runs (3, then 1 more: batches [0, 1], [2, 3] and [2, 3] again), the folder holds byte for
    # byte what one run of 4 writes: seeds and batches belong to file numbers, not to what is missing
    fresh = tmp_path / "fresh"
    make([plan_class_images(fresh, "a circle", wanted=4, seed=10, size=(64, 64))], tiny_sampler)
    for name in ("class_00000.png", "class_00001.png", "class_00002.png", "class_00003.png"):
        assert (fresh / name).read_bytes() == (folder / name).read_bytes(), name


def test_an_image_is_always_made_in_the_batch_of_its_block():
    """Image NNNNN: place NNNNN % batch_size among the seeds of its block, whichever images are missing."""
    from library.training.class_images import batch_layout

    missing = [(Path(f"class_{i:05d}.png"), 100 + i) for i in (1, 3, 4, 9)]
    assert [(seeds, {k: p.name for k, p in paths.items()}) for seeds, paths in batch_layout(missing, 4)] == [
        ([100, 101, 102, 103], {1: "class_00001.png", 3: "class_00003.png"}),
        ([104, 105, 106, 107], {0: "class_00004.png"}),
        ([108, 109, 110, 111], {1: "class_00009.png"})]
    assert [seeds for seeds, _ in batch_layout(missing, 1)] == [[101], [103], [104], [109]]


def test_read_only_user_class_images_are_left_intact(tmp_path, tiny_sampler, monkeypatch):
    folder = tmp_path / "class"
    write_shape_folder(folder, count=2, size=(64, 64), seed=1, shapes=("square",))
    os.replace(folder / "0001.png", folder / "class_00000.png")  # a user file named like ours
    user = sorted(folder.iterdir())
    for p in user:
        p.chmod(0o444)
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) for p in user}
    plan = plan_class_images(folder, "a square", wanted=4, seed=0, size=(64, 64))
    assert plan.existing == 2 and [p.name for p, _ in plan.missing] == ["class_00001.png", "class_00002.png"]
    make([plan], tiny_sampler)
    for p in user:
        assert (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) == snapshot[p.name]
    assert len([p for p in folder.iterdir() if p.suffix == ".png"]) == 4
    # the images beside the user's are the files an empty folder gets (class_00000 was not made here)
    make([plan_class_images(tmp_path / "fresh", "a square", wanted=3, seed=0, size=(64, 64))], tiny_sampler)
    for name in ("class_00001.png", "class_00002.png"):
        assert (tmp_path / "fresh" / name).read_bytes() == (folder / name).read_bytes(), name
    # enough images already: nothing is written at all
    assert plan_class_images(folder, "a square", wanted=2, seed=0).missing == []
    # a folder we may not write to is reported before any work, with the fix
    from library.training.class_images import check_writable

    monkeypatch.setattr(os, "access", lambda *a: False)
    with pytest.raises(DatasetError, match=r"holds 4 image\(s\) and num_class_images asks for 9.*not writable"):
        check_writable(plan_class_images(folder, "a square", wanted=9, seed=0), "job.toml")


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_lora_dreambooth_learns_subject_and_keeps_class(tmp_path, tiny_single_file, subject):
    classes = tmp_path / "class_circle"  # does not exist yet: filled with generated images
    job = write_job(tmp_path, tiny_single_file, subject, classes, max_train_steps=24, num_class_images=4,
                    train_batch_size=2, learning_rate=1e-2, network_dim=4, network_alpha=6.0,
                    network_args=["preset=attention_qkvo", "text_encoder_dim=2", "text_encoder_alpha=3"])
    result = run(job)
    assert len(list(classes.glob("class_*.png"))) == 4 and len(list(classes.glob("class_*.txt"))) == 4
    lora = result.final_files[0]
    assert lora == tmp_path / "out" / "db.safetensors"
    from networks import load_network_file

    tensors, meta = load_network_file(lora)
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in names)
    assert all(n.split("_")[-1] in ("q", "k", "v", "0", "proj") for n in names)  # q/k/v/out only
    te_down = next(v for k, v in tensors.items() if k.startswith("lora_te_") and "lora_down" in k)
    unet_alpha = next(v for k, v in tensors.items() if k.startswith("lora_unet_") and k.endswith(".alpha"))
    te_alpha = next(v for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith(".alpha"))
    assert te_down.shape[0] == 2 and float(te_alpha) == 3.0 and float(unet_alpha) == 6.0
    assert meta["ss_dreambooth_mode"] == "lora" and meta["ss_prior_loss_weight"] == "1.0"
    assert meta["ss_num_reg_images"] == "4"

    base = load_sd1(tiny_single_file)
    inst_before, inst_after = (fixed_noise_loss(base, subject, "sks circle", network_file=f) for f in (None, lora))
    cls_before, cls_after = (fixed_noise_loss(base, classes, "a circle", network_file=f) for f in (None, lora))
    assert inst_after < 0.85 * inst_before, (inst_before, inst_after)
    assert cls_after < 1.25 * cls_before, (cls_before, cls_after)  # the class prior does not blow up


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_full_finetune_checkpoint_reloads_bit_exactly(tmp_path, tiny_single_file, subject):
    classes = tmp_path / "class"
    write_shape_folder(classes, count=4, size=(64, 64), seed=9, shapes=("square",), colours=("blue",))
    job = clean(write_job(tmp_path, tiny_single_file, subject, classes, dreambooth_mode="full", learning_rate=1e-4,
                          max_train_steps=4, stop_text_encoder_training=2, save_every_n_steps=2,
                          save_diffusers_folder=True, mixed_precision="bf16", gradient_checkpointing=True,
                          network_dim=None, network_alpha=None))
    result = run(job)
    final, folder = result.final_files
    assert final == tmp_path / "out" / "db.safetensors" and folder == tmp_path / "out" / "db"
    trained = result.model
    base = load_sd1(tiny_single_file)
    for loaded in (load_sd1(final), load_sd1(folder)):
        for part in ("unet", "text_encoder", "vae"):
            want, got = _weights(getattr(trained, part)), _weights(getattr(loaded, part))
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k].float(), got[k]) for k in want), part
    step2 = load_sd1(tmp_path / "out" / "db-step00000002.safetensors")
    te_final, te_step2, te_base = (_weights(m.text_encoder) for m in (trained, step2, base))
    assert all(torch.equal(te_final[k].float(), te_step2[k]) for k in te_final)  # frozen after step 2
    assert any(not torch.equal(te_step2[k], te_base[k]) for k in te_base)  # but trained until then
    unet_final, unet_step2 = _weights(trained.unet), _weights(step2.unet)
    assert any(not torch.equal(unet_final[k], unet_step2[k]) for k in unet_final)  # the U-Net went on
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in _weights(trained.vae).items())
    from safetensors import safe_open

    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["ss_dreambooth_mode"] == "full"


@pytest.mark.slow
def test_full_finetune_resume_past_text_encoder_stop_matches_uninterrupted(tmp_path, tiny_single_file, subject):
    classes = tmp_path / "class"
    write_shape_folder(classes, count=4, size=(64, 64), seed=9, shapes=("square",), colours=("blue",))
    keys = dict(dreambooth_mode="full", learning_rate=1e-4, stop_text_encoder_training=2)
    for k in ("network_dim", "network_alpha"):
        keys[k] = None
    full = run(clean(write_job(tmp_path / "a", tiny_single_file, subject, classes, max_train_steps=5, **keys)))
    first = run(clean(write_job(tmp_path / "b", tiny_single_file, subject, classes, max_train_steps=3,
                                save_state_on_train_end=True, **keys)))
    assert first.losses == full.losses[:3]
    resumed = run(tmp_path / "b" / "job.toml", "--resume", str(first.state_dir), "--max_train_steps", "5")
    assert not resumed.method.needs_text_encoder_grad
    assert resumed.losses == full.losses[3:]
    a, b = load_sd1(full.final_files[0]), load_sd1(resumed.final_files[0])
    for part in ("unet", "text_encoder"):
        wa, wb = _weights(getattr(a, part)), _weights(getattr(b, part))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part


def clean(job: Path) -> Path:
    """Drop keys written as null (TOML has no null)."""
    job.write_text("\n".join(l for l in job.read_text().splitlines() if not l.endswith("= null")) + "\n")
    return job


# ------------------------------------------------------------------------------------------ the job


def test_job_errors_name_the_key_and_fix(tmp_path, tiny_single_file, subject):
    classes = tmp_path / "class"
    job = write_job(tmp_path, tiny_single_file, subject, classes, dreambooth_mode="full")
    with pytest.raises(ConfigError, match=r"network_alpha, network_dim set LoRA options.*dreambooth_mode"):
        load_job("train_dreambooth", config_path=str(job))
    lone = tmp_path / "lone.toml"
    lone.write_text(f'pretrained_model_name_or_path = "{tiny_single_file}"\nnum_class_images = 10\n'
                    f'train_data_dir = "{tmp_path / "train"}"\n')
    (tmp_path / "train" / "5_sks").mkdir(parents=True)
    instance_folder(tmp_path / "train" / "5_sks", count=1)
    with pytest.raises(ConfigError, match=r"no subset has is_reg = true.*is_reg = true"):
        load_job("train_dreambooth", config_path=str(lone))
    bad = write_job(tmp_path / "s", tiny_single_file, subject, classes, num_class_images=2, class_image_sampler="dmp")
    with pytest.raises(ConfigError, match=r"class_image_sampler: unknown sampler 'dmp'"):
        load_job("train_dreambooth", config_path=str(bad))


def test_folder_mode_class_folder_is_created_and_captions_default_to_class_prompt(tmp_path, tiny_single_file):
    (tmp_path / "train" / "5_sks").mkdir(parents=True)
    instance_folder(tmp_path / "train" / "5_sks", count=1)
    reg = tmp_path / "reg"
    argv = ["--pretrained_model_name_or_path", str(tiny_single_file), "--train_data_dir", str(tmp_path / "train"),
            "--reg_data_dir", str(reg), "--num_class_images", "3", "--class_prompt", "a photo of hand"]
    job = load_job("train_dreambooth", argv)  # the loader makes the folder the class images will go to
    assert [p.name for p in reg.iterdir()] == ["1_a photo of hand"]
    (reg_subset,) = [s for s in job.datasets[0].subsets if s.is_reg]
    assert reg_subset.image_dir == reg / "1_a photo of hand" and reg_subset.class_tokens == "a photo of hand"


@pytest.mark.parametrize("name", ["palms_lora", "handshakes_lora", "palms_full"])
def test_presets_load(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the presets' relative folders need not exist until training
    job = load_job("train_dreambooth", config_path=str(REPO / "dataset_configs" / f"dreambooth_{name}.toml"))
    instance, reg = job.datasets[0].subsets
    assert (instance.class_tokens, reg.class_tokens, reg.is_reg) == ("a photo of sks hand", "a photo of hand", True)
    assert job.num_class_images == 200 and job.max_train_steps == 800 and job.train_batch_size == 1
    method = dreambooth.make_method(job)
    if name.endswith("lora"):
        spec = method.spec
        assert (spec.network_dim, spec.network_alpha, spec.te_dim, spec.te_alpha, spec.preset) == (
            16, 27.0, 16, 17.0, "attention_qkvo")
    else:
        assert isinstance(method, dreambooth.DreamBoothFull) and job.stop_text_encoder_training == 400
