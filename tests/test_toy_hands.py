"""The toy hand world: deterministic examples, the caption grammar, parameters that show in the image,
the finger counter's accuracy on a fixed held-out set, and folders the dataset pipeline reads."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from toy_hands import (
    BACKGROUNDS, MANIFEST, HandParams, ObjectParams, analyse_hand, caption_for, count_fingers,
    draw_hand, draw_object, hand_extent, hand_geometry, read_manifest, render, sample_example, sample_hand_params,
    web_like_counts, write_hand_folder,
)
from toy_hands.augment import add_noise, blur
from toy_hands.params import METALS, POLISH_COLOURS, POSES

# Written from the study's grammar, independently of caption_for.
HAND_CAPTION = re.compile(
    r"^(?P<view>front|back) of (?P<skin>fair|medium|dark)-skinned (?P<elderly>elderly )?(?P<sex>male|female) "
    r"(?P<side>left|right) hand(?: with (?P<extras>nail polish|accessories|nail polish and accessories))?$")
OBJECT_CAPTION = re.compile(
    r"^a (red|green|yellow|orange|blue|white) (apple|star|house|tree|cup) on a (\w+) background$")
NUMBERS = re.compile(r"\d|\b(zero|one|two|three|four|five|six|seven|eight|finger|fingers|thumb)\b")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def differs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def near_colour(image: Image.Image, colour: tuple[int, int, int], tolerance: float = 40.0) -> int:
    return int((np.sqrt(((pixels(image) - np.asarray(colour)) ** 2).sum(axis=2)) < tolerance).sum())


def foreground(image: Image.Image, background: str) -> np.ndarray:
    return np.sqrt(((pixels(image) - np.asarray(BACKGROUNDS[background])) ** 2).sum(axis=2)) > 40


# ---- generation ------------------------------------------------------------------------------------

def test_examples_are_deterministic_and_seeded(tmp_path):
    # pinned: an example is a function of (seed, index) alone, and the training folders depend on these values
    assert sample_example(3, 7, five_finger_share=0.5) == HandParams(
        digits=5, fused=0, side="left", view="front", skin="dark", shade=-0.076, sex="male", elderly=False,
        nail_polish=None, ring="gold", bracelet=None, spread=0.836, finger_length=0.903, scale=0.982, rotation=9.19,
        offset=(0.013, 0.037), background="green")
    assert [sample_example(1, i) for i in range(5)] != [sample_example(2, i) for i in range(5)]
    a = write_hand_folder(tmp_path / "a", 6, seed=5, object_share=0.3)
    b = write_hand_folder(tmp_path / "b", 3, seed=5, object_share=0.3, start=3)  # a later chunk alone
    assert [p.name for p in a[3:]] == [p.name for p in b]
    for pa, pb in zip(a[3:], b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_suffix(".txt").read_text() == pb.with_suffix(".txt").read_text()
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left behind


def test_poses_bound_spread_and_tilt_and_keep_the_default_stream():
    # "any" is the default and draws exactly what the stream drew before poses existed
    assert [sample_example(8, i) for i in range(20)] == [sample_example(8, i, pose="any") for i in range(20)]
    for pose, ((lo, hi), tilt) in POSES.items():
        hands = [sample_example(9, i, five_finger_share=0.5, pose=pose) for i in range(60)]
        assert all(lo <= h.spread <= hi and abs(h.rotation) <= tilt for h in hands), pose
        assert all(count_fingers(render(h)) == h.digits for h in hands if pose == "spread"), pose
    spread = [sample_example(9, i, pose="spread") for i in range(60)]
    assert min(h.spread for h in spread) >= 0.7 and max(abs(h.rotation) for h in spread) <= 10
    with pytest.raises(ValueError, match="pose must be one of"):
        sample_example(9, 0, pose="fist")


def test_manifest_round_trips(tmp_path):
    paths = write_hand_folder(tmp_path, 5, seed=2, five_finger_share=0.5, object_share=0.4)
    listed = read_manifest(tmp_path)
    assert [name for name, _ in listed] == [p.name for p in paths] and (tmp_path / MANIFEST).exists()
    for (name, params), path in zip(listed, paths):
        assert pixels(render(params)).tolist() == pixels(Image.open(path).convert("RGB")).tolist()
        assert path.with_suffix(".txt").read_text() == caption_for(params)


def test_digit_count_distributions():
    rng = random.Random(0)
    clean = [sample_hand_params(rng) for _ in range(100)]
    assert all(p.digits == 5 and p.fused == 0 and p.well_formed for p in clean)
    web = [sample_hand_params(rng, five_finger_share=0.5) for _ in range(400)]
    assert 0.42 < sum(p.digits == 5 for p in web) / len(web) < 0.58
    assert {p.digits for p in web} == {3, 4, 5, 6, 7} and any(p.fused for p in web)
    assert abs(sum(web_like_counts(0.3).values()) - 1) < 1e-9
    extra = web_like_counts(0.05, "extra")
    assert abs(sum(extra.values()) - 1) < 1e-9 and extra[5] == 0.05
    assert extra[6] + extra[7] > 0.9  # mostly extra fingers
    with pytest.raises(ValueError, match="wrong must be one of"):
        web_like_counts(0.5, "many")
    with pytest.raises(ValueError, match="give counts or five_finger_share, not both"):
        sample_hand_params(rng, counts={5: 1.0}, five_finger_share=0.5)


def test_every_hand_fits_and_the_forearm_leaves_the_image():
    for i in range(200):
        p = sample_example(11, i, five_finger_share=0.3)
        lo_x, lo_y, hi_x, hi_y = hand_extent(p)
        sx = -1 if p.side == "left" else 1  # the left hand mirrors its offset
        left_edge, right_edge = sorted((sx * (lo_x + p.offset[0]), sx * (hi_x + p.offset[0])))
        assert -0.5 < left_edge and right_edge < 0.5
        assert -0.5 < lo_y + p.offset[1] and hi_y + p.offset[1] < 0.5
        mask = foreground(draw_hand(p), p.background)
        assert mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()  # the forearm


def test_invalid_parameters_are_rejected():
    cases = [({"digits": 8}, "digits must be 0-7"), ({"fused": 2, "digits": 2}, "fused must be between 0 and digits - 1"),
             ({"skin": "green"}, "skin must be one of"), ({"background": "plaid"}, "background must be one of"),
             ({"nail_polish": "gold"}, "nail_polish: None or"), ({"spread": 1.5}, r"spread must be in \[0, 1\]"),
             ({"side": "up"}, "side must be one of")]
    for bad, message in cases:  # each bad value is refused for its own reason, not for whatever fails first
        with pytest.raises(ValueError, match=f"^HandParams: {message}"):
            HandParams(**bad)
    with pytest.raises(ValueError, match=r"ObjectParams: a star is one of \(.yellow., .orange.\)"):
        ObjectParams(kind="star", colour="blue")


# ---- captions --------------------------------------------------------------------------------------

def test_captions_follow_the_study_grammar_and_never_count():
    for i in range(300):
        p = sample_example(4, i, five_finger_share=0.5, object_share=0.2)
        caption = caption_for(p)
        assert not NUMBERS.search(caption), caption
        if isinstance(p, ObjectParams):
            m = OBJECT_CAPTION.match(caption)
            assert m and m.groups() == (p.colour, p.kind, p.background), caption
            continue
        m = HAND_CAPTION.match(caption)
        assert m, caption
        assert (m["view"], m["skin"], m["sex"], m["side"]) == (p.view, p.skin, p.sex, p.side)
        assert bool(m["elderly"]) == p.elderly
        extras = m["extras"] or ""
        assert ("nail polish" in extras) == bool(p.nail_polish)
        assert ("accessories" in extras) == bool(p.ring or p.bracelet)
    assert caption_for(HandParams(view="front", skin="dark", side="left", sex="female", nail_polish="red")) == \
        "front of dark-skinned female left hand with nail polish"


# ---- parameters show in the image ------------------------------------------------------------------

BASE = HandParams(digits=5, side="right", view="back", skin="medium", rotation=10.0, offset=(0.03, 0.0))


def test_left_is_the_mirror_of_right():
    right = draw_hand(BASE)
    left = draw_hand(dataclasses.replace(BASE, side="left"))
    assert differs(ImageOps.mirror(right), left) < 0.5
    assert differs(right, left) > 3


def test_front_and_back_differ_inside_and_in_thumb_side():
    front, back = draw_hand(dataclasses.replace(BASE, view="front", rotation=0.0, offset=(0, 0))), \
        draw_hand(dataclasses.replace(BASE, rotation=0.0, offset=(0, 0)))
    assert differs(front, back) > 1
    # The thumb side flips: the front of a right hand has its thumb on the viewer's right.
    f, b = foreground(front, "white"), foreground(back, "white")
    thumb_rows = slice(30, 40)  # below the fingers, beside the palm
    assert f[thumb_rows, 44:].sum() > 10 and f[thumb_rows, :20].sum() == 0
    assert b[thumb_rows, :20].sum() > 10 and b[thumb_rows, 44:].sum() == 0


@pytest.mark.parametrize("view", ["front", "back"])
def test_nail_polish_ring_and_bracelet_pixels(view):
    plain = dataclasses.replace(BASE, view=view)
    assert near_colour(draw_hand(plain), POLISH_COLOURS["red"]) == 0
    assert near_colour(draw_hand(dataclasses.replace(plain, nail_polish="red")), POLISH_COLOURS["red"]) >= 3
    assert near_colour(draw_hand(plain), METALS["gold"]) == 0
    assert near_colour(draw_hand(dataclasses.replace(plain, ring="gold")), METALS["gold"]) >= 1
    assert near_colour(draw_hand(dataclasses.replace(plain, bracelet="gold")), METALS["gold"]) >= 10


def test_skin_tone_and_background_show():
    def mean_skin(tone: str) -> float:
        image = draw_hand(dataclasses.replace(BASE, skin=tone, background="blue"))
        return float(pixels(image)[foreground(image, "blue")].mean())

    assert mean_skin("fair") > mean_skin("medium") > mean_skin("dark") + 40
    for name, colour in BACKGROUNDS.items():
        corner = pixels(draw_hand(dataclasses.replace(BASE, background=name)))[0, 0]
        assert np.abs(corner - np.asarray(colour)).max() <= 1


def test_every_parameter_changes_the_image():
    changes = {"digits": 4, "fused": 1, "spread": 0.0, "finger_length": 0.8, "scale": 0.8, "rotation": -20.0,
               "offset": (-0.05, 0.05), "sex": "male", "elderly": True, "shade": 0.08}
    base = draw_hand(BASE)
    for field, value in changes.items():
        assert differs(base, draw_hand(dataclasses.replace(BASE, **{field: value}))) > 0.3, field
    sizes = [foreground(draw_hand(dataclasses.replace(BASE, scale=s)), "white").sum() for s in (0.7, 0.9, 1.1)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_objects_have_their_own_look():
    apple, star = draw_object(ObjectParams("apple", "red")), draw_object(ObjectParams("star", "yellow"))
    assert near_colour(apple, (214, 40, 40)) > 300 and near_colour(star, (240, 206, 40)) > 150
    assert differs(apple, draw_hand(BASE)) > 10


# ---- the finger counter ----------------------------------------------------------------------------

HELD_OUT_SEED = 7000  # the bench uses 9000; write_hand_folder's users pick small seeds
# Measured on this set: clean 40/40, blurred + noisy 40/40 (bench/bench_finger_counter.py: 100% and
# 97% on 500 hands). The thresholds leave room for PIL's resampling on other platforms, not for a
# worse counter.
CLEAN_MIN, DEGRADED_MIN = 0.95, 0.9


@pytest.fixture(scope="module")
def held_out() -> list[tuple[HandParams, Image.Image]]:
    hands = [sample_example(HELD_OUT_SEED, i, counts={3: 1, 4: 1, 5: 1, 6: 1, 7: 1}) for i in range(40)]
    return [(p, draw_hand(p)) for p in hands]


def test_counter_accuracy_on_clean_held_out_hands(held_out):
    right = sum(count_fingers(image) == p.digits for p, image in held_out)
    assert right / len(held_out) >= CLEAN_MIN, f"{right}/{len(held_out)}"


def test_counter_accuracy_on_blurred_noisy_hands(held_out):
    rng = random.Random(0)
    right = sum(count_fingers(add_noise(blur(image, 0.9), 6.0, rng)) == p.digits for p, image in held_out)
    assert right / len(held_out) >= DEGRADED_MIN, f"{right}/{len(held_out)}"


def test_counter_evidence_and_edge_cases():
    p = dataclasses.replace(BASE, digits=6)
    found = analyse_hand(draw_hand(p))
    assert found.count == 6 == len(found.tips) and found.confidence == 1.0 and found.votes == {6: 6}
    x, y = found.palm_centre
    assert 20 < x < 44 and 25 < y < 50 and found.palm_radius > 4
    assert all(0 <= tx < 64 and 0 <= ty < 64 for tx, ty in found.tips)
    assert count_fingers(draw_hand(p, size=160)) == 6  # the size does not matter
    assert count_fingers(np.asarray(draw_hand(p))) == 6  # arrays are accepted
    assert count_fingers(Image.new("RGB", (64, 64), (200, 200, 200))) == 0
    assert count_fingers(draw_hand(dataclasses.replace(BASE, digits=0))) == 0


def test_counter_building_blocks_on_small_masks():
    from library.evaluate import counter

    # 8-neighbour components: pixels touching at a corner are one part
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    labels, n = counter._labels(diagonal)
    assert n == 2 and labels[0, 0] == labels[1, 1] == 1 and labels[3, 0] == labels[3, 1] == 2
    # a closed ring's inside is a hole and is filled; a gap open to the edge only at a corner is not
    # (the background is 8-connected as well)
    ring = np.zeros((7, 7), dtype=bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert counter._fill_holes(ring)[1:6, 1:6].all() and counter._fill_holes(ring).sum() == 25
    corner = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], dtype=bool)
    assert np.array_equal(counter._fill_holes(corner), corner)
    # Euclidean distance to the nearest True pixel (the palm radius is a true radius)
    point = np.zeros((6, 6), dtype=bool)
    point[0, 0] = True
    d = counter._distance(point)
    assert d[0, 0] == 0 and d[4, 3] == pytest.approx(5.0) and d[5, 5] == pytest.approx(5 * 2 ** 0.5)


def test_fused_fingers_count_once():
    for digits, fused in ((3, 1), (4, 1), (3, 2), (6, 2)):
        p = dataclasses.replace(BASE, digits=digits, fused=fused)
        assert sum(d.fused for d in hand_geometry(p).digits) == fused
        assert count_fingers(draw_hand(p)) == digits, (digits, fused)


# ---- the dataset pipeline --------------------------------------------------------------------------

def test_folders_load_through_the_dataset_pipeline(tmp_path):
    from library.dataset import TrainDataset, resolve_datasets
    from library.models.architecture import TINY_VAE_CONFIG, build_vae

    write_hand_folder(tmp_path / "hands", 6, seed=1, object_share=0.3)
    configs = resolve_datasets({"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
                               {"datasets": [{"batch_size": 3, "subsets": [{"image_dir": "hands"}]}]}, "test", tmp_path)
    data = TrainDataset(configs, seed=0)
    assert data.num_train_images == 6 and not data.warnings
    torch.manual_seed(0)
    data.cache_latents(build_vae(TINY_VAE_CONFIG).eval(), "cpu", torch.float32)
    batches = list(data.batches(1))
    assert [b["latents"].shape for b in batches] == [torch.Size([3, 4, 8, 8])] * 2
    expected = {name: caption_for(params) for name, params in read_manifest(tmp_path / "hands")}
    for b in batches:
        for path, caption in zip(b["image_paths"], b["captions"]):
            assert caption == expected[Path(path).name]
