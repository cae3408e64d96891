"""study.py --plan's time estimates: the model is recognised from its safetensors header alone, and each row's
seconds follow from the measured figures by the stated scaling rules (checked against hand-computed values)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from library.study.estimate import (
    FIGURES, estimate_row, figures_for_file_size, figures_for_unet_parameters, format_duration, identify_model,
)
from library.study.plan import Row, Study, load_study

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "toy_hands" / "toy-hands-sd1.safetensors"
SD1, TOY_FIGURES, TINY = FIGURES


def header_only_file(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A file that is only a safetensors header (no weights): enough for identify_model, which reads no weight."""
    header = json.dumps({name: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in shapes.items()}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def study_of(model: Path, *rows: Row, prompts: int = 2, seeds: int = 3, **sample) -> Study:
    return Study(Path("study.toml"), "s", model, "counter", Path("out"), None,
                 {"dev": tuple(range(1000, 1000 + seeds))},
                 {"prompts": [f"prompt {i}" for i in range(prompts)], "steps": 30, "width": 64, "height": 64,
                  **sample}, tuple(rows))


def job(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ the model

def test_the_unet_parameter_count_names_the_architecture():
    assert figures_for_unet_parameters(859_520_964) is SD1  # every SD1.x checkpoint
    assert figures_for_unet_parameters(859_535_364) is SD1  # SD1.5 inpainting: 9 input channels
    assert figures_for_unet_parameters(1_489_028) is TOY_FIGURES
    assert figures_for_unet_parameters(1_120_548) is TINY
    assert figures_for_unet_parameters(865_910_724) is None  # SD2's U-Net
    assert figures_for_unet_parameters(2_567_463_684) is None  # SDXL's
    assert figures_for_unet_parameters(0) is None


def test_a_file_without_a_safetensors_header_is_judged_by_its_size():
    assert figures_for_file_size(2_132_625_894) is SD1  # v1-5-pruned-emaonly, fp16
    assert figures_for_file_size(4_265_380_512) is SD1  # v1-5-pruned-emaonly, fp32
    assert figures_for_file_size(11_560_038) is None


def test_models_are_recognised_from_the_header_without_reading_weights(tmp_path):
    assert identify_model(TOY)[0] is TOY_FIGURES
    fake = header_only_file(tmp_path / "sd15.safetensors", {
        "model.diffusion_model.w": [859_520_964], "model_ema.diffusion_modelw": [859_520_964],  # EMA not counted
        "cond_stage_model.transformer.w": [123_060_480]})
    figures, how = identify_model(fake)
    assert figures is SD1 and "859,520,964" in how
    diffusers = tmp_path / "toy-diffusers"
    header_only_file(diffusers / "unet" / "diffusion_pytorch_model.safetensors", {"conv_in.weight": [1_489_028]})
    assert identify_model(diffusers)[0] is TOY_FIGURES
    (tmp_path / "small.ckpt").write_bytes(b"PK\x03\x04 not a safetensors file")
    assert identify_model(tmp_path / "small.ckpt")[0] is None
    figures, how = identify_model(tmp_path / "missing.safetensors")
    assert figures is None and "does not exist" in how


# ------------------------------------------------------------------------------------------ the arithmetic

def test_toy_rows_scale_with_pixels_batch_and_steps(tmp_path):
    path = job(tmp_path, 'max_train_steps = 300\ntrain_batch_size = 8\nresolution = 64\n')
    row = Row("lora", "LoRA", "train_network", path, checkpoints=(100, 200, 300))
    est = estimate_row(study_of(TOY, row), row, "dev")
    assert est.train_seconds == pytest.approx(113.0)  # the toy study's measured 113 s per 300-step run
    # checkpoints 100 and 200 (300 is the end: the final weights) + the final at 1.0, × 2 prompts × 3 seeds
    assert est.sample_seconds == pytest.approx(0.45 / 30 * 30 * 3 * 2 * 3)
    assert est.total_seconds == pytest.approx(est.train_seconds + est.sample_seconds)

    doubled = Row("lora2", "LoRA", "train_network", path, overrides={"resolution": 128})
    assert estimate_row(study_of(TOY, doubled), doubled, "dev").train_seconds == pytest.approx(4 * 113.0)
    wide = Row("wide", "LoRA", "train_network", path, overrides={"resolution": [128, 64], "max_train_steps": 600})
    assert estimate_row(study_of(TOY, wide), wide, "dev").train_seconds == pytest.approx(2 * 2 * 113.0)
    # a [[datasets]] table's batch_size wins over train_batch_size, [general]'s resolution over the top level's
    tables = job(tmp_path, 'max_train_steps = 300\ntrain_batch_size = 2\nresolution = 512\n'
                 '[general]\nresolution = 64\n[[datasets]]\nbatch_size = 16\n[[datasets.subsets]]\nimage_dir = "x"\n',
                 "tables.toml")
    layered = Row("layered", "LoRA", "train_network", tables)
    assert estimate_row(study_of(TOY, layered), layered, "dev").train_seconds == pytest.approx(2 * 113.0)
    accumulated = Row("acc", "LoRA", "train_network", path, overrides={"gradient_accumulation_steps": 3})
    assert estimate_row(study_of(TOY, accumulated), accumulated, "dev").train_seconds == pytest.approx(3 * 113.0)

    bigger = study_of(TOY, row, width=128, height=128, steps=15)
    assert estimate_row(bigger, row, "dev").sample_seconds == pytest.approx(0.45 / 30 * 4 * 15 * 3 * 2 * 3)
    no_cfg = study_of(TOY, row, cfg_scale=1.0)
    assert estimate_row(no_cfg, row, "dev").sample_seconds == pytest.approx(est.sample_seconds / 2)


def test_a_30000_step_sd15_row_at_512_px_batch_9(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    header_only_file(tmp_path / "models" / "sd15.safetensors", {"model.diffusion_model.w": [859_520_964]})
    job(tmp_path, 'network_dim = 64\ntrain_batch_size = 9\nmax_train_steps = 30000\nmixed_precision = "no"\n'
        '[general]\nresolution = 512\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data/11k_hands"\n',
        "r64.toml")
    (tmp_path / "study.toml").write_text(
        '[study]\nname = "sd15"\nmodel = "models/sd15.safetensors"\n'
        '[seeds]\ndev = { start = 1000, count = 8 }\n'
        '[sample]\nprompts = ["a", "b", "c", "d", "e"]\nsampler = "ddim"\nsteps = 30\ncfg_scale = 7.5\n'
        'width = 512\nheight = 512\n'
        '[[rows]]\nname = "base"\nlabel = "SD1.5"\n'
        '[[rows]]\nname = "r64"\nlabel = "LoRA r64"\nscript = "train_network"\njob = "r64.toml"\n'
        'checkpoints = [5000, 10000, 15000, 20000, 25000, 30000]\nmultipliers = [0.75, 1.0]\n'
        '[[rows]]\nname = "r64_bf16"\nlabel = "LoRA r64"\nscript = "train_network"\njob = "r64.toml"\n'
        'overrides = { mixed_precision = "bf16" }\n', encoding="utf-8")
    study = load_study("study.toml")
    base, r64, bf16 = study.rows
    est = estimate_row(study, r64, "dev")
    # 5.09 s/step at 256² batch 1 (bench_train_sd15.py, fp32) × 4 (512²) × 9 (batch) × 30,000 steps
    assert est.train_seconds == pytest.approx(5.09 * 4 * 9 * 30_000) == pytest.approx(5_497_200)
    # 5 checkpoints + the final at 0.75 and 1 = 7 points × 5 prompts × 8 seeds = 280 images, 30 DDIM steps,
    # 114.5 s per 20-step 256² image (bench_sampling.py) × 4 (512²)
    assert est.sample_seconds == pytest.approx(114.5 / 20 * 4 * 30 * 280) == pytest.approx(192_360)
    assert "30000 steps" in est.basis and "Xeon" in est.basis
    assert estimate_row(study, bf16, "dev").train_seconds == pytest.approx(8.27 * 4 * 9 * 30_000)
    base_est = estimate_row(study, base, "dev")
    assert base_est.train_seconds == 0 and base_est.sample_seconds == pytest.approx(114.5 / 20 * 4 * 30 * 40)
    assert format_duration(est.train_seconds) == "63 d 15 h"


# ------------------------------------------------------------------------------------------ no estimate

def test_unknown_models_lengths_and_figures_give_no_estimate(tmp_path):
    path = job(tmp_path, 'max_train_steps = 300\nresolution = 64\n')
    row = Row("lora", "LoRA", "train_network", path)
    est = estimate_row(study_of(tmp_path / "not-yet.safetensors", row), row, "dev")
    assert est.train_seconds is None and est.sample_seconds is None and est.total_seconds is None
    assert est.basis.startswith("unknown model: no estimate")

    epochs = Row("epochs", "LoRA", "train_network", path, overrides={"max_train_epochs": 3}, checkpoints=(100,))
    est = estimate_row(study_of(TOY, epochs), epochs, "dev")
    assert est.train_seconds is None and "unknown length" in est.basis
    assert est.sample_seconds == pytest.approx(0.45 / 30 * 30 * 2 * 2 * 3)  # the checkpoint is counted

    fp16 = Row("fp16", "LoRA", "train_network", path, overrides={"mixed_precision": "fp16"})
    est = estimate_row(study_of(TOY, fp16), fp16, "dev")
    assert est.train_seconds is None and "no measured figure" in est.basis and est.sample_seconds is not None

    # the tiny model has a sampling figure and no training one
    est = estimate_row(study_of(TOY, row), row, "dev", figures=TINY)
    assert est.train_seconds is None and est.sample_seconds == pytest.approx(0.72 / 20 * 30 * 2 * 3)

    # full DreamBooth: measured on the toy model (its pretraining), not on SD1.x
    full = Row("full", "DreamBooth", "train_dreambooth", path, overrides={"dreambooth_mode": "full",
                                                                         "train_batch_size": 32})
    assert estimate_row(study_of(TOY, full), full, "dev").train_seconds == pytest.approx(0.65 * 300)
    assert estimate_row(study_of(TOY, full), full, "dev", figures=SD1).train_seconds is None


def test_format_duration():
    assert format_duration(None) == "unknown"
    assert format_duration(0) == "0 s"
    assert format_duration(45) == "45 s"
    assert format_duration(59.4) == "59 s"
    assert format_duration(59.6) == "1 min"
    assert format_duration(270) == "4 min 30 s"
    assert format_duration(25 * 60 + 10) == "25 min"
    assert format_duration(3590) == "1 h"
    assert format_duration(3 * 3600 + 20 * 60) == "3 h 20 min"
    assert format_duration(2 * 86400 + 5 * 3600 + 100) == "2 d 5 h"
