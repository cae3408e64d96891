"""study.py: the study file is checked whole before anything runs; a study interrupted in a row resumes
without redoing finished rows and ends with the report an uninterrupted run writes."""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from library.errors import ConfigError, PentadactylError
from library.schema import job_toml
from library.study.plan import load_study
from library.evaluate import classifier
from library.study.runner import describe_plan, judge_and_report, run_study, training_job

REPO = Path(__file__).resolve().parent.parent


def test_every_mistake_of_a_study_file_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text('learning_rate = 1e-4\n')
    path = tmp_path / "study.toml"
    path.write_text(
        '[study]\nname = "s"\nmodel = "m.safetensors"\njudge = "vibes"\ncolour = "red"\n'
        '[seeds]\ndev = { start = 0, count = 4 }\ntest = [3, 9]\n'
        '[sample]\nsteps = 30\nseeds = [1]\n'
        '[[rows]]\nname = "a"\nscript = "train_network"\njob = "missing.toml"\n'
        '[[rows]]\nname = "a"\nscript = "train_network"\njob = "job.toml"\noverrides = { max_train_stpes = 9, output_dir = "x", learning_rate = "fast" }\n'
        'checkpoints = [0]\nprompt_template = "a hand"\n'
        '[[rows]]\nname = "../x"\njob = "job.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_study(path)
    message = str(caught.value)
    expected = [
        "[study]: unknown key 'colour'",
        "[study]: judge = 'vibes': choose 'ratings'",
        "[seeds]: dev and test share seeds",
        "[sample]: 'seeds' is set by the study for each row",
        "[sample]: prompts = [",
        "[[rows]] 'a': job = 'missing.toml': no such file",
        "[[rows]] 'a': overrides.max_train_stpes is not a key of train_network.py jobs",
        "[[rows]] 'a': overrides.output_dir: the study sets it for every row",
        "[[rows]] 'a': overrides: 'learning_rate' must be a number",
        "[[rows]] 'a': checkpoints must be a list of training steps",
        "[[rows]] 'a': prompt_template must contain {prompt}",
        "[[rows]] #3: name = '../x'",
        "[[rows]] #3: give both script and job",
        "[[rows]]: the name 'a' is used twice",
    ]
    for line in expected:
        assert line in message, line
    assert message.startswith(f"{path}: {len(expected)} problem(s):")


def test_sd15_study_file_plans_every_experiment_of_the_paper(monkeypatch):
    monkeypatch.chdir(REPO)
    study = load_study("dataset_configs/study_sd15.toml")
    assert study.judge == "ratings" and study.sample["sampler"] == "ddim" and study.sample["steps"] == 30
    assert study.sample["cfg_scale"] == 7.5 and not set(study.seeds["dev"]) & set(study.seeds["test"])
    scripts = {r.name: r.script for r in study.rows}
    assert scripts["base"] is None and list(scripts.values()).count("train_textual_inversion") == 3
    assert list(scripts.values()).count("train_dreambooth") == 2 and list(scripts.values()).count("train_network") == 4
    plan = describe_plan(study, "dev")
    # 5 prompts × 8 seeds per checkpoint; r64: 5 checkpoints + the final at 0.75 and 1
    assert "40 images per checkpoint" in plan and "lora_11k_r64" in plan and "; 280 images" in plan
    assert "in all: 1040 images" in plan
    # the row's job: the preset with the study's model, folder and save interval, and no in-training samples
    text, keys, _ = training_job(study, study.rows[1], Path("study_sd15"))
    assert keys["save_every_n_steps"] == 5000 and "sample_prompts" not in keys
    assert keys["pretrained_model_name_or_path"] == str(REPO / "models" / "v1-5-pruned-emaonly.safetensors")
    assert keys["max_train_steps"] == 30000 and keys["optimizer_type"] == "AdamW" and "[general]" in text


def _write_study(root: Path, model: Path, shapes: Path, ti_data: Path) -> Path:
    common = {"pretrained_model_name_or_path": "replaced by the study", "seed": 7, "train_batch_size": 2,
              "cache_latents": True, "save_precision": "float", "max_data_loader_n_workers": 0,
              "optimizer_type": "AdamW", "sample_prompts": "prompts.txt", "sample_every_n_steps": 1}
    general = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64}
    (root / "lora.toml").write_text(job_toml(
        {**common, "network_dim": 4, "network_alpha": 4.0, "learning_rate": 1e-2, "max_train_steps": 4},
        general, [{"subsets": [{"image_dir": str(shapes)}]}]))
    (root / "ti.toml").write_text(job_toml(
        {**common, "token_string": "shapetok", "init_word": "circle", "learning_rate": 1e-2, "max_train_steps": 2,
         "output_name": "shapetok"},
        general, [{"subsets": [{"image_dir": str(ti_data), "caption_prefix": "shapetok"}]}]))
    path = root / "study.toml"
    path.write_text(f'''
[study]
name = "tiny"
model = "{model}"
judge = "counter"

[seeds]
dev = {{ start = 10, count = 2 }}
test = [20]

[sample]
prompts = ["a red circle", "a blue circle"]
steps = 3
width = 64
height = 64
batch_size = 2

[[rows]]
name = "base"
label = "base model"

[[rows]]
name = "lora"
label = "LoRA r4"
script = "train_network"
job = "lora.toml"
checkpoints = [2]
multipliers = [0.5, 1.0]

[[rows]]
name = "ti"
label = "embedding"
script = "train_textual_inversion"
job = "ti.toml"
checkpoints = [1]
prompt_template = "{{prompt}}, shapetok"
''')
    return path


