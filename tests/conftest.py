"""Shared fixtures: the tiny SD1-architecture model, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' tensors are small: on a 2-core machine one thread is as fast, and when another
    process holds a core, OpenMP's spinning threads make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory):
    """(single-file path, diffusers folder) of the tiny model with seed 0."""
    from library.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_single_file(tiny_model_paths):
    return tiny_model_paths[0]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """Eight 64-pixel red or blue circles with captions: the training tests' small dataset (read-only)."""
    from library.toy_data import write_shape_folder

    folder = tmp_path_factory.mktemp("data") / "shapes"
    write_shape_folder(folder, count=8, size=(64, 64), seed=3, shapes=("circle",), colours=("red", "blue"))
    return folder
