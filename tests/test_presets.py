"""Every ready-made job in dataset_configs/ is a valid job for its script."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from library.config import load_job
from library.schema import load_toml

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "dataset_configs"

# preset file -> the script it is a job of
SCRIPTS = {
    "quickstart.toml": "train_network",
    "hands_11k_attention_r4.toml": "train_network",
    "hands_11k_attention_r64.toml": "train_network",
    "photos_drawings_te_conv.toml": "train_network",
    "photos_conv_r8_a4.toml": "train_network",
    "ti_handpalm.toml": "train_textual_inversion",
    "ti_handpalm_prompts.toml": None,  # a prompt file (sd-scripts .toml syntax), not a job
    "ti_negative_hands.toml": "train_textual_inversion",
    "ti_negative_hands_prompts.toml": None,
    "ti_handshake.toml": "train_textual_inversion",
    "ti_handshake_prompts.toml": None,
    "dreambooth_palms_lora.toml": "train_dreambooth",
    "dreambooth_handshakes_lora.toml": "train_dreambooth",
    "dreambooth_palms_full.toml": "train_dreambooth",
    "sample_compare.toml": "sample",
    "sample_quickstart.toml": "sample",
    "study_sd15.toml": "study",  # a study file of study.py (checked in test_study.py)
    "study_toy.toml": "study",  # the toy study (checked in test_toy_study.py)
    "toy/lora_attn_r4.toml": "train_network",  # the toy study's rows
    "toy/lora_attn_r64.toml": "train_network",
    "toy/locon_conv_te.toml": "train_network",
    "toy/ti_positive.toml": "train_textual_inversion",
    "toy/ti_negative.toml": "train_textual_inversion",
    "toy/ti_contrastive.toml": "train_textual_inversion",
    "toy/dreambooth_palms.toml": "train_dreambooth",
}


def test_every_preset_is_listed():
    assert sorted(p.relative_to(PRESETS).as_posix() for p in PRESETS.rglob("*.toml")) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(n for n, script in SCRIPTS.items() if script and script != "study"))
def test_preset_is_a_valid_job(name, tmp_path, monkeypatch):
    script = SCRIPTS[name]
    table = load_toml(PRESETS / name)
    # the folders a preset reads, made here with one small image each
    for dataset in table.get("datasets", []):
        for subset in dataset.get("subsets", []):
            folder = tmp_path / subset["image_dir"]
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (512, 512), "white").save(folder / "a.png")
            (folder / "a.txt").write_text("a hand")
    monkeypatch.chdir(tmp_path)
    job = load_job(script, config_path=str(PRESETS / name))
    assert job.pretrained_model_name_or_path
    if script == "train_network":
        from library.training.network_method import NetworkMethod

        NetworkMethod(job)  # network settings are valid too
    if script == "train_dreambooth":
        from library.training.dreambooth import make_method

        make_method(job)
    if script == "train_textual_inversion":
        from library.training.textual_inversion import TextualInversionMethod

        TextualInversionMethod(job)


@pytest.mark.parametrize("name", sorted(n for n, script in SCRIPTS.items() if script is None))
def test_prompt_presets_parse(name):
    from library.sampling import parse_prompt_file

    assert parse_prompt_file(PRESETS / name)
