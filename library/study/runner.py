"""Running a study: for every row, train → sample every checkpoint → import; then judge and report.

Folders under the study's output folder OUT:

    OUT/jobs/<row>.toml                   the training job each row ran (its job file, the overrides, the study's
                                          model, output folder and save interval): run it by hand to reproduce
    OUT/rows/<row>/                       what training wrote, and trained.json once it is complete
    OUT/<seeds>/samples/<row>/<point>/    the PNGs of one checkpoint (step00000500, final, final-x0.5 …), and
                                          .sampled.json once every image is there
    OUT/<seeds>/ratings.sqlite            the rating database (one run per row), for `evaluate.py serve`
    OUT/<seeds>/report/                   `evaluate.py report`'s files, once every image is judged

<seeds> is dev or test (`--seeds`): choose settings on dev, report on test. Each step ends with a marker file
written last and atomically, so a rerun after a crash, a Ctrl-C or a power cut skips what is complete and
redoes only the step that was cut short; a row's training that was cut short starts again from its saved
state when the job saves one (`save_state = true`), else from the beginning.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import ConfigError
from library.fileio import write_text_atomic
from library.schema import job_toml, load_toml
from library.study.plan import Row, Study

log = logging.getLogger("pentadactyl")

TRAINED = "trained.json"
SAMPLED = ".sampled.json"  # hidden: `evaluate.py import` passes over it
# keys of a row's job the study replaces: it samples the checkpoints itself, and keeps every periodic file
_DROPPED = ("sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
            "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs", "resume")


@dataclass(frozen=True)
class Point:
    """One set of images of a row: its weights at one training step, at one multiplier."""

    name: str  # the folder: base, step00000500, final, final-x0.5
    step: int | None
    kind: str  # "base", "network", "embedding" or "checkpoint"
    path: Path | None
    multiplier: float = 1.0


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a marker is written atomically: anything unreadable is redone
        return None


def training_job(study: Study, row: Row, out: Path) -> tuple[str, dict[str, Any]]:
    """The text of a row's training job and its top-level keys."""
    assert row.job is not None
    table = load_toml(row.job)
    overrides = dict(row.overrides)
    general = {**table.pop("general", {}), **overrides.pop("general", {})}
    datasets = overrides.pop("datasets", table.pop("datasets", None))
    keys = {**table, **overrides}
    for key in _DROPPED:
        keys.pop(key, None)
    keys["pretrained_model_name_or_path"] = str(study.model)
    keys["output_dir"] = str((out / "rows" / row.name).resolve())
    keys["output_name"] = str(keys.get("output_name") or row.name)
    keys.pop("save_every_n_steps", None)
    if row.checkpoints:
        keys["save_every_n_steps"] = math.gcd(*row.checkpoints)
    comment = (f"Row '{row.name}' ({row.label}) of the study '{study.name}': {row.job.name}\n"
               "with the study's overrides, model, output folder and save interval. Written by study.py.")
    return job_toml(keys, general or None, datasets, comment), keys


def artifact_kind(row: Row, keys: dict[str, Any]) -> str:
    if row.script == "train_textual_inversion":
        return "embedding"
    if row.script == "train_dreambooth" and keys.get("dreambooth_mode") == "full":
        return "checkpoint"
    return "network"


def train_row(study: Study, row: Row, out: Path) -> dict:
    """Train one row (or find it trained); its trained.json: job hash, final file, step → file."""
    text, keys = training_job(study, row, out)
    folder = out / "rows" / row.name
    marker_path = folder / TRAINED
    marker = _read_marker(marker_path)
    if marker is not None:
        if marker["job_sha256"] != _sha256(text):
            raise ConfigError(f"row '{row.name}' was trained from another job than the study file now gives "
                              f"(see {out / 'jobs' / (row.name + '.toml')}); put the study file back, or delete "
                              f"{folder} to train the row again")
        log.info(f"study: {row.name}: trained already ({marker['global_step']} steps)")
        return marker
    job_path = out / "jobs" / f"{row.name}.toml"
    write_text_atomic(job_path, text)
    argv = ["--config", str(job_path)]
    state = folder / f"{keys['output_name']}-state"
    if keys.get("save_state") and state.is_dir():
        log.info(f"study: {row.name}: resuming from {state}")
        argv += ["--resume", str(state)]
    log.info(f"study: {row.name}: training ({row.script}.py --config {job_path})")
    began = time.perf_counter()
    result = importlib.import_module(row.script).main(argv)
    if result.interrupted:
        raise KeyboardInterrupt
    final = Path(result.final_files[0])
    steps = {}
    for step in row.checkpoints:
        path = final.with_name(f"{keys['output_name']}-step{step:08d}{final.suffix}")
        if step < result.global_step and path.is_file():
            steps[str(step)] = str(path)
        elif step < result.global_step:
            raise ConfigError(f"row '{row.name}': no file for checkpoint {step} ({path}); the job saved none there")
        elif step > result.global_step:
            log.warning(f"study: {row.name}: checkpoint {step} is past the end of training "
                        f"({result.global_step} steps); left out")
    marker = {"job_sha256": _sha256(text), "script": row.script, "kind": artifact_kind(row, keys),
              "output_name": keys["output_name"], "final": str(final), "global_step": result.global_step,
              "steps": steps, "seconds": round(time.perf_counter() - began, 1)}
    write_text_atomic(marker_path, json.dumps(marker, indent=1) + "\n")
    return marker


