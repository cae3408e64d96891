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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import ConfigError
from library.fileio import write_text_atomic
from library.schema import job_toml, load_toml
from library.study.plan import DROPPED, Row, Study

log = logging.getLogger("pentadactyl")

TRAINED = "trained.json"
SAMPLED = ".sampled.json"  # hidden: `evaluate.py import` passes over it



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


def model_identity(study: Study) -> str:
    """The base model as the job hashes see it: its file (or folder) name and size in bytes."""
    path = study.model
    size = path.stat().st_size if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    return f"{path.name}:{size}"


def training_job(study: Study, row: Row, out: Path) -> tuple[str, dict[str, Any], str]:
    """A row's training job: (its text, its top-level keys, the hash that says whether it changed).

    sd-scripts' `[x_arguments]` sections are flattened first, so a key inside one counts like any other.
    The hash covers what decides the weights (keys, datasets, a dataset_config file's contents), not the
    comment nor the output folder: renaming a label or moving the project does not retrain anything."""
    from library.config import flatten_job_table
    from library.scripts import SCRIPTS

    assert row.job is not None and row.script is not None
    keys, tables = flatten_job_table(load_toml(row.job), SCRIPTS[row.script].fields)
    overrides = dict(row.overrides)
    general = {**tables.get("general", {}), **overrides.pop("general", {})}
    datasets = overrides.pop("datasets", tables.get("datasets"))
    keys.update(overrides)
    for key in DROPPED:
        keys.pop(key, None)
    keys["pretrained_model_name_or_path"] = str(study.model)
    keys["output_name"] = str(keys.get("output_name") or row.name)
    if row.checkpoints:
        keys["save_every_n_steps"] = math.gcd(*row.checkpoints)
        keys.pop("save_every_n_epochs", None)
    elif not keys.get("save_state"):
        keys.pop("save_every_n_steps", None)  # with save_state, the job's own interval saves its state
    # the model by name and size, not by where it lies: moving the project (or the model) retrains nothing
    identity = {"script": row.script, "keys": {**keys, "pretrained_model_name_or_path": model_identity(study)},
                "general": general, "datasets": datasets}
    if keys.get("dataset_config") and Path(keys["dataset_config"]).is_file():
        identity["dataset_config"] = _sha256(Path(keys["dataset_config"]).read_text(encoding="utf-8"))
    digest = _sha256(json.dumps(identity, sort_keys=True, default=str))
    keys = {**keys, "output_dir": str((out / "rows" / row.name).resolve())}
    comment = (f"Row '{row.name}' ({row.label}) of the study '{study.name}': {row.job.name}\n"
               "with the study's overrides, model, output folder and save interval. Written by study.py.")
    return job_toml(keys, general or None, datasets, comment), keys, digest


def artifact_kind(row: Row, keys: dict[str, Any]) -> str:
    if row.script == "train_textual_inversion":
        return "embedding"
    if row.script == "train_dreambooth" and keys.get("dreambooth_mode") == "full":
        return "checkpoint"
    return "network"


def _reset_hint(row: Row, study: Study) -> str:
    return f"python study.py --config {study.source} --reset {row.name}"


