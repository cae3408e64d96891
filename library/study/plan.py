"""The study file: what a study trains, samples and judges, read and checked before anything runs.

    [study]                       name, model (the base checkpoint every row starts from), judge, classifier, out
    [seeds]                       dev = {start = 1000, count = 8}; test = {start = 5000, count = 8} (or lists)
    [sample]                      sample.py keys used for every image (prompts, sampler, steps, cfg_scale, …)
    [[rows]]                      name, label, script, job, overrides, checkpoints, multipliers,
                                  prompt_template, negative_prompt; a row without a job is the base model

Every mistake is collected and reported at once, each with its table and key and what would fix it.
Paths in the study file (model, jobs, out) are taken from the folder the command runs in, as in job files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import ConfigError
from library.schema import check_value, load_toml
from library.scripts import SCRIPTS

JUDGES = ("ratings", "counter", "classifier")  # people on `evaluate.py serve`, the toy world's finger counter,
# or a classifier made by `evaluate.py train-classifier` ([study] classifier = "folder")
TRAINING_SCRIPTS = ("train_network", "train_textual_inversion", "train_dreambooth")
SEED_SETS = ("dev", "test")
# sample keys the study sets itself for every image
STUDY_SAMPLE_KEYS = {"pretrained_model_name_or_path", "output_dir", "output_name", "seeds", "networks",
                     "embeddings", "sweep_multipliers", "sweep_network", "grid"}
# keys of a row's job the study replaces: it samples the checkpoints itself and keeps the files it asks for
DROPPED = ("sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
           "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs", "resume")
# keys the study sets for every row: an override would be lost, so it is refused
STUDY_OWNED = ("pretrained_model_name_or_path", "output_dir", "save_every_n_steps", *DROPPED)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STUDY_KEYS = {"name", "model", "judge", "classifier", "out"}
_ROW_KEYS = {"name", "label", "script", "job", "overrides", "checkpoints", "multipliers", "prompt_template",
             "negative_prompt"}


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    script: str | None = None  # None: the base model, sampled as it is
    job: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoints: tuple[int, ...] = ()  # training steps sampled besides the final weights
    multipliers: tuple[float, ...] = (1.0,)  # the final LoRA's multipliers (LoRA rows only)
    prompt_template: str = "{prompt}"
    negative_prompt: str | None = None  # None: the [sample] table's


@dataclass(frozen=True)
class Study:
    source: Path
    name: str
    model: Path
    judge: str
    out: Path
    classifier: Path | None
    seeds: dict[str, tuple[int, ...]]
    sample: dict[str, Any]
    rows: tuple[Row, ...]

    @property
    def prompts(self) -> list[str]:
        return list(self.sample["prompts"])


def _unknown(table: dict, allowed: set[str], where: str, errors: list[str]) -> None:
    for key in sorted(set(table) - allowed):
        errors.append(f"{where}: unknown key '{key}' (known: {', '.join(sorted(allowed))})")


def _seeds(value: Any, where: str, errors: list[str]) -> tuple[int, ...]:
    if isinstance(value, dict) and set(value) == {"start", "count"}:
        start, count = value["start"], value["count"]
        if isinstance(start, int) and isinstance(count, int) and count >= 1 and start >= 0:
            return tuple(range(start, start + count))
    elif isinstance(value, list) and value and all(isinstance(s, int) and s >= 0 for s in value):
        if len(set(value)) == len(value):
            return tuple(value)
    errors.append(f"{where}: give {{start = 1000, count = 8}} or a list of distinct seeds such as [1, 2, 3]")
    return ()


def _row(table: Any, index: int, base: Path, errors: list[str]) -> Row | None:
    where = f"[[rows]] #{index + 1}"
    if not isinstance(table, dict):
        errors.append(f"{where}: a row is a table with at least name and label")
        return None
    name = table.get("name")
    if isinstance(name, str) and _NAME.match(name):
        where = f"[[rows]] '{name}'"
    else:
        errors.append(f"{where}: name = {name!r}: give a short name of letters, digits, '.', '_' or '-' "
                      "(it names the row's folders and its run in the rating database)")
        name = f"row{index + 1}"
    _unknown(table, _ROW_KEYS, where, errors)
    label = table.get("label", name)
    script, job = table.get("script"), table.get("job")
    if (script is None) != (job is None):
        errors.append(f"{where}: give both script and job (a trained row), or neither (the base model)")
    if script is not None and script not in TRAINING_SCRIPTS:
        errors.append(f"{where}: script = {script!r}: choose one of {', '.join(TRAINING_SCRIPTS)}")
    job_path = None
    if isinstance(job, str):
        job_path = (base / job).resolve()
        if not job_path.is_file():
            errors.append(f"{where}: job = {job!r}: no such file ({job_path}); paths are taken from the folder "
                          "you run the command from")
    overrides = table.get("overrides", {})
    if not isinstance(overrides, dict):
        errors.append(f"{where}: overrides must be a table of job keys, e.g. {{ max_train_steps = 5000 }}")
        overrides = {}
    elif script in SCRIPTS:
        fields = SCRIPTS[script].fields
        for key in sorted(overrides):
            if key in ("general", "datasets"):
                continue
            if key not in fields:
                errors.append(f"{where}: overrides.{key} is not a key of {script}.py jobs")
            elif key in STUDY_OWNED:
                errors.append(f"{where}: overrides.{key}: the study sets it for every row (the model in [study], "
                              "the save interval from checkpoints, samples from [sample]); leave it out")
            else:
                try:
                    check_value(key, overrides[key], fields[key], f"{where}: overrides")
                except ConfigError as exc:
                    errors.append(str(exc))
    checkpoints = table.get("checkpoints", [])
    if not (isinstance(checkpoints, list) and all(isinstance(s, int) and s >= 1 for s in checkpoints)):
        errors.append(f"{where}: checkpoints must be a list of training steps such as [500, 1000]")
        checkpoints = []
    multipliers = table.get("multipliers", [1.0])
    if not (isinstance(multipliers, list) and multipliers
            and all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in multipliers)):
        errors.append(f"{where}: multipliers must be a list of numbers such as [0.5, 1.0]")
        multipliers = [1.0]
    template = table.get("prompt_template", "{prompt}")
    if not isinstance(template, str) or "{prompt}" not in template:
        errors.append(f"{where}: prompt_template must contain {{prompt}}, e.g. \"{{prompt}}, handpalm\"")
        template = "{prompt}"
    negative = table.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        errors.append(f"{where}: negative_prompt must be text")
    return Row(name, str(label), script, job_path, dict(overrides), tuple(sorted(set(checkpoints))),
               tuple(float(m) for m in multipliers), template, negative)


def load_study(path: str | Path, base: str | Path | None = None) -> Study:
    """The study file at `path`, checked; a ConfigError lists every problem found. Its model and job paths
    are taken from `base` (default: the folder the command runs in); its `out` always from that folder."""
    path = Path(path)
    table = load_toml(path)
    base = Path(base) if base is not None else Path.cwd()
    errors: list[str] = []
    _unknown(table, {"study", "seeds", "sample", "rows"}, "study file", errors)
    head = table.get("study", {})
    _unknown(head, _STUDY_KEYS, "[study]", errors)
    model = head.get("model")
    if not isinstance(model, str):
        errors.append("[study]: model = \"models/v1-5-pruned-emaonly.safetensors\" (the base model of every row) "
                      "is missing")
        model = ""
    judge = head.get("judge", "ratings")
    if judge not in JUDGES:
        errors.append(f"[study]: judge = {judge!r}: choose 'ratings' (people, on `evaluate.py serve`), 'counter' "
                      "(the toy hand world's finger counter) or 'classifier' (with classifier = \"folder\")")
    classifier = head.get("classifier")
    if judge == "classifier" and not isinstance(classifier, str):
        errors.append("[study]: judge = 'classifier' needs classifier = \"clf\", the folder `evaluate.py "
                      "train-classifier --out clf` wrote")
    elif judge == "classifier" and not Path(classifier).is_dir():
        errors.append(f"[study]: classifier = {classifier!r}: no such folder; train one with `evaluate.py "
                      "train-classifier --db ratings.sqlite --out clf`")
    seeds_table = table.get("seeds", {})
    _unknown(seeds_table, set(SEED_SETS), "[seeds]", errors)
    seeds = {name: _seeds(seeds_table[name], f"[seeds] {name}", errors) for name in SEED_SETS if name in seeds_table}
    if "dev" not in seeds_table:
        errors.append("[seeds]: dev = {start = 1000, count = 8} is missing (the seeds runs are compared on; "
                      "test holds fresh seeds for the final numbers)")
    if seeds.get("dev") and seeds.get("test") and set(seeds["dev"]) & set(seeds["test"]):
        errors.append("[seeds]: dev and test share seeds; the test seeds must be fresh")
    sample = dict(table.get("sample", {}))
    for key in sorted(set(sample) - set(SCRIPTS["sample"].fields)):
        errors.append(f"[sample]: '{key}' is not a sample.py job key")
    for key in sorted(set(sample) & STUDY_SAMPLE_KEYS):
        errors.append(f"[sample]: '{key}' is set by the study for each row; leave it out")
    prompts = sample.get("prompts")
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        errors.append("[sample]: prompts = [\"a photo of a hand\", …] is missing (every row samples every prompt "
                      "on every seed)")
    rows_table = table.get("rows", [])
    rows = [r for i, t in enumerate(rows_table if isinstance(rows_table, list) else [])
            if (r := _row(t, i, base, errors)) is not None]
    if not rows:
        errors.append("[[rows]]: the study has no rows")
    names = [r.name for r in rows]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"[[rows]]: the name '{name}' is used twice")
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    out = head.get("out", f"study_{head.get('name', path.stem)}")
    return Study(path, str(head.get("name", path.stem)), (base / model).resolve(), judge, Path(out),
                 Path(classifier) if judge == "classifier" else None, seeds, sample, tuple(rows))
