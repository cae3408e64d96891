"""Dataset keys: layered resolution, folder mode, and the errors for bad settings and folders."""

from pathlib import Path

import pytest
from PIL import Image

from library.dataset import DATASET_JOB_FIELDS, resolve_datasets
from library.dataset.config import parse_repeats_folder
from library.errors import ConfigError, DatasetError


def img(path: Path, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 50)).save(path)
    return path


def test_job_fields_cover_the_sd_scripts_names():
    for key in ["train_data_dir", "reg_data_dir", "resolution", "train_batch_size", "enable_bucket", "min_bucket_reso",
                "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "caption_extension", "shuffle_caption",
                "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs",
                "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix", "flip_aug", "color_aug",
                "random_crop", "prior_loss_weight", "cache_latents", "cache_latents_to_disk", "vae_batch_size",
                "skip_bad_images"]:
        assert key in DATASET_JOB_FIELDS, key
    assert "batch_size" not in DATASET_JOB_FIELDS  # the job-level name is train_batch_size


def test_value_resolution_subset_dataset_general_job_default(tmp_path):
    table = {
        "general": {"shuffle_caption": True, "keep_tokens": 1, "resolution": 256, "flip_aug": True},
        "datasets": [{
            "batch_size": 4, "keep_tokens": 2, "min_bucket_reso": 128,
            "subsets": [
                {"image_dir": "a", "keep_tokens": 3, "num_repeats": 5},
                {"image_dir": "b", "is_reg": True, "class_tokens": "person"},
            ],
        }],
    }
    job = {"caption_prefix": "photo,", "flip_aug": False, "train_batch_size": 8, "max_bucket_reso": 512}
    [ds] = resolve_datasets(job, table, "job.toml", tmp_path)
    a, b = ds.subsets
    assert a.image_dir == tmp_path / "a" and a.num_repeats == 5
    assert a.caption.keep_tokens == 3 and b.caption.keep_tokens == 2  # subset, then dataset
    assert a.caption.shuffle and a.flip_aug  # general beats job
    assert a.caption.prefix == "photo,"  # job
    assert b.is_reg and b.class_tokens == "person" and b.num_repeats == 1  # default
    assert ds.resolution == (256, 256) and ds.batch_size == 4 and ds.min_bucket_reso == 128
    assert ds.max_bucket_reso == 512 and ds.bucket_reso_steps == 64 and ds.enable_bucket
    assert a.caption_extension is None  # unset: .txt or .caption


def test_unknown_key_and_wrong_type_name_the_place(tmp_path):
    bad_key = {"datasets": [{"subsets": [{"image_dir": "a", "num_repeat": 3}]}]}
    with pytest.raises(ConfigError, match=r"job.toml \[\[datasets\]\] #1 \[\[datasets.subsets\]\] #1.*'num_repeat'.*num_repeats"):
        resolve_datasets({}, bad_key, "job.toml", tmp_path)
    bad_type = {"general": {"shuffle_caption": "yes"}, "datasets": [{"subsets": [{"image_dir": "a"}]}]}
    with pytest.raises(ConfigError, match=r"\[general\].*'shuffle_caption' must be true or false"):
        resolve_datasets({}, bad_type, "job.toml", tmp_path)
    with pytest.raises(ConfigError, match="in_json.*not supported"):
        resolve_datasets({}, {"datasets": [{"subsets": [{"image_dir": "a", "in_json": "m.json"}]}]}, "j", tmp_path)
    with pytest.raises(ConfigError, match="image_dir' is required"):
        resolve_datasets({}, {"datasets": [{"subsets": [{"num_repeats": 2}]}]}, "j", tmp_path)
    with pytest.raises(ConfigError, match=r"\[\[datasets\]\], not \[datasets\]"):
        resolve_datasets({}, {"datasets": {"subsets": []}}, "j", tmp_path)


def test_bucket_setting_errors(tmp_path):
    def ds(**kw):
        return {"datasets": [{**kw, "subsets": [{"image_dir": "a"}]}]}

    with pytest.raises(DatasetError, match="min_bucket_reso = 640 is larger than the resolution 512"):
        resolve_datasets({}, ds(min_bucket_reso=640), "j", tmp_path)
    with pytest.raises(DatasetError, match="max_bucket_reso = 384 is smaller"):
        resolve_datasets({}, ds(max_bucket_reso=384), "j", tmp_path)
    with pytest.raises(DatasetError, match="bucket_reso_steps = 60 must be a multiple of 8"):
        resolve_datasets({}, ds(bucket_reso_steps=60), "j", tmp_path)
    with pytest.raises(DatasetError, match="min_bucket_reso = 300 is not a multiple of bucket_reso_steps = 64; use 256 or 320"):
        resolve_datasets({}, ds(min_bucket_reso=300), "j", tmp_path)
    [ok] = resolve_datasets({}, ds(bucket_reso_steps=32), "j", tmp_path)
    assert any("not a multiple of 64" in w for w in ok.warnings)
    with pytest.raises(DatasetError, match="not a multiple of 8"):
        resolve_datasets({}, ds(enable_bucket=False, resolution=[500, 512]), "j", tmp_path)


def test_cache_with_random_crop_is_refused_early(tmp_path):
    table = {"datasets": [{"subsets": [{"image_dir": "a", "random_crop": True}]}]}
    with pytest.raises(ConfigError, match="random_crop = true.*cannot be cached"):
        resolve_datasets({"cache_latents": True}, table, "j", tmp_path)


def test_parse_repeats_folder():
    assert parse_repeats_folder("10_hand palm") == (10, "hand palm")
    assert parse_repeats_folder("3_my_style") == (3, "my_style")
    assert parse_repeats_folder("hands") is None
    assert parse_repeats_folder("v2_hands") is None


def test_folder_mode(tmp_path):
    img(tmp_path / "train" / "10_hand" / "a.png")
    img(tmp_path / "train" / "2_palm" / "b.png")
    (tmp_path / "train" / "notes").mkdir()  # no images: ignored
    img(tmp_path / "reg" / "1_person" / "c.png")
    [ds] = resolve_datasets({"train_data_dir": "train", "reg_data_dir": "reg", "shuffle_caption": True},
                            None, "job.toml", tmp_path)
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg, s.caption.shuffle) for s in ds.subsets]
    assert got == [("10_hand", 10, "hand", False, True), ("2_palm", 2, "palm", False, True),
                   ("1_person", 1, "person", True, True)]


def test_folder_mode_mistakes(tmp_path):
    img(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match=r"holds images directly.*sub-folders named like '10_hand'"):
        resolve_datasets({"train_data_dir": "flat"}, None, "j", tmp_path)
    img(tmp_path / "noprefix" / "hands" / "a.png")
    with pytest.raises(DatasetError, match=r"hands' holds images but its name has no repeat count.*'10_hands'"):
        resolve_datasets({"train_data_dir": "noprefix"}, None, "j", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no sub-folders named like '10_hand'"):
        resolve_datasets({"train_data_dir": "empty"}, None, "j", tmp_path)
    with pytest.raises(DatasetError, match="train_data_dir '.*missing' does not exist"):
        resolve_datasets({"train_data_dir": "missing"}, None, "j", tmp_path)
    with pytest.raises(ConfigError, match="both train_data_dir and"):
        resolve_datasets({"train_data_dir": "flat"}, {"datasets": [{"subsets": [{"image_dir": "a"}]}]}, "j", tmp_path)
    with pytest.raises(ConfigError, match="no training images"):
        resolve_datasets({}, None, "j", tmp_path)