def train_row(study: Study, row: Row, out: Path) -> dict:
    """Train one row (or find it trained); its trained.json: job hash, final file, step → file."""
    text, keys, digest = training_job(study, row, out)
    folder = out / "rows" / row.name
    marker_path = folder / TRAINED
    marker = _read_marker(marker_path)
    if marker is not None:
        if marker["job_sha256"] != digest:
            raise ConfigError(f"row '{row.name}' was trained from another job than the study file now gives "
                              f"(the one it ran: {out / 'jobs' / (row.name + '.toml')}); put the study file back, "
                              f"or train the row again from scratch: {_reset_hint(row, study)}")
        log.info(f"study: {row.name}: trained already ({marker['global_step']} steps)")
        return marker
    argv = ["--config", str(out / "jobs" / f"{row.name}.toml")]
    state = folder / f"{keys['output_name']}-state"
    started = _read_marker(folder / ".started.json")
    if state.is_dir() and started is not None and started.get("job_sha256") == digest:
        log.info(f"study: {row.name}: resuming from {state}")  # Ctrl-C and crashes save it
        argv += ["--resume", str(state)]
    elif state.is_dir():
        log.warning(f"study: {row.name}: {state} is from another job; training from the start")
        shutil.rmtree(state)
    write_text_atomic(out / "jobs" / f"{row.name}.toml", text)
    write_text_atomic(folder / ".started.json", json.dumps({"job_sha256": digest}) + "\n")
    log.info(f"study: {row.name}: training ({row.script}.py {' '.join(argv)})")
    began = time.perf_counter()
    result = importlib.import_module(row.script).main(argv)
    final = Path(result.final_files[0])
    steps = {}
    for step in row.checkpoints:
        path = final.with_name(f"{keys['output_name']}-step{step:08d}{final.suffix}")
        if step < result.global_step and path.is_file():
            steps[str(step)] = path.name
        elif step < result.global_step:
            raise ConfigError(f"row '{row.name}': no file for checkpoint {step} ({path}); the job saved none there")
        elif step > result.global_step:
            log.warning(f"study: {row.name}: checkpoint {step} is past the end of training "
                        f"({result.global_step} steps); left out")
    if row.checkpoints:  # the save interval's by-products between the asked checkpoints
        for path in final.parent.glob(f"{keys['output_name']}-step*{final.suffix}"):
            if path.is_file() and path.name not in steps.values():
                path.unlink()
    marker = {"job_sha256": digest, "script": row.script, "kind": artifact_kind(row, keys),
              "output_name": keys["output_name"], "final": final.name, "global_step": result.global_step,
              "steps": steps, "seconds": round(time.perf_counter() - began, 1)}
    write_text_atomic(marker_path, json.dumps(marker, indent=1) + "\n")
    return marker


def points_of(row: Row, marker: dict | None, folder: Path | None = None) -> list[Point]:
    """The row's points; the marker's files are named relative to the row's folder (so a moved study folder
    still finds them), or absolute as earlier markers wrote them."""
    if marker is None:
        return [Point("base", None, "base", None)]
    kind, final_step = marker["kind"], marker["global_step"]
    where = (lambda name: folder / name if folder is not None and not Path(name).is_absolute() else Path(name))
    points = [Point(f"step{int(step):08d}", int(step), kind, where(path)) for step, path in marker["steps"].items()]
    multipliers = row.multipliers if kind == "network" else (1.0,)
    for m in multipliers:
        name = "final" if m == 1.0 else f"final-x{m:g}"
        points.append(Point(name, final_step, kind, where(marker["final"]), m))
    return points


def run_name(row: Row, point: Point) -> str:
    """The point's run in the rating database: the row, or `row@x0.75` for another multiplier, so that a
    row's table line and its score-by-step curve hold its weights at 1 only."""
    return row.name if point.multiplier == 1.0 else f"{row.name}@x{point.multiplier:g}"


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
        keys["embeddings"] = [str(folder.parent / ".embeddings" / point.name /
                                  f"{marker['output_name']}{point.path.suffix}")]
    return keys


def stage_embedding(point: Point, keys: dict[str, Any]) -> None:
    """Copy the checkpoint's embedding to the name its token needs (only when the point is sampled)."""
    from library.fileio import atomic_path

    if point.kind == "embedding":
        with atomic_path(keys["embeddings"][0]) as tmp:
            shutil.copyfile(point.path, tmp)


def sample_point(study: Study, row: Row, point: Point, seeds: tuple[int, ...], out: Path, seed_set: str,
                 marker: dict | None, progress: bool) -> Path:
    """Sample one point (or find it sampled from the same weights and sample settings)."""
    from library.config import load_job
    from library.sampling.run import run_sample_job

    folder = out / seed_set / "samples" / row.name / point.name
    keys = sample_keys(study, row, point, seeds, folder, marker)
    identity = _sha256(json.dumps({"weights": marker["job_sha256"] if marker else model_identity(study),
                                   "sample": {k: v for k, v in keys.items() if k not in (
                                       "networks", "embeddings", "pretrained_model_name_or_path", "output_dir")},
                                   "multiplier": point.multiplier}, sort_keys=True, default=str))
    done = _read_marker(folder / SAMPLED)
    if done is not None and done.get("identity") == identity:
        return folder
    if done is not None or any(folder.glob("*.png")):
        raise ConfigError(f"{folder} holds images of other weights or sample settings than the study file now "
                          f"gives; put the study file back, or sample the row again: {_reset_hint(row, study)}")
    stage_embedding(point, keys)
    job_path = out / "jobs" / f"sample_{seed_set}_{row.name}_{point.name}.toml"
    write_text_atomic(job_path, job_toml(keys, comment=f"Images of row '{row.name}' at {point.name} "
                                                       f"({seed_set} seeds). Written by study.py."))
    log.info(f"study: {row.name}: sampling {point.name} ({len(study.prompts)} prompts × {len(seeds)} seeds)")
    result = run_sample_job(load_job("sample", ["--config", str(job_path)]), progress=progress)
    write_text_atomic(folder / SAMPLED, json.dumps({"identity": identity, "images": len(result.images),
                                                    "step": point.step, "multiplier": point.multiplier}) + "\n")
    return folder


