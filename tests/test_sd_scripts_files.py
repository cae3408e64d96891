"""Job files as sd-scripts users have them (tests/data/sd_scripts/): a kohya_ss-GUI file and a Colab
notebook's pair (sectioned job + dataset file). With only their paths replaced they load, `--print_config`
shows what they asked for, and a short run on the tiny model trains what they describe. (On this CPU the runs
also say `--mixed_precision no`: fp16 needs a GPU; the files' other keys are left as written.)"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_network
from library.cli import job_from_command_line
from library.errors import ConfigError
from tests.support import REPO

FILES = REPO / "tests" / "data" / "sd_scripts"


def images(folder, count=2, size=128):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (size, size), (40 + 90 * i, 120, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("hand, palm, fingers, red background")
    return folder


def gui_argv(tmp_path, tiny_single_file):
    data = tmp_path / "img"
    images(data / "1_hand")
    (tmp_path / "prompt.txt").write_text("a hand --n bad --w 64 --h 64 --d 1 --s 4\n")
    return ["--config", str(FILES / "kohya_ss_gui_lora.toml"), "--pretrained_model_name_or_path",
            str(tiny_single_file), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"),
            "--logging_dir", str(tmp_path / "logs"), "--sample_prompts", str(tmp_path / "prompt.txt")]


def colab_argv(tmp_path, tiny_single_file):
    data = images(tmp_path / "dataset")
    text = (FILES / "colab_dataset_config.toml").read_text().replace("/content/drive/MyDrive/Loras/hands/dataset",
                                                                     str(data))
    # one repeat instead of ten: at the file's 512 px one step of the tiny model takes seconds on a CPU
    text = text.replace("num_repeats = 10", "num_repeats = 1")
    (tmp_path / "dataset_config.toml").write_text(text)
    return ["--config", str(FILES / "colab_training_config.toml"), "--dataset_config",
            str(tmp_path / "dataset_config.toml"), "--pretrained_model_name_or_path", str(tiny_single_file),
            "--vae", str(tiny_single_file), "--output_dir", str(tmp_path / "out"), "--logging_dir",
            str(tmp_path / "logs")]


def test_kohya_ss_gui_file_reads_as_written(tmp_path, tiny_single_file, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="pentadactyl"):
        job = job_from_command_line("train_network", gui_argv(tmp_path, tiny_single_file))
    said = caplog.text
    for key in ("epoch = 4", "noise_offset_type = 'Original'", "wandb_run_name = 'hands'"):
        assert f"{key} passed over" in said, key
    assert "persistent_data_loader_workers" not in said  # false asks for nothing: not even a note
    # what the GUI's spellings mean: "512,512" a size, 0 "never" / "off" / the default, "" the default logger
    assert job.datasets[0].resolution == (512, 512)
    assert job.sample_every_n_steps is None and job.sample_every_n_epochs is None
    assert job.log_with == "tensorboard" and job.vae_batch_size == 1
    assert job.multires_noise_iterations == 0 and not job.scale_weight_norms and not job.adaptive_noise_scale
    assert (job.max_train_epochs, job.lr_scheduler, job.optimizer_type) == (4, "cosine", "AdamW8bit")
    assert job.huber_schedule == "snr" and job.loss_type == "l2"
    with pytest.raises(SystemExit) as stopped:
        train_network.main([*gui_argv(tmp_path / "p", tiny_single_file), "--print_config"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert "resolution = [512, 512]" in printed and 'optimizer_type = "AdamW8bit"' in printed


@pytest.mark.slow
def test_kohya_ss_gui_file_trains_on_the_tiny_model(tmp_path, tiny_single_file):
    result = train_network.main([*gui_argv(tmp_path, tiny_single_file), "--mixed_precision", "no",
                                 "--xformers", "false", "--max_train_epochs", "1", "--metadata_author", "me",
                                 "--metadata_tags", "hands, lora"])
    assert result.global_step == 2  # 2 images × 1 repeat at batch 1, one epoch
    with safe_open(str(result.final_files[0]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        dtype = f.get_tensor(next(k for k in keys if k.endswith("lora_down.weight"))).dtype
    assert result.final_files[0].name == "hands.safetensors" and dtype == torch.float16  # save_precision fp16
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "1"
    assert meta["ss_optimizer"].endswith("AdamW8bit") and meta["ss_lr_scheduler"] == "cosine"
    assert (meta["modelspec.author"], meta["modelspec.tags"], meta["modelspec.title"]) == ("me", "hands, lora", "hands")
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)


def test_other_sd_scripts_keys_say_what_to_do_instead(tmp_path, tiny_single_file, caplog):
    argv = gui_argv(tmp_path, tiny_single_file)
    job_file = tmp_path / "more.toml"  # the GUI file with three keys it cannot have here, all reported at once
    job_file.write_text((FILES / "kohya_ss_gui_lora.toml").read_text()
                        + 'zero_terminal_snr = true\nuse_8bit_adam = true\nbase_weights = ["x.safetensors"]\n')
    with pytest.raises(ConfigError) as refused:
        job_from_command_line("train_network", ["--config", str(job_file), *argv[2:]])
    text = str(refused.value)
    assert text.startswith("3 problems") or "3 problems" in text.splitlines()[0]
    assert "zero_terminal_snr" in text and "SD1.x predicts noise" in text
    assert 'write that instead' in text and "networks/merge.py" in text  # all three in one report
    with caplog.at_level(logging.INFO, logger="pentadactyl"):
        job = job_from_command_line("train_network", [*argv, "--no_half_vae", "--zero_terminal_snr", "false"])
    assert "--no_half_vae passed over" in caplog.text and job.network_dim == 8


@pytest.mark.slow
def test_colab_pair_reads_and_trains_what_it_asks_for(tmp_path, tiny_single_file, caplog):
    argv = colab_argv(tmp_path, tiny_single_file)
    with caplog.at_level(logging.INFO, logger="pentadactyl"):
        job = job_from_command_line("train_network", argv)
    assert "lowram = True passed over" in caplog.text
    assert (job.clip_skip, job.max_token_length, job.min_snr_gamma) == (2, 225, 5.0)
    assert (job.multires_noise_iterations, job.multires_noise_discount, job.scale_weight_norms) == (6, 0.3, 1.0)
    assert job.network_args == ["conv_dim=8", "conv_alpha=4"] and job.network_weights in (None, "")
    subset = job.datasets[0].subsets[0]
    assert (subset.num_repeats, subset.caption.keep_tokens, subset.caption.shuffle) == (1, 1, True)
    assert job.datasets[0].min_bucket_reso == 320 and job.datasets[0].max_bucket_reso == 960
    result = train_network.main([*argv, "--mixed_precision", "no", "--max_train_epochs", "1"])
    assert result.global_step == 1  # 2 images × 1 repeat at batch 2
    with safe_open(str(result.final_files[0]), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        conv = [k for k in keys if k.endswith(".lora_down.weight") and f.get_tensor(k).ndim == 4
                and f.get_tensor(k).shape[2:] == (3, 3)]
        ranks = {f.get_tensor(k).shape[0] for k in conv}
    assert conv and ranks == {8}  # LoCon: the 3×3 convolutions at conv_dim 8
    assert meta["ss_vae_name"] == tiny_single_file.name and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_clip_skip"] == "2" and meta["ss_max_token_length"] == "225"
    shutil.rmtree(tmp_path / "out")
