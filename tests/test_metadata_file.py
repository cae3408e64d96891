"""metadata_file: sd-scripts' fine-tuning JSON gives a subset its images and captions ("caption, tags")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from library.dataset import TrainDataset, resolve_datasets
from library.errors import ConfigError, DatasetError


def subset_with(tmp_path: Path, metadata) -> list:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    for name in ("a.png", "b.JPG", "c.webp"):
        Image.new("RGB", (64, 64), "red").save(images / name)
    (images / "a.txt").write_text("the caption file, never read")
    path = tmp_path / "meta.json"
    path.write_text(metadata if isinstance(metadata, str) else json.dumps(metadata))
    return resolve_datasets({"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
                            {"datasets": [{"subsets": [{"image_dir": "imgs", "metadata_file": "meta.json"}]}]},
                            "job.toml", tmp_path)


def test_images_and_captions_come_from_the_json(tmp_path):
    configs = subset_with(tmp_path, {
        "a": {"caption": "a red hand", "tags": "hand, red"},       # a stem, found with its extension
        str(tmp_path / "imgs" / "b.JPG"): {"tags": "only tags"},     # a full path (--full_path), any case
        "c.webp": {"caption": "caption only", "tags": ""},           # a name with extension; empty tags
        "gone": {"caption": "no such image"},
    })
    data = TrainDataset(configs, seed=0)
    captions = {Path(e.path).name: e.caption for e in data.entries}
    assert captions == {"a.png": "a red hand, hand, red", "b.JPG": "only tags", "c.webp": "caption only"}
    assert any("1 image(s) it names were not found" in w and "gone" in w for w in data.warnings)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"not valid JSON: .* at line 1, column 2"),
    ("[1, 2]", r"expected an object"),
    ('{"a": "a caption"}', r"the entry of 'a' is str"),
    ('{"gone": {"caption": "x"}}', r"names no image that exists"),
])
def test_bad_metadata_files_are_named(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message):
        TrainDataset(subset_with(tmp_path, text), seed=0)


def test_missing_file_and_in_json(tmp_path):
    configs = resolve_datasets({"resolution": 64, "min_bucket_reso": 64},
                               {"datasets": [{"subsets": [{"image_dir": str(tmp_path), "metadata_file": "x.json"}]}]},
                               "job.toml", tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"metadata_file '.*x.json': no such file"):
        TrainDataset(configs, seed=0)
    with pytest.raises(ConfigError, match=r"in_json.*give it to a subset as metadata_file"):
        resolve_datasets({}, {"datasets": [{"subsets": [{"image_dir": str(tmp_path), "in_json": "x.json"}]}]},
                         "job.toml", tmp_path)
