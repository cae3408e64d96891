"""The study in miniature: its data (prepare_dataset.py toy-hands), its study file (the same runner as the
SD1.5 study), and the --quick run end to end on the toy hand model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import prepare_dataset
from library.config import load_job
from library.errors import ConfigError
from library.schema import load_toml
from toy_hands import TOY_MODEL_PATH, prepare, study

needs_toy_model = pytest.mark.skipif(not TOY_MODEL_PATH.is_file(), reason="the toy hand model is not in this checkout")


def test_toy_study_file_prompts_seeds_and_rows():
    full = study.toy_study()
    # the prompts are the ones the comment says: the first eight distinct captions of stream 5000
    assert full.prompts == prepare.distinct_captions(5000, 8)
    dev, test = set(full.seeds["dev"]), set(full.seeds["test"])
    pool = set(range(prepare.POOL_SEED, prepare.POOL_SEED + prepare.FULL.pool_seeds))
    assert min(dev) == 10_000 and min(test) == 30_000 and len(dev) == len(test) == 25
    assert not dev & test and not (dev | test) & pool
    assert [r.name for r in full.rows] == ["base", "lora_attn_r4", "lora_attn_r64", "locon_conv_te", "ti_positive",
                                           "ti_negative", "ti_contrastive", "dreambooth_palms"]
    assert full.model == TOY_MODEL_PATH.resolve() and full.judge == "counter"
    # every job of the study reads the default data folder, and every one is a job its script accepts
    for row in full.rows[1:]:
        text = row.job.read_text()
        assert "data/toy_hands/" in text and row.overrides == {}


def test_quick_study_is_the_same_file_smaller_and_reads_its_own_data():
    full, quick = study.toy_study(), study.toy_study(quick=True)
    assert quick.prompts == full.prompts[:4] and quick.seeds["test"] == full.seeds["test"][:6]
    assert quick.sample["steps"] == 12 and quick.out == Path("toy_study_quick")
    rows = {r.name: r for r in quick.rows}
    assert rows["lora_attn_r64"].multipliers == (0.5, 1.0) and rows["lora_attn_r4"].checkpoints == (12,)
    assert rows["ti_positive"].checkpoints == () and rows["ti_positive"].prompt_template == "goodhand {prompt}"
    db = rows["dreambooth_palms"].overrides
    assert db["max_train_steps"] == 24 and db["num_class_images"] == 8
    assert [s["image_dir"] for s in db["datasets"][0]["subsets"]] == ["data/toy_hands_quick/palms",
                                                                      "data/toy_hands_quick/class_hand"]
    assert rows["ti_contrastive"].overrides["contrastive_data_dir"] == "data/toy_hands_quick/good_generations"
    moved = {r.name: r for r in study.toy_study(data=Path("elsewhere/toy")).rows}
    assert moved["lora_attn_r4"].overrides["datasets"][0]["subsets"][0]["image_dir"] == "elsewhere/toy/clean_hands"


@needs_toy_model
def test_prepare_toy_data_writes_sorted_generations_once(tmp_path, monkeypatch):
    plan = prepare.DataPlan(clean_images=3, palm_images=2, pool_prompts=2, pool_seeds=3, pool_steps=4)
    out = tmp_path / "toy"
    summary = prepare.prepare_toy_data(out, plan)
    assert sorted(p.name for p in out.iterdir()) == ["bad_generations", "clean_hands", "good_generations", "palms",
                                                     "summary.json", "summary.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no temporary left beside it
    assert len(list((out / "clean_hands").glob("*.png"))) == 3 and len(list((out / "palms").glob("*.png"))) == 2
    assert not list((out / "palms").glob("*.txt"))
    generations = [p for kind in ("bad", "good") for p in (out / f"{kind}_generations").glob("*.png")]
    assert len(generations) == summary["bad_generations"] + summary["good_generations"] == 2 * 3
    prompts = set(prepare.distinct_captions(prepare.POOL_PROMPT_STREAM, 2))
    assert {p.with_suffix(".txt").read_text().strip() for p in generations} == prompts
    from library.evaluate.counter import count_fingers

    for path in (out / "good_generations").glob("*.png"):
        assert count_fingers(Image.open(path)) == 5
    for path in (out / "bad_generations").glob("*.png"):
        assert count_fingers(Image.open(path)) != 5
    # a second run with the same settings finds it; other settings are refused and nothing is touched
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert prepare.prepare_toy_data(out, plan) == summary and (out / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="holds toy data of other settings"):
        prepare.prepare_toy_data(out, prepare.QUICK)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds other files"):
        prepare_dataset.main(["toy-hands", "--out", str(tmp_path / "other")])
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["mine.txt"]


@pytest.mark.slow
@needs_toy_model
def test_quick_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study.main(["--quick"])
    data = json.loads(Path("data/toy_hands_quick/summary.json").read_text())
    assert data["clean_hands"] == 32 and data["bad_generations"] > 0 and data["good_generations"] > 0
    report = Path("toy_study_quick/dev/report")
    table = (report / "study.md").read_text()
    for row in study.toy_study(quick=True).rows:
        assert f"| {row.label} | {row.name} |" in table
    assert "| LoRA attention r64 ×0.5 | lora_attn_r64@x0.5 |" in table
    Image.open(report / "plots" / "score_by_step.png").verify()
    per_point = 4 * 6
    counts = {}
    for folder in Path("toy_study_quick/dev/samples").glob("*/[!.]*"):  # not .embeddings (the staged tokens)
        counts[f"{folder.parent.name}/{folder.name}"] = len(list(folder.glob("*.png")))
    assert counts["lora_attn_r4/step00000012"] == counts["lora_attn_r64/final-x0.5"] == per_point
    assert set(counts.values()) == {per_point} and len(counts) == 1 + 2 + 3 + 2 + 3 + 1
    # every job the study ran is a job file its script accepts
    for row in study.toy_study(quick=True).rows[1:]:
        load_job(row.script, ["--config", f"toy_study_quick/jobs/{row.name}.toml"])
        assert load_toml(f"toy_study_quick/jobs/{row.name}.toml")["max_train_steps"] == 24
    # a second run finds everything done: nothing is trained or sampled again, the table is the same
    marker = Path("toy_study_quick/rows/lora_attn_r4/trained.json").stat().st_mtime_ns
    study.main(["--quick"])
    assert Path("toy_study_quick/rows/lora_attn_r4/trained.json").stat().st_mtime_ns == marker
    assert (report / "study.md").read_text() == table
