"""The training loop: it learns, resumes exactly, stops cleanly, and multi-process equals one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from library.errors import ConfigError
from library.models.loading import load_sd1
from library.training.loop import TrainingStopped

from support import fixed_noise_loss, run_job, write_job

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_lora_training_lowers_fixed_noise_loss_and_file_reproduces_model(tmp_path, tiny_single_file, shapes_dir):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=40,
                    network_args=["conv_dim=4", "conv_alpha=4"])
    result = run_job(job)
    lora = result.final_files[0]
    assert lora == tmp_path / "out" / "lora.safetensors" and lora.is_file()
    fresh = load_sd1(tiny_single_file)
    before = fixed_noise_loss(fresh, shapes_dir)
    after = fixed_noise_loss(fresh, shapes_dir, network_file=lora)
    assert after < 0.8 * before, (before, after)
    # the file loaded into a fresh model gives the trained model's output
    from library.sampling.networks import attach_networks, load_sampling_networks

    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ids = result.model.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    result.method.train_mode(False)
    with torch.no_grad():
        trained = result.model.unet(x, t, encoder_hidden_states=result.model.text_encoder(ids).last_hidden_state).sample
        attach_networks(load_sampling_networks([f"{lora}:1.0"]), ["patch"], fresh.unet, fresh.text_encoder)
        loaded = fresh.unet(x, t, encoder_hidden_states=fresh.text_encoder(ids).last_hidden_state).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    meta = __import__("networks").load_network_file(lora)[1]
    assert meta["ss_steps"] == "40" and meta["ss_network_dim"] == "4" and json.loads(meta["ss_dataset_dirs"])
    assert meta["ss_epoch"] == "10"  # 8 images, batch 2: 4 steps an epoch, the 10th epoch just finished
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_single_file, shapes_dir):
    full = run_job(write_job(tmp_path / "a", tiny_single_file, shapes_dir, max_train_steps=8))
    first = run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, max_train_steps=5,
                          save_state_on_train_end=True))
    assert first.losses == full.losses[:5]
    state = first.state_dir
    assert json.loads((state / "progress.json").read_text())["global_step"] == 5
    resumed = run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, max_train_steps=8, resume=str(state)))
    assert resumed.losses == full.losses[5:]
    a = __import__("networks").load_network_file(full.final_files[0])[0]
    b = __import__("networks").load_network_file(resumed.final_files[0])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_message_after_saving_state(tmp_path, tiny_single_file, shapes_dir, monkeypatch):
    from library.training import noise as nz

    real = nz.per_sample_loss
    calls = {"n": 0}

    def poisoned(pred, target, *args):
        calls["n"] += 1
        loss = real(pred, target, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(nz, "per_sample_loss", poisoned)
    with pytest.raises(TrainingStopped, match=r"the loss became nan at step 3 .*last good state was saved.*bf16"):
        run_job(write_job(tmp_path, tiny_single_file, shapes_dir))
    progress = json.loads((tmp_path / "out" / "lora-state" / "progress.json").read_text())
    assert progress["global_step"] == 2


def test_fp16_on_cpu_is_refused(tmp_path, tiny_single_file, shapes_dir):
    with pytest.raises(ConfigError, match=r"fp16.*CPU.*bf16"):
        run_job(write_job(tmp_path, tiny_single_file, shapes_dir, mixed_precision="fp16"))


@pytest.mark.slow
def test_sigint_saves_state_and_weights_then_resume_matches(tmp_path, tiny_single_file, shapes_dir):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=400)
    # one thread, as in this process: the reference below must add up its sums in the same order
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_network.py"), "--config", str(job)], cwd=REPO,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    seen = b""
    deadline = time.time() + 120
    while b" 1/400 " not in seen and time.time() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096)  # tqdm writes '\r', not lines: read raw bytes
    proc.send_signal(signal.SIGINT)  # arrives during the second step
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    state = tmp_path / "out" / "lora-state"
    step = json.loads((state / "progress.json").read_text())["global_step"]
    assert 0 < step < 400
    assert (tmp_path / "out" / f"lora-step{step:08d}.safetensors").is_file()
    assert f"--resume {state}" in err
    resumed = run_job(job, resume=str(state), max_train_steps=step + 3)
    reference = run_job(write_job(tmp_path / "ref", tiny_single_file, shapes_dir, max_train_steps=step + 3))
    assert resumed.losses == reference.losses[step:]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_same_global_batch(tmp_path, tiny_single_file, shapes_dir):
    """2 processes × batch 2 (gloo on the CPU) == 1 process × batch 2 × 2 accumulation steps."""
    from networks import load_network_file

    ddp_job = write_job(tmp_path / "ddp", tiny_single_file, shapes_dir, max_train_steps=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29561", str(REPO / "train_network.py"), "--config", str(ddp_job)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run_job(write_job(tmp_path / "one", tiny_single_file, shapes_dir, max_train_steps=3,
                           gradient_accumulation_steps=2))
    a = load_network_file(tmp_path / "ddp" / "out" / "lora.safetensors")[0]
    b = load_network_file(single.final_files[0])[0]
    assert set(a) == set(b)
    moved = [k for k in a if "lora_up" in k and a[k].abs().max() > 0]
    assert moved  # training changed the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)  # reduction order differs


@pytest.mark.slow
def test_validation_split_holds_out_images_and_its_loss_is_reported(tmp_path, tiny_single_file, shapes_dir):
    from library.dataset import TrainDataset, resolve_datasets
    from library.dataset.validation import hold_out

    configs = resolve_datasets({"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
                               {"datasets": [{"subsets": [{"image_dir": str(shapes_dir)}]}]}, "test", Path.cwd())
    data = TrainDataset(configs, seed=1)
    held = hold_out(data, 0.25)
    assert len(held) == 2 and data.num_train_images == 6  # 8 images, a quarter held out
    assert held == hold_out(TrainDataset(configs, seed=1), 0.25)  # deterministic for the seed
    result = run_job(write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=30, validation_split=0.25,
                           validate_every_n_steps=15, network_args=["conv_dim=4", "conv_alpha=4"]))
    steps = [s for s, _ in result.validation]
    assert steps == [0, 15, 30]  # before training, every 15 steps, and at the end
    assert result.validation[-1][1] < result.validation[0][1]  # it generalises to unseen images


def test_periodic_saves_pruning_ema_tensorboard_and_text_cache(tmp_path, tiny_single_file, shapes_dir, monkeypatch):
    from networks import load_network_file

    from library.training import loop

    calls = {"texts": 0}
    real_encode = loop.encode_texts

    def counting_encode(tokenizer, text_encoder, texts, *args):
        calls["texts"] += len(texts)
        return real_encode(tokenizer, text_encoder, texts, *args)

    monkeypatch.setattr(loop, "encode_texts", counting_encode)
    job = write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=8, save_every_n_steps=2,
                    save_last_n_steps=4, ema_decay=0.5, logging_dir=str(tmp_path / "logs"),
                    network_train_unet_only=True)
    result = run_job(job)
    out = tmp_path / "out"
    # saves at steps 2, 4, 6; only those of the last 4 steps are kept beside the final file
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "lora-step00000004.safetensors", "lora-step00000006.safetensors", "lora.safetensors"]
    # the frozen text encoder saw each distinct caption once (8 images, 2 colours, 2 backgrounds at most)
    captions = {c.read_text() for c in shapes_dir.glob("*.txt")}
    assert calls["texts"] == len(captions)
    # EMA: the saved weights are the average, not the last weights
    saved = load_network_file(result.final_files[0])[0]
    raw = result.method.network.kohya_state_dict()
    up = next(k for k in saved if k.endswith("lora_up.weight"))
    assert not torch.allclose(saved[up].float(), raw[up].float())
    assert list((tmp_path / "logs").glob("*/events.out.tfevents.*"))
    # nothing needed the VAE after caching: it was let go, and comes back (the same weights) when asked for
    from library.models.loading import load_sd1

    assert result.model.__dict__["_vae"] is None
    fresh = load_sd1(tiny_single_file).vae.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in result.model.vae.state_dict().items())


def test_what_falls_due_after_a_step():
    from types import SimpleNamespace

    from library.training.schedule import Due, due_after_step

    job = SimpleNamespace(save_every_n_steps=4, save_every_n_epochs=2, save_state=True, validate_every_n_steps=None,
                          sample_every_n_steps=3, sample_every_n_epochs=None)
    assert due_after_step(job, 1, 20, None) == Due()
    assert due_after_step(job, 3, 20, None) == Due(samples=True)
    assert due_after_step(job, 4, 20, None) == Due(save_step=True, state=True, validation=True)
    assert due_after_step(job, 5, 20, 1) == Due()  # epoch 1 finished: not a multiple of 2
    assert due_after_step(job, 10, 20, 2) == Due(save_epoch=True, state=True, validation=True)
    assert due_after_step(job, 12, 20, 3) == Due(save_step=True, state=True, validation=True, samples=True)
    assert due_after_step(job, 20, 20, 4) == Due()  # the end of the run has its own saves
    own = SimpleNamespace(**{**vars(job), "validate_every_n_steps": 5, "save_state": False})
    assert due_after_step(own, 4, 20, None) == Due(save_step=True)
    assert due_after_step(own, 5, 20, None) == Due(validation=True)
