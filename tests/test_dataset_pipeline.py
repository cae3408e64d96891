"""The dataset end to end: image decoding, bad input, reg balancing, batches, latent cache, dry run.

Images are small (≤ 200 px) and the VAE is the tiny SD1-shaped one, so the whole file runs in seconds.
"""

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import library.dataset.latents as latents_module
from library.dataset import TrainDataset, debug_dataset, resolve_datasets
from library.dataset.cache import cache_path
from library.dataset.__main__ import main as dry_run_main
from library.dataset.images import load_rgb, read_header
from library.dataset.plan import plan_epoch
from library.errors import ConfigError, DatasetError
from library.models.architecture import TINY_VAE_CONFIG, build_vae

SMALL = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256}


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = build_vae(TINY_VAE_CONFIG).eval()
    model.requires_grad_(False)
    return model


def noise_image(path: Path, size, seed=0, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def make_subset(folder: Path, sizes, caption="hand, palm, fingers, close-up", ext=".png", seed=0) -> Path:
    for i, size in enumerate(sizes):
        noise_image(folder / f"{i:03d}{ext}", size, seed=seed + i)
        if caption is not None:
            (folder / f"{i:03d}.txt").write_text(f"{caption}, img{i}", encoding="utf-8")
    return folder


def build(tmp_path, subsets, job=None, seed=1, general=None, **kw) -> TrainDataset:
    table = {"general": {**SMALL, **(general or {})}, "datasets": [{"batch_size": 2, "subsets": subsets}]}
    configs = resolve_datasets(job or {}, table, "job.toml", tmp_path)
    return TrainDataset(configs, seed=seed, num_workers=kw.pop("num_workers", 0), **kw)


def snapshot(batches):
    return [(b["image_paths"], b["captions"], b["flipped"], b["bucket"]) for b in batches]


# ---- decoding ---------------------------------------------------------------------------------------


def test_every_image_kind_becomes_rgb(tmp_path):
    # EXIF orientation 6 (rotate 90°): stored 96×64, displayed 64×96
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (96, 64), (255, 0, 0)).save(tmp_path / "rot.JPG", exif=exif)
    assert read_header(tmp_path / "rot.JPG").size == (64, 96)
    assert load_rgb(tmp_path / "rot.JPG").size == (64, 96)

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.save(tmp_path / "alpha.png")
    assert load_rgb(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)

    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert load_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert load_rgb(tmp_path / "mid.png").getpixel((0, 0)) == (128, 128, 128)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert load_rgb(tmp_path / "pal.png").getpixel((0, 0)) == (255, 255, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60

    Image.new("L", (8, 8), 77).save(tmp_path / "gray.bmp")
    assert load_rgb(tmp_path / "gray.bmp").getpixel((0, 0)) == (77, 77, 77)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "x.WebP", lossless=True)
    assert load_rgb(tmp_path / "x.WebP").getpixel((0, 0)) == (1, 2, 3)