@pytest.mark.slow
def test_interrupted_study_resumes_and_reports_as_an_uninterrupted_one(tmp_path, monkeypatch, tiny_single_file,
                                                                       shapes_dir):
    monkeypatch.chdir(tmp_path)
    ti_data = tmp_path / "ti_data"  # missing at first: the third row fails, as a crash in a row would
    study = load_study(_write_study(tmp_path, tiny_single_file, shapes_dir, ti_data))

    with pytest.raises(PentadactylError, match="ti_data"):
        run_study(study, tmp_path / "cut", progress=False)
    lora_marker = tmp_path / "cut" / "rows" / "lora" / "trained.json"
    assert lora_marker.is_file() and not (tmp_path / "cut" / "rows" / "ti" / "trained.json").exists()
    assert not (tmp_path / "cut" / "dev" / "report").exists()
    kept = lora_marker.stat().st_mtime_ns, (tmp_path / "cut" / "rows" / "lora" / "lora.safetensors").read_bytes()

    shutil.copytree(shapes_dir, ti_data)
    resumed = run_study(study, tmp_path / "cut", progress=False)
    whole = run_study(study, tmp_path / "whole", progress=False)
    # the finished row was neither trained nor sampled again
    assert (lora_marker.stat().st_mtime_ns, (tmp_path / "cut" / "rows" / "lora" / "lora.safetensors").read_bytes()) \
        == kept
    assert resumed.report is not None and resumed.images == whole.images == 2 * 2 * (1 + 3 + 2)
    assert (resumed.report / "report.md").read_text() == (whole.report / "report.md").read_text()
    assert (resumed.report / "report.csv").read_text() == (whole.report / "report.csv").read_text()

    marker = json.loads(lora_marker.read_text())
    assert marker["kind"] == "network" and marker["global_step"] == 4 and list(marker["steps"]) == ["2"]
    job = (tmp_path / "cut" / "jobs" / "lora.toml").read_text()
    assert "save_every_n_steps = 2" in job and "sample_prompts" not in job and str(tiny_single_file) in job
    conn = sqlite3.connect(resumed.database)
    rows = conn.execute("SELECT run, training_step, COUNT(*), COUNT(DISTINCT seed) FROM images "
                        "GROUP BY run, training_step ORDER BY run, training_step").fetchall()
    ratings = conn.execute("SELECT COUNT(*) FROM ratings WHERE source = 'counter'").fetchone()[0]
    multipliers = {run: {json.loads(x)[0][1] for (x,) in conn.execute("SELECT loras FROM images WHERE run = ?",
                                                                       (run,))} for run in ("lora", "lora@x0.5")}
    conn.close()
    # base: 4 images; LoRA: 4 at step 2 and 4 at the end at 1, 4 at the end at 0.5 (a run of its own);
    # embedding: 4 at step 1 and 4 at the end
    assert rows == [("base", None, 4, 2), ("lora", 2, 4, 2), ("lora", 4, 4, 2), ("lora@x0.5", 4, 4, 2),
                    ("ti", 1, 4, 2), ("ti", 2, 4, 2)]
    assert ratings == 24 and multipliers == {"lora": {1.0}, "lora@x0.5": {0.5}}
    # study.md: one line per run at its final weights, in the study file's order
    lines = [line for line in (resumed.report / "study.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[1:3] for line in lines[1:]] == [
        ["base", "—"], ["lora", "4"], ["lora@x0.5", "4"], ["ti", "2"]]
    assert lines[1].startswith("| base model |") and lines[3].startswith("| LoRA r4 ×0.5 |")
    # the save interval's by-products are gone: the step-2 checkpoint and the final weights remain
    assert sorted(p.name for p in (tmp_path / "cut" / "rows" / "lora").glob("*.safetensors")) == [
        "lora-step00000002.safetensors", "lora.safetensors"]
    # a finished study run again does nothing new; a changed row is refused, not silently mixed
    again = run_study(study, tmp_path / "cut", progress=False)
    assert again.images == resumed.images and lora_marker.stat().st_mtime_ns == kept[0]
    # the study folder and the base model moved elsewhere: still nothing to redo
    moved_model = tmp_path / "elsewhere" / tiny_single_file.name
    moved_model.parent.mkdir()
    shutil.copyfile(tiny_single_file, moved_model)
    shutil.copytree(tmp_path / "cut", tmp_path / "moved")
    moved = run_study(replace(study, model=moved_model), tmp_path / "moved", progress=False)
    assert moved.images == resumed.images
    assert (tmp_path / "moved" / "rows" / "lora" / "trained.json").read_text() == lora_marker.read_text()
    assert (moved.report / "report.md").read_text() == (resumed.report / "report.md").read_text()
    relabelled = replace(study, name="renamed", rows=(study.rows[0], replace(study.rows[1], label="renamed"),
                                                      study.rows[2]))
    assert run_study(relabelled, tmp_path / "cut", progress=False).images == resumed.images  # labels only: kept
    changed = replace(study, rows=(study.rows[0], replace(study.rows[1], overrides={"learning_rate": 5e-3}),
                                   study.rows[2]))
    with pytest.raises(ConfigError, match=r"trained from another job .* --reset lora"):
        run_study(changed, tmp_path / "cut", progress=False)
    resampled = replace(study, sample={**study.sample, "steps": 2})
    with pytest.raises(ConfigError, match=r"holds images of other weights or sample settings .* --reset base"):
        run_study(resampled, tmp_path / "cut", progress=False)

    # judge = "classifier": a classifier fitted on people's ratings (here: made up, half 1, half 0) rates every
    # image of the study
    conn = sqlite3.connect(resumed.database)
    with conn:
        conn.executemany("INSERT INTO ratings (image_id, rater, score, no_hand, source) VALUES (?, 'ann', ?, 0, "
                         "'human')", [(i, float(i % 2)) for (i,) in conn.execute("SELECT id FROM images")])
    conn.close()
    parser = argparse.ArgumentParser()
    classifier.add_train_arguments(parser)
    clf = tmp_path / "clf"
    assert classifier.run_train(parser.parse_args(["--db", str(resumed.database), "--out", str(clf), "--source",
                                                   "human", "--image-size", "32", "--epochs", "1",
                                                   "--device", "cpu"])) == 0
    by_classifier = replace(study, judge="classifier", classifier=clf)
    judged = judge_and_report(by_classifier, resumed.database, tmp_path / "clf-report", progress=False)
    conn = sqlite3.connect(resumed.database)
    rated = conn.execute("SELECT COUNT(*), COUNT(DISTINCT image_id) FROM ratings WHERE source = 'classifier'").fetchone()
    predicted = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    conn.close()
    assert judged.report is not None and rated == (24, 24) and predicted == 24
    assert "classifier" in (judged.report / "report.md").read_text()
    judge_and_report(by_classifier, resumed.database, tmp_path / "clf-report", progress=False)  # nothing new
    conn = sqlite3.connect(resumed.database)
    assert conn.execute("SELECT COUNT(*) FROM ratings WHERE source = 'classifier'").fetchone()[0] == 24
    conn.close()

    # --reset forgets a row (refused while people's ratings would go with it, unless --force); the next run
    # trains and samples it again and the report is as before
    import study as study_cli

    command = ["--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "cut"), "--reset", "lora"]
    with pytest.raises(ConfigError, match=r"people gave 12 rating\(s\) to its images .* --force"):
        study_cli.main(command)
    assert lora_marker.is_file()
    assert study_cli.main([*command, "--force"]) == 0
    assert not (tmp_path / "cut" / "rows" / "lora").exists()
    assert not (tmp_path / "cut" / "dev" / "samples" / "lora").exists()
    again = run_study(study, tmp_path / "cut", progress=False)
    assert lora_marker.is_file() and again.images == whole.images
    # the rows' numbers as before (report.md and .csv now also hold the classifier's predictions)
    assert (again.report / "study.md").read_text() == (whole.report / "study.md").read_text()