def points_of(row: Row, marker: dict | None) -> list[Point]:
    if marker is None:
        return [Point("base", None, "base", None)]
    kind, final_step = marker["kind"], marker["global_step"]
    points = [Point(f"step{int(step):08d}", int(step), kind, Path(path)) for step, path in marker["steps"].items()]
    multipliers = row.multipliers if kind == "network" else (1.0,)
    for m in multipliers:
        name = "final" if m == 1.0 else f"final-x{m:g}"
        points.append(Point(name, final_step, kind, Path(marker["final"]), m))
    return points


def sample_keys(study: Study, row: Row, point: Point, seeds: tuple[int, ...], folder: Path,
                marker: dict | None) -> dict[str, Any]:
    keys: dict[str, Any] = {**study.sample, "pretrained_model_name_or_path": str(study.model),
                            "output_dir": str(folder), "output_name": row.name, "seeds": list(seeds), "grid": False}
    keys["prompts"] = [row.prompt_template.replace("{prompt}", p) for p in study.prompts]
    if row.negative_prompt is not None:
        keys["negative_prompt"] = row.negative_prompt
    if point.kind == "network":
        keys["networks"] = [f"{point.path}:{point.multiplier:g}"]
    elif point.kind == "checkpoint":
        keys["pretrained_model_name_or_path"] = str(point.path)
    elif point.kind == "embedding":
        # the prompt's token is the file's name: every checkpoint is staged under the final file's name
        assert point.path is not None and marker is not None
        staged = folder.parent / ".embeddings" / point.name / f"{marker['output_name']}{point.path.suffix}"
        if not staged.is_file():
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(point.path, staged)
        keys["embeddings"] = [str(staged)]
    return keys


def sample_point(study: Study, row: Row, point: Point, seeds: tuple[int, ...], out: Path, seed_set: str,
                 marker: dict | None, progress: bool) -> Path:
    from library.config import load_job
    from library.sampling.run import run_sample_job

    folder = out / seed_set / "samples" / row.name / point.name
    if _read_marker(folder / SAMPLED) is not None:
        return folder
    keys = sample_keys(study, row, point, seeds, folder, marker)
    job_path = out / "jobs" / f"sample_{seed_set}_{row.name}_{point.name}.toml"
    write_text_atomic(job_path, job_toml(keys, comment=f"Images of row '{row.name}' at {point.name} "
                                                       f"({seed_set} seeds). Written by study.py."))
    log.info(f"study: {row.name}: sampling {point.name} ({len(study.prompts)} prompts × {len(seeds)} seeds)")
    result = run_sample_job(load_job("sample", ["--config", str(job_path)]), progress=progress)
    write_text_atomic(folder / SAMPLED, json.dumps({"images": len(result.images), "step": point.step,
                                                    "multiplier": point.multiplier}) + "\n")
    return folder


def import_point(conn, folder: Path, run: str, step: int | None) -> None:
    from library.evaluate.importer import find_files, import_files

    summary = import_files(conn, find_files([folder], run), progress=False)
    if summary.skipped:
        raise ConfigError(f"{folder}: {len(summary.skipped)} file(s) could not be imported, e.g. "
                          f"{summary.skipped[0][0]}: {summary.skipped[0][1]}")
    prefix = str(folder.resolve()) + "/"
    conn.execute("UPDATE images SET training_step = ? WHERE run = ? AND substr(path, 1, ?) = ?",
                 (step, run, len(prefix), prefix))