def import_point(conn, folder: Path, run: str, step: int | None) -> None:
    from library.evaluate.importer import find_files, import_files

    summary = import_files(conn, find_files([folder], run), progress=False)
    if summary.skipped:
        raise ConfigError(f"{folder}: {len(summary.skipped)} file(s) could not be imported, e.g. "
                          f"{summary.skipped[0][0]}: {summary.skipped[0][1]}")
    prefix = os.path.join(str(folder.resolve()), "")
    conn.execute("UPDATE images SET training_step = ? WHERE run = ? AND substr(path, 1, ?) = ?",
                 (step, run, len(prefix), prefix))


def reset_row(study: Study, row_name: str, out: Path, force: bool = False) -> list[str]:
    """Forget a row: its training outputs, its images (every seed set) and their database records.
    People's ratings are deleted only with `force`; without it a row they rated is refused."""
    from library.evaluate.db import connect

    if row_name not in {r.name for r in study.rows}:
        raise ConfigError(f"--reset {row_name}: no such row (rows: {', '.join(r.name for r in study.rows)})")
    done: list[str] = []
    runs_like = (row_name, f"{row_name}@%")
    databases = [out / s / "ratings.sqlite" for s in ("dev", "test") if (out / s / "ratings.sqlite").is_file()]
    for database in databases:
        conn = connect(database)
        try:
            ids = [r[0] for r in conn.execute("SELECT id FROM images WHERE run = ? OR run LIKE ?", runs_like)]
            marks = ",".join("?" * len(ids))
            human = conn.execute(f"SELECT COUNT(*) FROM ratings WHERE source = 'human' AND image_id IN ({marks})",
                                 ids).fetchone()[0] if ids else 0
            if human and not force:
                raise ConfigError(f"--reset {row_name}: people gave {human} rating(s) to its images in {database}; "
                                  "add --force to delete them with the row")
            with conn:
                for table in ("ratings", "predictions", "metrics", "skips"):
                    conn.execute(f"DELETE FROM {table} WHERE image_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM images WHERE id IN ({marks})", ids)
                conn.execute("DELETE FROM set_metrics WHERE run = ? OR run LIKE ?", runs_like)
            done.append(f"{len(ids)} image record(s) in {database}")
        finally:
            conn.close()
    for folder in [out / "rows" / row_name, *(out / s / "samples" / row_name for s in ("dev", "test"))]:
        if folder.exists():
            shutil.rmtree(folder)
            done.append(str(folder))
    return done


@dataclass
class StudyOutcome:
    database: Path
    report: Path | None  # None: images still await ratings
    images: int
    unrated: int


def judge_and_report(study: Study, database: Path, report_dir: Path, progress: bool) -> StudyOutcome:
    from library.evaluate.db import connect
    from library.evaluate.export import rate_with_counter
    from library.evaluate.report import build_report, write_report

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
    table = study_table(study, report.groups)
    write_text_atomic(report_dir / "study.md", f"# Study {study.name}: {report_dir.parent.name} seeds, judged by "
                                               f"{study.judge}\n\n{table}\nEvery group: report.md.\n")
    print(table, end="")
    print(f"study: report in {report_dir} (study.md: each row at its final weights; report.md: every group)")
    return StudyOutcome(database, report_dir, images, 0)


