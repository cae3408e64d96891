"""Job configuration: one TOML file (plus command-line overrides) → one validated, read-only `Job`.

    job = load_job("train_network", sys.argv[1:])   # scripts use library.cli.job_from_command_line (it adds --print_config)
    job.learning_rate, job.datasets, job.source

Keys use sd-scripts' argument names, so an existing sd-scripts config mostly works. sd-scripts'
section tables (`[model_arguments]`, `[training_arguments]`, …) are flattened. Every key is checked
once, here: unknown keys get "did you mean", wrong types the expected type, with the file and line.
Inner code receives typed values and never re-parses.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from library.dataset import resolve_datasets
from library.errors import ConfigError, PentadactylError
from library.schema import (
    SWITCHED_OFF, Field, Unsupported, check_key, check_unsupported, check_value, did_you_mean, load_toml,
    parse_cli_value, raise_all, toml_value,
)
from library.scripts import SCRIPTS, ScriptSchema

# Tables of a job file that hold datasets rather than job keys.
DATASET_TABLES = ("general", "datasets")

# sd-scripts keys we deliberately do not support: using one is an error that says why.
UNSUPPORTED: dict[str, Unsupported] = {
    "v2": Unsupported("SD2.x models are not supported; pentadactyl trains SD1.x."),
    "v_parameterization": Unsupported("v-prediction is an SD2.x feature; SD1.x predicts noise (epsilon)."),
    "sdxl": Unsupported("SDXL is not supported; pentadactyl trains SD1.x."),
    "deepspeed": Unsupported("DeepSpeed is not integrated; use DDP (accelerate launch --num_processes N)."),
    "fp8_base": Unsupported("fp8 base weights are not supported; use mixed_precision = \"bf16\"."),
    "lowram": Unsupported("not needed: models are built on the meta device and loaded straight into place.",
                          passed_over=True),
    "highvram": Unsupported("not needed: latents are cached in memory unless cache_latents_to_disk is set.",
                            passed_over=True),
    "persistent_data_loader_workers": Unsupported("images load in threads of the training process; "
                                                  "max_data_loader_n_workers sets how many.",
                                                  passed_over=True),
    "wandb_api_key": Unsupported("only TensorBoard logging is built in (log_with = \"tensorboard\")."),
    "huggingface_repo_id": Unsupported("uploading to a hub is not supported; the toolkit works offline."),
    "huggingface_token": Unsupported("uploading to a hub is not supported; the toolkit works offline."),
    "dim_from_weights": Unsupported("give network_dim explicitly; network_weights must match it."),
    "mem_eff_attn": Unsupported("attention is memory-efficient already: sdpa = true (torch's fused attention, the "
                                "default) or xformers = true.", passed_over=True),
    "masked_loss": Unsupported("masked loss is not implemented yet."),
    "full_fp16": Unsupported("pure-fp16 training is unstable; use mixed_precision = \"fp16\" or \"bf16\"."),
    "full_bf16": Unsupported("trainable weights stay fp32; mixed_precision = \"bf16\" keeps frozen weights in bf16."),
    "lr_scheduler_args": Unsupported("extra scheduler arguments are not read; the schedules take lr_warmup_steps, "
                                     "lr_scheduler_num_cycles and lr_scheduler_power."),
    "lr_scheduler_type": Unsupported("custom scheduler classes are not loaded; choose an lr_scheduler by name."),
    # other sd-scripts scripts' keys, and features of other model families or of the hub
    "zero_terminal_snr": Unsupported("it rescales the noise schedule for v-prediction models (SD2.x); SD1.x "
                                     "predicts noise and keeps its schedule."),
    "v_pred_like_loss": Unsupported("a v-prediction loss term; SD1.x predicts noise (epsilon)."),
    "scale_v_pred_loss_like_noise_pred": Unsupported("a v-prediction loss scale; SD1.x predicts noise (epsilon)."),
    "fused_backward_pass": Unsupported("an SDXL full fine-tuning memory option of sd-scripts; not implemented."),
    "cpu_offload_checkpointing": Unsupported("an SD3/FLUX option of sd-scripts; use gradient_checkpointing."),
    "mem_eff_save": Unsupported("an SDXL full-model saving option of sd-scripts; files are written atomically."),
    "torch_compile": Unsupported("the U-Net is not torch.compiled (see dynamo_backend); attention is already fused."),
    "base_weights": Unsupported("LoRAs are not merged into the model before training; merge them first with "
                                "networks/merge.py --sd_model … and train on the merged checkpoint."),
    "base_weights_multiplier": Unsupported("see base_weights: merge with networks/merge.py --ratios first."),
    "initial_epoch": Unsupported("start a new run from weights with network_weights, or resume a state exactly "
                                 "with resume = \"…-state\"."),
    "initial_step": Unsupported("start a new run from weights with network_weights, or resume a state exactly "
                                "with resume = \"…-state\"."),
    "skip_until_initial_step": Unsupported("resume = \"…-state\" continues at the exact step and sample."),
    "save_n_epoch_ratio": Unsupported("use save_every_n_epochs or save_every_n_steps."),
    "save_last_n_epochs_state": Unsupported("states are kept as save_state writes them; delete old ones by hand."),
    "save_last_n_steps_state": Unsupported("states are kept as save_state writes them; delete old ones by hand."),
    "ddp_timeout": Unsupported("the process-group timeout is accelerate's default; set it in accelerate config."),
    "lr_decay_steps": Unsupported("choose an lr_scheduler by name (linear, cosine, polynomial, …)."),
    "lr_scheduler_min_lr_ratio": Unsupported("choose an lr_scheduler by name; the schedules decay to 0."),
    "lr_scheduler_timescale": Unsupported("choose an lr_scheduler by name (the inverse-sqrt schedule is not built in)."),
    "validate_every_n_epochs": Unsupported("use validation_split with validate_every_n_steps."),
    "validation_seed": Unsupported("the validation loss uses fixed timesteps and noise from the run's seed."),
    "max_validation_steps": Unsupported("the whole validation_split is evaluated each time."),
    "output_config": Unsupported("use --print_config > job.toml: it prints the resolved job as TOML."),
    "config_file": Unsupported("give the job file on the command line: --config job.toml."),
    "dataset_class": Unsupported("custom dataset classes are not loaded; describe the data with [[datasets]]."),
    "learning_rate_te": Unsupported("train_db.py's key; use text_encoder_lr."),
    "train_text_encoder": Unsupported("train_db.py's key; the text encoder trains unless text_encoder_lr = 0 or "
                                      "network_train_unet_only = true."),
    "dataset_repeats": Unsupported("fine_tune.py's key; set num_repeats in the subset."),
    "full_path": Unsupported("a metadata-preparation option; a subset's metadata_file accepts full paths and names."),
    "save_state_to_huggingface": Unsupported("uploading to a hub is not supported; the toolkit works offline."),
    "resume_from_huggingface": Unsupported("downloading from a hub is not supported; the toolkit works offline."),
    "async_upload": Unsupported("uploading to a hub is not supported; the toolkit works offline."),
    "huggingface_path_in_repo": Unsupported("uploading to a hub is not supported; the toolkit works offline."),
    "use_8bit_adam": Unsupported("sd-scripts' old spelling of optimizer_type = \"AdamW8bit\"; write that instead."),
    "use_lion_optimizer": Unsupported("sd-scripts' old spelling of optimizer_type = \"Lion\"; write that instead."),
    # they tune sd-scripts' own logging, memory or DDP; nothing to do here
    "console_log_level": Unsupported("sd-scripts' console logging; pentadactyl logs at INFO.", passed_over=True),
    "console_log_file": Unsupported("sd-scripts' console logging; redirect the output to keep a log.",
                                    passed_over=True),
    "console_log_simple": Unsupported("sd-scripts' console logging.", passed_over=True),
    "ddp_gradient_as_bucket_view": Unsupported("a DDP tuning flag of sd-scripts.", passed_over=True),
    "ddp_static_graph": Unsupported("a DDP tuning flag of sd-scripts.", passed_over=True),
    "no_half_vae": Unsupported("the VAE encodes in float32 always (vae_dtype sets it for sample.py).",
                               passed_over=True),
    "cache_text_encoder_outputs": Unsupported("with a frozen text encoder each distinct caption is encoded once "
                                              "anyway.", passed_over=True),
    "skip_cache_check": Unsupported("the latent cache checks each image's size and time stamp, which is cheap.",
                                    passed_over=True),
    # written by the kohya_ss GUI; sd-scripts itself does not read them
    "epoch": Unsupported("the kohya_ss GUI's own epoch field, which sd-scripts does not read; the length of "
                         "training is max_train_epochs or max_train_steps.", passed_over=True),
    "noise_offset_type": Unsupported("the kohya_ss GUI's choice between noise_offset (\"Original\") and "
                                     "multires_noise_* (\"Multires\"); the keys it chose are read.",
                                     passed_over=True),
    "wandb_run_name": Unsupported("a Weights & Biases run name, used only with log_with = \"wandb\".",
                                  passed_over=True),
    "log_tracker_config": Unsupported("a TOML of settings for accelerate's trackers (wandb); TensorBoard needs none.",
                                      passed_over=True),
    "log_config": Unsupported("it logs the job's settings to the tracker; the saved file's ss_* metadata and "
                              "--print_config hold them.", passed_over=True),
    "log_tracker_name": Unsupported("a tracker run name for accelerate's trackers; TensorBoard runs are named by "
                                    "log_prefix.", passed_over=True),
}

def schema(script: str) -> ScriptSchema:
    if script not in SCRIPTS:
        raise KeyError(f"unknown script {script!r}; known: {sorted(SCRIPTS)}")
    return SCRIPTS[script]


# ------------------------------------------------------------------------------------------ the job


class Job:
    """A validated job: read-only attributes for every key of the script (defaults filled in)."""

    def __init__(self, script: str, values: Mapping[str, Any], source: str, given: Iterable[str],
                 datasets: Any = None):
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))
        object.__setattr__(self, "script", script)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "given", frozenset(given))  # keys the user set (file or CLI)
        object.__setattr__(self, "datasets", datasets)

    def __getattr__(self, key: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        raise AttributeError(f"job of {self.script} has no key '{key}'")

    def __setattr__(self, key, value):
        raise AttributeError("a Job is read-only; derive new values instead of mutating the job")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes) -> "Job":
        """A copy with some values changed (used by tests and by scripts that derive settings)."""
        values = dict(self._values)
        values.update(changes)
        return Job(self.script, values, self.source, self.given | set(changes), self.datasets)

    def to_toml(self) -> str:
        """The resolved job as TOML (for --print_config); None values are left out."""
        lines = [f"# resolved job for {self.script} (from {self.source})"]
        for key in sorted(self._values):
            value = self._values[key]
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
        if self.datasets is not None:
            lines.append("")
            lines.append("# datasets (resolved)")
            plain = [asdict(d) if is_dataclass(d) else d for d in self.datasets]
            for line in json.dumps(plain, indent=2, default=str).splitlines():
                lines.append(f"# {line}")
        return "\n".join(lines) + "\n"


def _split_errors(message: str) -> list[str]:
    """The problems of a `raise_all` message, one string each."""
    lines = message.splitlines()
    if len(lines) > 1 and lines[0].endswith("fix them all, then run again:"):
        return [re.sub(r"^  \d+\. ", "", line) for line in lines[1:]]
    return [message]


def _line_of(text: str, key: str) -> str:
    """' line N' of the first `key =` in a TOML text, for error messages."""
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f" line {n}"
    return ""


def flatten_job_table(table: Mapping[str, Any], fields: Mapping[str, Field]) -> tuple[dict, dict]:
    """Split a job file into (job keys, dataset tables); sd-scripts' `[x_arguments]` sections are flattened."""
    flat: dict[str, Any] = {}
    datasets: dict[str, Any] = {}
    for key, value in table.items():
        if key in DATASET_TABLES:
            datasets[key] = value
        elif isinstance(value, dict) and not (key in fields and fields[key].type == "dict"):
            for inner_key, inner_value in value.items():  # a section such as [training_arguments]
                flat[inner_key] = inner_value
        else:
            flat[key] = value
    return flat, datasets