@dataclass
class StudyOutcome:
    database: Path
    report: Path | None  # None: images still await ratings
    images: int
    unrated: int


def judge_and_report(study: Study, database: Path, report_dir: Path, progress: bool) -> StudyOutcome:
    from library.evaluate.db import connect
    from library.evaluate.export import rate_with_counter
    from library.evaluate.report import build_report, markdown_table, write_report

    conn = connect(database)
    try:
        images = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        if study.judge == "counter":
            rate_with_counter(conn, progress=progress)
            source = "counter"
        elif study.judge == "classifier":
            from library.evaluate.classifier import rate_with_classifier

            rate_with_classifier(conn, database, study.classifier)
            source = "classifier"
        else:
            source = "human"
        unrated = conn.execute("SELECT COUNT(*) FROM images WHERE id NOT IN "
                               "(SELECT image_id FROM ratings WHERE source = ?)", (source,)).fetchone()[0]
        if unrated:
            print(f"study: {unrated} of {images} images await ratings: python evaluate.py serve --db {database}\n"
                  "then run the same study command again to write the report")
            return StudyOutcome(database, None, images, unrated)
        report = build_report(conn, source)
    finally:
        conn.close()
    write_report(report, report_dir)
    print(markdown_table(report.groups), end="")
    print(f"study: report in {report_dir}")
    return StudyOutcome(database, report_dir, images, 0)


def run_study(study: Study, out: Path, seed_set: str = "dev", only: tuple[str, ...] = (),
              progress: bool = True) -> StudyOutcome:
    """Every row of the study (or those named in `only`), then the judge and the report of `seed_set`."""
    from tqdm import tqdm

    from library.evaluate.db import connect

    seeds = study.seeds.get(seed_set)
    if not seeds:
        raise ConfigError(f"--seeds {seed_set}: the study file has no [seeds] {seed_set} = {{start = …, count = …}}")
    rows = [r for r in study.rows if not only or r.name in only]
    unknown = sorted(set(only) - {r.name for r in study.rows})
    if unknown:
        raise ConfigError(f"--rows {', '.join(unknown)}: no such row (rows: {', '.join(r.name for r in study.rows)})")
    out.mkdir(parents=True, exist_ok=True)
    database = out / seed_set / "ratings.sqlite"
    database.parent.mkdir(parents=True, exist_ok=True)
    for row in tqdm(rows, desc="study rows", unit="row", disable=not progress):
        marker = train_row(study, row, out) if row.script else None
        for point in points_of(row, marker):
            folder = sample_point(study, row, point, seeds, out, seed_set, marker, progress)
            conn = connect(database)
            try:
                import_point(conn, folder, row.name, point.step)
            finally:
                conn.close()
    return judge_and_report(study, database, out / seed_set / "report", progress)


def describe_plan(study: Study, seed_set: str) -> str:
    """What the study will do, row by row, without loading anything."""
    seeds = study.seeds.get(seed_set, ())
    per_point = len(study.prompts) * len(seeds)
    lines = [f"study {study.name}: model {study.model}, judge {study.judge}, {len(study.prompts)} prompts × "
             f"{len(seeds)} {seed_set} seeds = {per_point} images per checkpoint"]
    total = 0
    for row in study.rows:
        if row.script is None:
            points, what = 1, "the base model"
        else:
            table = {**load_toml(row.job), **row.overrides} if row.job else {}
            steps = table.get("max_train_steps")
            length = f"{steps} steps" if steps else f"{table.get('max_train_epochs', '?')} epochs"
            multipliers = row.multipliers if row.script == "train_network" or (
                row.script == "train_dreambooth" and table.get("dreambooth_mode", "lora") == "lora") else (1.0,)
            saved = [c for c in row.checkpoints if not isinstance(steps, int) or c < steps]
            points = len(saved) + len(multipliers)
            what = (f"{row.script}.py, {length}, checkpoints {saved or '—'}, "
                    f"multipliers {[f'{m:g}' for m in multipliers]}")
        total += points * per_point
        lines.append(f"  {row.name} ({row.label}): {what}; {points * per_point} images")
    lines.append(f"  in all: {total} images to sample and judge")
    return "\n".join(lines)
