"""Which keys each script's job takes: the one table of scripts and their groups of fields.

A leaf of the import graph: it imports field declarations only, so the job loader (library/config.py)
knows every script's keys without importing the code that runs the script.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from library.dataset.config import DATASET_JOB_FIELDS
from library.fields import DATASET_FILE_FIELD, MODEL_FIELDS, OUTPUT_FIELDS
from library.sampling.fields import SAMPLE_FIELDS, SAMPLE_MODEL_FIELDS
from library.schema import Field
from library.training.fields import (
    DREAMBOOTH_FIELDS, NETWORK_FIELDS, SAMPLING_DURING_TRAINING_FIELDS, SAVING_FIELDS, TEXTUAL_INVERSION_FIELDS,
    TI_SAVING_FIELDS, TRAINING_FIELDS,
)
from library.training.rules import (
    create_class_folder_for_folder_mode, dreambooth_rules, network_rules, textual_inversion_rules,
)

# (resolved values, keys the user set, datasets, source) -> datasets; raises ConfigError
Rules = Callable[[Mapping[str, Any], frozenset, Any, str], Any]
# resolved values -> None, run before the datasets are read (e.g. to make a folder the job will fill)
BeforeDatasets = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class ScriptSchema:
    name: str
    fields: Mapping[str, Field]
    has_datasets: bool
    rules: Rules | None = None  # the script's rules between keys
    before_datasets: BeforeDatasets | None = None


def _script(name: str, groups: tuple[Mapping[str, Field], ...], has_datasets: bool = True,
            rules: Rules | None = None, before_datasets: BeforeDatasets | None = None) -> ScriptSchema:
    fields: dict[str, Field] = {}
    for group in groups:
        for key, spec in group.items():
            if key in fields and fields[key] != spec:
                raise AssertionError(f"{name}: key {key} declared twice with different meanings")
            fields[key] = spec
    return ScriptSchema(name, MappingProxyType(fields), has_datasets, rules, before_datasets)


_TRAINING = (MODEL_FIELDS, OUTPUT_FIELDS, TRAINING_FIELDS, SAMPLING_DURING_TRAINING_FIELDS, DATASET_JOB_FIELDS,
             DATASET_FILE_FIELD)

SCRIPTS: Mapping[str, ScriptSchema] = MappingProxyType({s.name: s for s in (
    _script("train_network", _TRAINING + (SAVING_FIELDS, NETWORK_FIELDS), rules=network_rules),
    _script("train_textual_inversion", _TRAINING + (TI_SAVING_FIELDS, TEXTUAL_INVERSION_FIELDS),
            rules=textual_inversion_rules),
    _script("train_dreambooth", _TRAINING + (SAVING_FIELDS, NETWORK_FIELDS, DREAMBOOTH_FIELDS), rules=dreambooth_rules,
            before_datasets=create_class_folder_for_folder_mode),
    _script("sample", (SAMPLE_MODEL_FIELDS, SAMPLE_FIELDS, OUTPUT_FIELDS), has_datasets=False),
)})