def parse_cli(argv: list[str], fields: Mapping[str, Field]) -> tuple[str | None, dict[str, Any]]:
    """(--config path, {key: value}) from the command line; `--flag` alone means true."""
    config, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument '{arg}'; options look like --key value.")
        key, _, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        has_value = bool(_) or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        value = inline if _ else (argv[i + 1] if has_value else None)
        i += 2 if (has_value and not _) else 1
        if key in ("config", "config_file"):
            if value is None:
                raise ConfigError("command line: --config needs a path to a job TOML file.")
            config = value
        elif key in UNSUPPORTED:  # as in a file: `--v2 false` asks for nothing
            off = value is not None and value.strip().lower() in ("false", "no", "0", "0.0", "", "none")
            check_unsupported(f"--{key}", f"--{key}", not off, UNSUPPORTED[key], "command line")
        elif key not in fields:
            raise ConfigError(f"command line: unknown option --{key}.{did_you_mean(key, fields)}")
        elif value is None:
            if fields[key].type != "bool":
                raise ConfigError(f"command line: --{key} needs a value ({fields[key].type_words()}).")
            overrides[key] = True
        else:
            overrides[key] = parse_cli_value(key, value, fields[key])
    return config, overrides


def load_job(script: str, argv: list[str] | None = None, config_path: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> Job:
    """Resolve a job: defaults ← TOML file ← command line. Raises ConfigError with file, key and fix."""
    spec = schema(script)
    fields = spec.fields
    cli: dict[str, Any] = {}
    if argv is not None:
        config_path, cli = parse_cli(argv, fields)
    cli.update(overrides or {})

    file_values: dict[str, Any] = {}
    dataset_tables: dict[str, Any] = {}
    source = "command line"
    text = ""
    if config_path is not None:
        source = str(config_path)
        table = load_toml(config_path)
        text = Path(config_path).read_text(encoding="utf-8")
        file_values, dataset_tables = flatten_job_table(table, fields)
        if dataset_tables and not spec.has_datasets:
            raise ConfigError(f"{source}: {script} takes no datasets; remove the "
                              f"{', '.join('[' + t + ']' for t in dataset_tables)} table(s).")

    values: dict[str, Any] = {}
    errors: list[str] = []  # every bad key of the file and the command line, reported together
    for key, value in file_values.items():
        where = f"{source}{_line_of(text, key)}"
        try:
            checked = check_key(key, value, fields, where, UNSUPPORTED)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if checked is not SWITCHED_OFF:
            values[key] = checked
    for key, value in cli.items():
        try:
            values[key] = check_value(key, value, fields[key], f"command line --{key}")
        except ConfigError as exc:
            errors.append(str(exc))
    if errors and spec.has_datasets and dataset_tables:
        try:  # the dataset tables' problems too, in the same run
            resolve_datasets({}, dataset_tables, source, Path.cwd(), {})
        except PentadactylError as exc:
            errors.extend(_split_errors(str(exc)))
    raise_all(errors)

    resolved = {key: f.default for key, f in fields.items()}
    resolved.update(values)
    for key, f in fields.items():
        if resolved[key] is None and not f.nullable:
            raise ConfigError(f"{source}: required key '{key}' is missing ({f.type_words()}). {f.help}")
    if "output_name" in resolved and resolved["output_name"] is None:
        resolved["output_name"] = Path(config_path).stem if config_path else script
    if "dataset_config" in values and dataset_tables:
        raise ConfigError(f"{source}: give datasets either inline ([general]/[[datasets]]) or with "
                          "dataset_config = \"file.toml\", not both.")
    if "dataset_config" in values:
        dataset_tables = load_toml(values["dataset_config"])

    datasets = None
    if spec.before_datasets is not None:
        spec.before_datasets(MappingProxyType(resolved))
    if spec.has_datasets:
        dataset_source = values.get("dataset_config") or source
        job_dataset_values = {k: v for k, v in values.items() if k in fields}
        command_line = {k: values[k] for k in cli}  # the command line wins over the dataset tables too
        datasets = resolve_datasets(job_dataset_values, dataset_tables or None, str(dataset_source), Path.cwd(),
                                    command_line)
    if spec.rules is not None:
        datasets = spec.rules(MappingProxyType(resolved), frozenset(values), datasets, source)
    return Job(script, resolved, source, values.keys(), datasets)
