"""Shared fixtures: the tiny SD1-architecture model, written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory):
    """(single-file path, diffusers folder) of the tiny model with seed 0."""
    from library.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_single_file(tiny_model_paths):
    return tiny_model_paths[0]