def study_table(study: Study, groups) -> str:
    """One line per run at its final weights (the last training step), in the study file's row order:
    the headline table, where report.md's run lines pool every checkpoint of a row."""
    from library.evaluate.report import _with_ci

    labels = {r.name: r.label for r in study.rows}
    order = {r.name: i for i, r in enumerate(study.rows)}
    by_run: dict[str, list] = {}
    for g in groups:
        by_run.setdefault(g.run, []).append(g)
    lines = ["| row | run | step | images | mean score [95 % CI] | rated 1 | rated ≥ ½ |",
             "|---|---|---:|---:|---|---|---|"]
    for run in sorted(by_run, key=lambda r: (order.get(r.split("@")[0], len(order)), r)):
        steps = [g for g in by_run[run] if g.kind == "training_step" and g.training_step is not None]
        g = max(steps, key=lambda g: g.training_step) if steps else next(g for g in by_run[run] if g.kind == "run")
        row = run.split("@")[0]
        label = labels.get(row, row) + (f" ×{run.split('@x')[1]}" if "@x" in run else "")
        lines.append(f"| {label} | {run} | {'—' if g.training_step is None else g.training_step} | {g.images} | "
                     f"{_with_ci(g.mean, g.mean_ci)} | {_with_ci(g.share_1, g.share_1_ci, True)} | "
                     f"{_with_ci(g.share_half, g.share_half_ci, True)} |")
    return "\n".join(lines) + "\n"


def run_study(study: Study, out: Path, seed_set: str = "dev", only: tuple[str, ...] = (),
              progress: bool = True) -> StudyOutcome:
    """Every row of the study (or those named in `only`), then the judge and the report of `seed_set`."""
    from tqdm import tqdm

    from library.evaluate.db import connect

    seeds = study.seeds.get(seed_set)
    if not seeds:
        raise ConfigError(f"--seeds {seed_set}: the study file has no [seeds] {seed_set} = {{start = …, count = …}}")
    if not study.model.exists():
        raise ConfigError(f"{study.source} [study] model: {study.model} does not exist; put the base model there "
                          "or change model = \"…\"")
    rows = [r for r in study.rows if not only or r.name in only]
    unknown = sorted(set(only) - {r.name for r in study.rows})
    if unknown:
        raise ConfigError(f"--rows {', '.join(unknown)}: no such row (rows: {', '.join(r.name for r in study.rows)})")
    out.mkdir(parents=True, exist_ok=True)
    database = out / seed_set / "ratings.sqlite"
    database.parent.mkdir(parents=True, exist_ok=True)
    for row in tqdm(rows, desc="study rows", unit="row", disable=not progress):
        marker = train_row(study, row, out) if row.script else None
        for point in points_of(row, marker, out / "rows" / row.name):
            folder = sample_point(study, row, point, seeds, out, seed_set, marker, progress)
            conn = connect(database)
            try:
                import_point(conn, folder, run_name(row, point), point.step)
            finally:
                conn.close()
    return judge_and_report(study, database, out / seed_set / "report", progress)


def describe_plan(study: Study, seed_set: str) -> str:
    """What the study will do, row by row, without loading anything."""
    seeds = study.seeds.get(seed_set, ())
    per_point = len(study.prompts) * len(seeds)
    from library.study.estimate import CPU, estimate_row, format_duration, identify_model

    figures, how = identify_model(study.model)
    lines = [f"study {study.name}: model {study.model}, judge {study.judge}, {len(study.prompts)} prompts × "
             f"{len(seeds)} {seed_set} seeds = {per_point} images per checkpoint"]
    total, seconds, unknown = 0, 0.0, []
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
        guess = estimate_row(study, row, seed_set, figures) if figures else None
        took = "" if guess is None else (f"; about {format_duration(guess.train_seconds)} training + "
                                         f"{format_duration(guess.sample_seconds)} sampling")
        if guess is not None and guess.train_seconds is not None and guess.sample_seconds is not None:
            seconds += guess.total_seconds
        elif guess is not None:
            unknown.append(row.name)
        lines.append(f"  {row.name} ({row.label}): {what}; {points * per_point} images{took}")
    lines.append(f"  in all: {total} images to sample and judge")
    if figures is None:
        lines.append(f"  time: no estimate ({how})")
    else:
        rest = f" (no estimate for {', '.join(unknown)})" if unknown else ""
        lines.append(f"  time: about {format_duration(seconds)}{rest}, from {figures.name} figures measured on "
                     f"{CPU} ({how}; GPU figures are not measured yet); see library/study/estimate.py")
    return "\n".join(lines)
