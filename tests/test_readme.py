"""The README stays true to the code: every job key is documented, the test command is CI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from library.config import UNSUPPORTED, schema

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("script", ["train_network", "train_textual_inversion", "train_dreambooth", "sample"])
def test_every_job_key_is_documented(script):
    missing = [key for key in schema(script).fields if f"`{key}`" not in README]
    assert not missing, f"README lacks {missing}; regenerate with tools/job_reference.py {script}"


def test_every_dataset_key_and_unsupported_key_is_documented():
    from library.dataset import DATASET_FIELDS, SUBSET_FIELDS, SUBSET_ONLY_FIELDS, UNSUPPORTED_DATASET_KEYS

    keys = [*SUBSET_ONLY_FIELDS, *SUBSET_FIELDS, *DATASET_FIELDS]
    assert not [k for k in keys if f"`{k}`" not in README]
    assert not [k for k in [*UNSUPPORTED, *UNSUPPORTED_DATASET_KEYS] if k not in README]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"^make \S+", ci, re.M)
    assert commands == ["make test"], f".ci/run must run exactly the README's test command, not {commands}"
    # the README's "Running the tests" block shows the same command, at the start of a line
    assert re.search(r"^make test(\s|$)", README, re.M), "README lacks the `make test` line CI runs"
