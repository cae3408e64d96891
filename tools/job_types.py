"""Write library/job_types.py: one typing Protocol per script, listing every job key with its Python type.

    python tools/job_types.py > library/job_types.py

The job loader hands out `Job` objects whose attributes are the keys; these Protocols tell readers, IDEs
and type checkers which keys a script's job has and what type each value is (after validation, defaults
filled in). tests/test_config.py regenerates the text and fails when a field changed without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.scripts import SCRIPTS  # noqa: E402

PYTHON_TYPES = {"str": "str", "path": "str", "int": "int", "float": "float", "bool": "bool",
                "list[str]": "list[str]", "list[int]": "list[int]", "list[float]": "list[float]",
                "dict": "dict[str, Any]", "int|list[int]": "int | list[int]"}
CLASS_NAMES = {"train_network": "NetworkJob", "train_textual_inversion": "TextualInversionJob",
               "train_dreambooth": "DreamBoothJob", "sample": "SampleJob"}
TRAINING = ("train_network", "train_textual_inversion", "train_dreambooth")


def annotation(field) -> str:
    kind = PYTHON_TYPES[field.type]
    return f"{kind} | None" if field.default is None else kind


def job_types_source() -> str:
    common = {key: annotation(field) for key, field in SCRIPTS[TRAINING[0]].fields.items()
              if all(key in SCRIPTS[s].fields and annotation(SCRIPTS[s].fields[key]) == annotation(field)
                     for s in TRAINING)}
    out = ['"""The job keys of each script and their types, for readers, IDEs and type checkers.',
           "",
           "Written by tools/job_types.py from library/scripts.py; do not edit by hand (a test keeps it in step).",
           "A `library.config.Job` of a script has these attributes; a key whose default is none is `| None`.",
           '"""',
           "",
           "from __future__ import annotations",
           "",
           "from typing import Any, Protocol",
           "",
           "",
           "class JobBase(Protocol):",
           "    script: str",
           "    source: str",
           "    given: frozenset[str]",
           "",
           "    def replace(self, **changes: Any) -> Any: ...",
           "",
           "    def as_dict(self) -> dict[str, Any]: ...",
           "",
           "",
           "class TrainingJob(JobBase, Protocol):",
           '    """The keys all three training scripts share (what the loop reads)."""',
           "",
           "    datasets: list[Any]"]
    out += [f"    {key}: {kind}" for key, kind in sorted(common.items())]
    network = {key: annotation(f) for key, f in SCRIPTS["train_network"].fields.items()}
    for script, name in CLASS_NAMES.items():
        fields = {key: annotation(f) for key, f in SCRIPTS[script].fields.items()}
        if script != "train_network" and network.items() <= fields.items():  # DreamBooth's LoRA mode is one
            base, inherited = "NetworkJob", network
        elif script in TRAINING:
            base, inherited = "TrainingJob", common
        else:
            base, inherited = "JobBase", {}
        own = {key: kind for key, kind in fields.items() if key not in inherited}
        out += ["", "", f"class {name}({base}, Protocol):", f'    """{script}.py"""', ""]
        out += [f"    {key}: {kind}" for key, kind in sorted(own.items())]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(job_types_source())