def test_all_extensions_any_case_are_found(tmp_path):
    folder = tmp_path / "imgs"
    for name in ["a.png", "b.JPG", "c.jpeg", "d.WEBP", "e.bmp"]:
        noise_image(folder / name, (64, 64))
    (folder / "f.gif").write_bytes(b"GIF89a")
    data = build(tmp_path, [{"image_dir": "imgs", "class_tokens": "hand"}])
    assert data.num_train_images == 5
    assert any("f.gif" in w and "not read" in w for w in data.warnings)


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_images_are_skipped_counted_or_fatal(tmp_path):
    folder = make_subset(tmp_path / "imgs", [(64, 64)] * 3)
    (folder / "zero.png").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    full = (folder / "000.png").read_bytes()
    noise_image(folder / "trunc.png", (120, 120), seed=9)
    data_bytes = (folder / "trunc.png").read_bytes()
    (folder / "trunc.png").write_bytes(data_bytes[: len(data_bytes) // 2])  # header fine, pixels cut off

    data = build(tmp_path, [{"image_dir": "imgs", "class_tokens": "hand"}])
    assert len(data.bad_images) == 2  # zero-byte and junk fail at the header
    assert any("zero.png" in m and "empty" in m for m in data.bad_images)
    assert any("junk.jpg" in m for m in data.bad_images)
    assert data.num_train_images == 4  # the truncated one is only found by decoding
    data.check_images()
    assert data.num_train_images == 3 and any("trunc.png" in m and "truncated" in m for m in data.bad_images)
    assert (folder / "000.png").read_bytes() == full  # the user's files are read, never rewritten

    with pytest.raises(DatasetError, match=r"junk.jpg.*corrupt.*skip_bad_images = false"):
        build(tmp_path, [{"image_dir": "imgs", "class_tokens": "hand"}], job={"skip_bad_images": False})
    (folder / "zero.png").unlink()
    (folder / "junk.jpg").unlink()
    strict = build(tmp_path, [{"image_dir": "imgs", "class_tokens": "hand"}], job={"skip_bad_images": False})
    with pytest.raises(DatasetError, match=r"trunc.png.*truncated"):
        strict.check_images()


def test_decompression_bomb_guard(tmp_path):
    make_subset(tmp_path / "imgs", [(64, 64), (200, 200)])
    data = build(tmp_path, [{"image_dir": "imgs"}], job={"max_image_pixels": 100 * 100})
    assert data.num_train_images == 1
    assert any("001.png" in m and "megapixels" in m and "max_image_pixels" in m for m in data.bad_images)


def test_folder_problems_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"image_dir '.*empty' contains no images.*It is empty"):
        build(tmp_path, [{"image_dir": "empty"}])
    with pytest.raises(DatasetError, match=r"image_dir '.*nowhere' does not exist"):
        build(tmp_path, [{"image_dir": "nowhere"}])
    make_subset(tmp_path / "nocap", [(64, 64)], caption=None)
    with pytest.raises(DatasetError, match=r"have no caption file.*000.png.*class_tokens"):
        build(tmp_path, [{"image_dir": "nocap"}])


def test_caption_sources_and_orphans(tmp_path):
    folder = make_subset(tmp_path / "imgs", [(64, 64)] * 3, caption=None)
    (folder / "000.caption").write_text("from caption file", encoding="utf-8")
    (folder / "001.txt").write_text("from txt file", encoding="utf-8")
    (folder / "lost.txt").write_text("no image", encoding="utf-8")
    (folder / "anim.gif").write_bytes(b"GIF89a")
    (folder / "anim.txt").write_text("gif caption", encoding="utf-8")
    (folder / "002.txt").write_bytes(b"")
    data = build(tmp_path, [{"image_dir": "imgs", "class_tokens": "hand"}])
    caps = {e.path.name: e.caption for e in data.entries}
    assert caps == {"000.png": "from caption file", "001.png": "from txt file", "002.png": None}
    text = data.summary()
    assert "1 from .caption files, 1 from .txt files, 1 without a caption file (using class_tokens 'hand')" in text
    assert any("lost.txt" in w and "anim.txt (its image anim.gif" in w for w in data.warnings)
    assert any("002.txt" in w and "empty" in w for w in data.warnings)

    only_txt = build(tmp_path, [{"image_dir": "imgs", "class_tokens": "hand", "caption_extension": "txt"}])
    assert {e.path.name: e.caption for e in only_txt.entries}["000.png"] is None


# ---- regularisation -----------------------------------------------------------------------------


def expected_reg_repeats(train_samples: int, reg_repeats: list[int]) -> list[int]:
    """sd-scripts' balancing restated: first pass gives each reg image its repeats until the total is
    reached; later passes add one each, in order, until it is reached."""
    out = [0] * len(reg_repeats)
    total = 0
    for i, r in enumerate(reg_repeats):
        if total >= train_samples:
            return out
        out[i] = r
        total += r
    i = 0
    while total < train_samples:
        out[i % len(out)] += 1
        total += 1
        i += 1
    return out


@pytest.mark.parametrize("n_train,train_rep,n_reg,reg_rep", [(4, 5, 3, 1), (2, 1, 5, 1), (3, 2, 2, 2), (1, 10, 4, 1)])
def test_regularisation_balancing(tmp_path, n_train, train_rep, n_reg, reg_rep):
    make_subset(tmp_path / "train", [(64, 64)] * n_train)
    make_subset(tmp_path / "reg", [(64, 64)] * n_reg, caption=None, seed=50)
    data = build(tmp_path, [{"image_dir": "train", "num_repeats": train_rep},
                            {"image_dir": "reg", "num_repeats": reg_rep, "is_reg": True, "class_tokens": "person"}],
                 job={"prior_loss_weight": 0.5})
    reg = [e.repeats for e in data.entries if e.is_reg]
    assert reg == expected_reg_repeats(n_train * train_rep, [reg_rep] * n_reg)
    assert data.num_train_images == n_train * train_rep
    # at least as many reg samples as training samples, overshooting by less than one image's repeats
    assert n_train * train_rep <= sum(reg) < n_train * train_rep + reg_rep
    assert data.num_reg_images == sum(1 for r in reg if r > 0)
    weights = torch.cat([b["loss_weights"] for b in data.batch_plan(1)])
    is_reg = torch.cat([b["is_reg"] for b in data.batch_plan(1)])
    assert int(is_reg.sum()) == sum(reg)
    assert torch.all(weights[is_reg] == 0.5) and torch.all(weights[~is_reg] == 1.0)


def test_only_regularisation_images_is_an_error(tmp_path):
    make_subset(tmp_path / "reg", [(64, 64)], caption=None)
    with pytest.raises(DatasetError, match="no usable training images"):
        build(tmp_path, [{"image_dir": "reg", "is_reg": True, "class_tokens": "person"}])


# ---- batches ------------------------------------------------------------------------------------


def mixed_dataset(tmp_path, seed=1, **subset_kw):
    make_subset(tmp_path / "imgs", [(200, 150), (150, 200), (128, 128), (64, 64), (180, 60), (130, 100)])
    return build(tmp_path, [{"image_dir": "imgs", "num_repeats": 3, "shuffle_caption": True, "keep_tokens": 1,
                             "flip_aug": True, **subset_kw}], seed=seed)


def test_batches_come_from_one_bucket_and_are_deterministic(tmp_path, vae):
    data = mixed_dataset(tmp_path)
    print(data.bucket_table())
    assert "128×128" in data.bucket_table()
    data.cache_latents(vae, "cpu", batch_size=4)
    random.seed(123)
    torch.manual_seed(123)
    first = list(data.batches(2))
    random.seed(999)  # the global RNGs have no say
    torch.manual_seed(999)
    second = list(data.batches(2))
    assert snapshot(first) == snapshot(second)
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(first, second))
    assert len(first) == data.num_batches(2) == sum(-(-len(s) // 2) for s in data.layout.buckets[0].values())
    assert sum(len(b["image_paths"]) for b in first) == 18
    for b in first:
        w, h = b["bucket"]
        assert b["latents"].shape == (len(b["image_paths"]), 4, h // 8, w // 8)
        assert b["latents"].dtype == torch.float32
        assert len({data.entries[i].choice.bucket for i in [data.layout.samples[0][s] for s in b["sample_ids"]]}) == 1
    # resume: the tail after k batches is exactly what a fresh call with start=k yields
    resumed = list(data.batches(2, start=3))
    assert snapshot(resumed) == snapshot(first[3:])
    # another epoch is shuffled differently; another instance with the same seed is identical
    assert snapshot(data.batches(3)) != snapshot(first)
    assert snapshot(mixed_dataset(tmp_path).batch_plan(2)) == snapshot(first)


def test_epoch_plan_is_a_pure_function_of_layout_seed_and_epoch(tmp_path):
    data = mixed_dataset(tmp_path)
    layout = data.layout
    first = plan_epoch(layout, [2], seed=5, epoch=1)
    assert first == plan_epoch(layout, [2], seed=5, epoch=1)
    assert first != plan_epoch(layout, [2], seed=5, epoch=2)
    # every sample once per epoch, in batches of one bucket and at most the batch size
    assert sorted(s for b in first for s in b.sample_ids) == list(range(len(layout.samples[0])))
    for b in first:
        assert len(b.sample_ids) <= 2 and b.sample_ids
        assert all(s in layout.buckets[0][b.bucket] for s in b.sample_ids)


def test_removed_images_leave_the_plan(tmp_path):
    data = mixed_dataset(tmp_path)
    assert data.usable_indices() == list(range(6)) and data.num_train_images == 18
    gone = [1, 4]
    data.remove(gone)
    assert data.usable_indices() == [0, 2, 3, 5] and data.num_train_images == 12
    paths = {p for b in data.batch_plan(1) for p in b["image_paths"]}
    assert paths == {str(data.entries[i].path) for i in data.usable_indices()}
    assert sum(len(s) for s in data.layout.samples) == data.num_samples == 12


def test_pixels_of_is_the_centre_crop_of_the_bucket(tmp_path):
    data = mixed_dataset(tmp_path)
    for e in data.entries:
        w, h = e.choice.bucket
        px = data.pixels_of(e)
        assert px.shape == (3, h, w) and px.min() >= -1 and px.max() <= 1
        assert torch.equal(px, data.pixels_of(e))


def test_prepare_latents_caches_or_encodes_as_batches_are_drawn(tmp_path, vae):
    cached = mixed_dataset(tmp_path, flip_aug=False, num_repeats=1)
    assert cached.prepare_latents(vae, "cpu", cache=False, to_disk=True) is True  # to_disk implies caching
    assert all(cached.cached_latents(i) is not None for i in cached.usable_indices())
    assert all(cache_path(e.path).is_file() for e in cached.entries)
    live = mixed_dataset(tmp_path, flip_aug=False, num_repeats=1)
    assert live.prepare_latents(vae, "cpu", cache=False) is False
    assert all(live.cached_latents(i) is None for i in live.usable_indices())
    for a, b in zip(cached.batches(1), live.batches(1)):
        assert a["image_paths"] == b["image_paths"]
        assert torch.allclose(a["latents"], b["latents"], atol=1e-4)


def test_flip_uses_the_mirrored_latent(tmp_path, vae):
    data = mixed_dataset(tmp_path)
    data.cache_latents(vae, "cpu", batch_size=2)
    factor = vae.config.scaling_factor
    flips = set()
    for b in data.batches(1):
        for k, (sid, flipped) in enumerate(zip(b["sample_ids"], b["flipped"])):
            lat, mirrored = data.cached_latents(data.layout.samples[0][sid])
            assert torch.allclose(b["latents"][k], (mirrored if flipped else lat) * factor)
            flips.add(flipped)
    assert flips == {True, False}


def test_on_the_fly_encoding_matches_the_cache(tmp_path, vae):
    cached = mixed_dataset(tmp_path, flip_aug=False, num_repeats=1)
    cached.cache_latents(vae, "cpu", batch_size=3)
    live = mixed_dataset(tmp_path, flip_aug=False, num_repeats=1)
    live.num_workers = 2
    live.use_vae(vae, "cpu", torch.float32)
    for a, b in zip(cached.batches(1), live.batches(1)):
        assert a["image_paths"] == b["image_paths"]
        assert torch.allclose(a["latents"], b["latents"], atol=1e-4)


def test_random_crop_and_color_aug_without_cache(tmp_path, vae):
    data = mixed_dataset(tmp_path, random_crop=True, color_aug=True, num_repeats=1)
    with pytest.raises(DatasetError, match="cannot cache latents with color_aug"):
        data.cache_latents(vae, "cpu")
    data.use_vae(vae, "cpu", torch.float32)
    a = list(data.batches(1, start=2))
    b = list(data.batches(1, start=2))
    assert len(a) == data.num_batches(1) - 2
    assert all(torch.equal(x["latents"], y["latents"]) for x, y in zip(a, b))
    with pytest.raises(ConfigError, match="random_crop"):
        resolve_datasets({"cache_latents": True}, {"datasets": [{"subsets": [{"image_dir": "imgs", "random_crop": True}]}]},
                         "j", tmp_path)


def test_token_warmup_follows_the_global_step(tmp_path):
    make_subset(tmp_path / "imgs", [(64, 64)] * 2)
    data = build(tmp_path, [{"image_dir": "imgs", "token_warmup_min": 1, "token_warmup_step": 4}])
    tags = [len(c.split(", ")) for b in data.batch_plan(1, global_step=0) for c in b["captions"]]
    assert tags == [1, 1]  # one batch of two at step 0
    late = [len(c.split(", ")) for b in data.batch_plan(1, global_step=4) for c in b["captions"]]
    assert late == [5, 5]
    frac = build(tmp_path, [{"image_dir": "imgs", "token_warmup_step": 0.5}])
    with pytest.raises(DatasetError, match="fraction of the run"):
        list(frac.batch_plan(1))
    frac.set_max_train_steps(8)
    assert [len(c.split(", ")) for b in frac.batch_plan(1, global_step=2) for c in b["captions"]] == [3, 3]


def test_templates_and_replacements_for_textual_inversion(tmp_path):
    make_subset(tmp_path / "palms", [(64, 64)] * 4, caption=None)
    data = build(tmp_path, [{"image_dir": "palms", "num_repeats": 5}],
                 caption_templates=["a photo of a {}", "a close-up of a {}"], template_token="<hand>",
                 caption_replacements={"<hand>": "<hand> <hand1> <hand2>"})
    captions = [c for b in data.batch_plan(1) for c in b["captions"]]
    assert set(captions) == {"a photo of a <hand> <hand1> <hand2>", "a close-up of a <hand> <hand1> <hand2>"}
    assert captions == [c for b in data.batch_plan(1) for c in b["captions"]]
    own = build(tmp_path, [{"image_dir": "palms", "class_tokens": "palm", "caption_templates": ["{} photo"]}])
    assert {c for b in own.batch_plan(1) for c in b["captions"]} == {"palm photo"}


def test_metadata_and_stats(tmp_path):
    make_subset(tmp_path / "10_hand", [(64, 64)] * 3)
    data = build(tmp_path, [{"image_dir": "10_hand", "num_repeats": 10}])
    assert data.dataset_dirs() == {"10_hand": {"n_repeats": 10, "img_count": 3}}
    assert data.tag_frequency()["10_hand"]["palm"] == 3 and data.tag_frequency()["10_hand"]["img0"] == 1
    meta = data.training_metadata()
    assert meta["ss_num_train_images"] == "30" and meta["ss_num_reg_images"] == "0"
    assert '"count": 30' in meta["ss_bucket_info"]


# ---- latent cache -------------------------------------------------------------------------------


class EncodeCounter:
    def __init__(self, monkeypatch):
        self.images = 0
        real = latents_module.encode_pixels

        def counting(vae, pixels, device, dtype):
            self.images += pixels.shape[0]
            return real(vae, pixels, device, dtype)

        monkeypatch.setattr(latents_module, "encode_pixels", counting)


def test_disk_cache_hit_and_invalidation(tmp_path, vae, monkeypatch):
    folder = make_subset(tmp_path / "imgs", [(64, 64), (100, 75), (80, 80)])
    subsets = [{"image_dir": "imgs", "flip_aug": True}]
    tiny = {"resolution": 64, "max_bucket_reso": 128}  # 64×64 buckets keep the VAE cheap

    def cache(model, **general):
        build(tmp_path, subsets, general={**tiny, **general}).cache_latents(model, "cpu", to_disk=True, batch_size=6)

    counter = EncodeCounter(monkeypatch)
    first = build(tmp_path, subsets, general=tiny)
    first.cache_latents(vae, "cpu", to_disk=True, batch_size=2)
    assert counter.images == 6  # three images, each also mirrored
    assert all(cache_path(e.path).is_file() for e in first.entries)
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no temporary files left

    counter.images = 0
    again = build(tmp_path, subsets, general=tiny)
    again.cache_latents(vae, "cpu", to_disk=True, batch_size=2)
    assert counter.images == 0  # every latent read from disk
    assert all(torch.equal(again.cached_latents(i)[0], first.cached_latents(i)[0]) for i in range(3))

    # the image changes: only it is encoded again
    noise_image(folder / "001.png", (100, 75), seed=77)
    counter.images = 0
    changed = build(tmp_path, subsets, general=tiny)
    changed.cache_latents(vae, "cpu", to_disk=True, batch_size=2)
    assert counter.images == 2
    assert not torch.equal(changed.cached_latents(1)[0], first.cached_latents(1)[0])

    # a VAE with another decoder encodes the same: the cache stays valid
    decoder_tuned = copy.deepcopy(vae)
    with torch.no_grad():
        decoder_tuned.decoder.conv_out.bias.add_(0.5)
    counter.images = 0
    cache(decoder_tuned)
    assert counter.images == 0

    # another encoder: everything is encoded again
    other = copy.deepcopy(vae)
    with torch.no_grad():
        other.encoder.conv_in.bias.add_(0.1)
    counter.images = 0
    cache(other)
    assert counter.images == 6

    # another bucket (here: another resolution): encoded again
    counter.images = 0
    cache(other, resolution=128)
    assert counter.images == 6


def test_nan_latents_name_the_image(tmp_path, vae):
    make_subset(tmp_path / "imgs", [(64, 64)])
    broken = copy.deepcopy(vae)
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    data = build(tmp_path, [{"image_dir": "imgs"}])
    with pytest.raises(DatasetError, match=r"000.png: the VAE returned NaN"):
        data.cache_latents(broken, "cpu")


def test_truncated_image_is_dropped_while_caching(tmp_path, vae):
    folder = make_subset(tmp_path / "imgs", [(64, 64)] * 3)
    raw = (folder / "002.png").read_bytes()
    (folder / "002.png").write_bytes(raw[: len(raw) // 2])
    data = build(tmp_path, [{"image_dir": "imgs"}])
    data.cache_latents(vae, "cpu", batch_size=3)
    assert data.num_train_images == 2 and len(data.bad_images) == 1
    assert sum(len(b["image_paths"]) for b in data.batches(1)) == 2


# ---- dry run ------------------------------------------------------------------------------------


def test_dry_run_prints_subsets_buckets_captions(tmp_path, capsys, monkeypatch):
    make_subset(tmp_path / "train" / "5_hand", [(200, 150), (64, 64)])
    make_subset(tmp_path / "train" / "2_palm", [(150, 200)], caption=None)
    job = tmp_path / "job.toml"
    monkeypatch.chdir(tmp_path)  # relative paths in a job are taken from the working folder
    job.write_text('pretrained_model_name_or_path = "not-loaded.safetensors"\n'
                   'train_data_dir = "train"\nresolution = 128\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n'
                   'shuffle_caption = true\nlearning_rate = 1e-4\n', encoding="utf-8")
    assert dry_run_main(["--config", str(job), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "5_hand: 2 training images × 5 repeats" in out
    assert "1 without a caption file (using class_tokens 'palm')" in out
    assert "bucket (w×h)" in out and "batch 0" in out and "tokens]" in out

    bad = tmp_path / "bad.toml"
    bad.write_text('pretrained_model_name_or_path = "m"\ntrain_data_dir = "train"\nshufle_caption = true\ndataset_config = "ds.toml"\n', encoding="utf-8")
    (tmp_path / "ds.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "train/5_hand"\n', encoding="utf-8")
    assert dry_run_main(["--config", str(bad)]) == 1
    assert "'shufle_caption'. Did you mean 'shuffle_caption'" in capsys.readouterr().err
    bad.write_text('pretrained_model_name_or_path = "m"\ntrain_data_dir = "train"\ndataset_config = "ds.toml"\n', encoding="utf-8")
    assert dry_run_main(["--config", str(bad)]) == 1
    assert "use one" in capsys.readouterr().err


def test_debug_dataset_function(tmp_path):
    make_subset(tmp_path / "imgs", [(64, 64)] * 2)
    lines = []
    debug_dataset(build(tmp_path, [{"image_dir": "imgs"}]), batches=1, out=lines.append)
    text = "\n".join(lines)
    assert "dataset #1" in text and "batch 0" in text and "img0" in text
