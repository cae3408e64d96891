"""The study in miniature: its scores and report, and the --quick run end to end on the toy hand model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from library.config import load_job
from library.errors import ConfigError
from toy_hands import TOY_MODEL_PATH
from toy_hands import study
from toy_hands.report import HandScore, markdown_table, pixel_change, write_line_plot


def test_hand_score_rates_and_wilson_interval():
    score = HandScore([5, 5, 4, 0, 6, 5, 5, 7])
    assert score.five_rate == pytest.approx(4 / 8)
    assert score.no_hand_rate == pytest.approx(1 / 8)
    assert score.mean_error == pytest.approx((0 + 0 + 1 + 1 + 0 + 0 + 2) / 7)
    assert score.histogram() == {0: 1, 4: 1, 5: 4, 6: 1, 7: 1}
    # Wilson interval, worked by hand: 0 of 24 -> upper bound z²/n / (1 + z²/n)
    lo, hi = HandScore([4] * 24).interval()
    assert lo == 0.0 and hi == pytest.approx((1.96 ** 2 / 24) / (1 + 1.96 ** 2 / 24))
    lo, hi = HandScore([5] * 100 + [4] * 100).interval()
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 0.0686, abs=1e-3)


def test_pixel_change_and_table_and_plot(tmp_path):
    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    assert pixel_change([black, white], [black, white]) == 0.0
    assert pixel_change([black], [white]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs the same images"):
        pixel_change([black], [])
    table = markdown_table(["a", "b"], [[1, "x"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]
    path = tmp_path / "plot.png"
    write_line_plot(path, {"run": [(0, 0.1), (50, 0.4), (100, 0.7)]}, "t", "step", "rate", baseline=0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary left beside it
    with Image.open(path) as plot:
        assert plot.format == "PNG" and plot.size == (720, 440)
        colours = {tuple(c) for c in np.asarray(plot.convert("RGB")).reshape(-1, 3)}
    assert (31, 119, 180) in colours  # the first series is drawn (matplotlib's first colour, #1f77b4)


def test_study_refuses_a_folder_that_holds_a_study(tmp_path):
    (tmp_path / "jobs").mkdir()
    with pytest.raises(ConfigError, match="already holds a study"):
        study.main(["--out", str(tmp_path), "--quick"])
    assert list(tmp_path.iterdir()) == [tmp_path / "jobs"]


def test_dev_and_test_seeds_are_disjoint_from_each_other_and_from_the_pool(tmp_path):
    dev, test = (study.Study(tmp_path, study.FULL, TOY_MODEL_PATH, s) for s in ("dev", "test"))
    pool = set(range(study.POOL_SEED, study.POOL_SEED + study.FULL.pool_seeds))
    assert dev.eval_seeds[0] == 10_000 and test.eval_seeds[0] == 30_000 and len(test.eval_seeds) == 25
    assert not set(dev.eval_seeds) & set(test.eval_seeds) and not (set(dev.eval_seeds) | set(test.eval_seeds)) & pool
    assert dev.hand_prompts == test.hand_prompts  # the same prompts: only the seeds are fresh


@pytest.mark.slow
@pytest.mark.skipif(not TOY_MODEL_PATH.is_file(), reason="the toy hand model is not in this checkout")
def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    study.main(["--out", str(out), "--quick"])
    results = json.loads((out / "results.json").read_text())
    assert results["seed_set"] == "dev" and results["eval_seeds"][0] == 10_000
    plan = study.QUICK
    per_row = plan.eval_prompts * plan.eval_seeds
    expected = {"base", "lora_attn_r4", "lora_attn_r64", "locon_conv_te", "ti_positive", "ti_negative",
                "dreambooth_palms"}
    assert expected <= set(results["rows"])
    for key, row in results["rows"].items():
        assert row["images"] == per_row, key
        assert sum(row["histogram"].values()) == per_row
    assert results["rows"]["base"]["non_hand_change"] == 0.0
    assert [p["multiplier"] for p in results["sweep"]] == [0.0, 0.5, 1.0]
    assert set(results["curves"]) == {"LoRA attention r4", "LoRA attention r64", "LoCon conv + TE"}
    md = (out / "results.md").read_text()
    for row in results["rows"].values():
        assert f"| {row['label']} |" in md
    for name in ("score_vs_step.png", "grid.png"):
        Image.open(out / name).verify()
    # every job the study ran is a job file the public scripts accept
    scripts = {"lora": "train_network", "locon": "train_network", "goodhand": "train_textual_inversion",
               "badhand": "train_textual_inversion", "contrastbad": "train_textual_inversion",
               "dreambooth": "train_dreambooth", "sample": "sample"}
    for job_file in sorted((out / "jobs").glob("*.toml")):
        script = next(v for k, v in scripts.items() if job_file.stem.startswith(k))
        load_job(script, ["--config", str(job_file)])
