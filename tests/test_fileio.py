"""Atomic writes: the file appears whole or not at all, with the permissions a plain write would give."""

from __future__ import annotations

import os

import pytest
import torch

from library.fileio import atomic_path, save_safetensors_atomic, umask, write_text_atomic


def test_written_files_get_normal_permissions(tmp_path):
    expected = 0o666 & ~umask()
    save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    write_text_atomic(tmp_path / "b.txt", "x")
    for name in ("a.safetensors", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]
