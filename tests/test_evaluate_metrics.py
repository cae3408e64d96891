"""evaluate.py metrics: FID / KID maths against hand and independent computations, the FID Inception network
(its TensorFlow-style resize, its weights file and what a wrong file says), and the command wired end to end
through a tiny random CLIP model and a random-weight Inception (the plumbing, not meaningful values)."""

from __future__ import annotations

import argparse
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.errors import ConfigError
from library.evaluate import metrics
from library.evaluate.db import DatabaseError, connect
from library.evaluate.inception import WEIGHTS_NAME, FidInceptionV3, load_fid_inception, resize_like_tf1
from support import write_tiny_clip


# ---------------------------------------------------------------------------------------------- helpers
def write_image(path, colour, size=48, shape="disc"):
    img = Image.new("RGB", (size, size), (240, 240, 235))
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def add_image(conn, path, run, prompt=None, seed=None, stored_path=None):
    """Register an image the way the importer does (the importer itself is not under test here)."""
    cur = conn.execute("INSERT INTO images (sha256, path, run, prompt, seed) VALUES (?, ?, ?, ?, ?)",
                       (f"{run}/{path.name}", str(stored_path or path), run, prompt, seed))
    return cur.lastrowid


def parse(argv):
    parser = argparse.ArgumentParser()
    metrics.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP model with 32-wide towers, the shipped SD1 tokenizer and a CLIP image processor."""
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def inception_state():
    """A random-weight FID Inception's state dict, with the classifier layer the real file also holds."""
    torch.manual_seed(1)
    state = FidInceptionV3().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    return state


@pytest.fixture
def inception_file(tmp_path, inception_state):
    path = tmp_path / WEIGHTS_NAME
    torch.save(inception_state, path)
    return path


# ---------------------------------------------------------------------------------------------- the maths
def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(40, 5))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fid_in_one_dimension_by_hand():
    # a: mean 1, variance 2 (n - 1 in the denominator); b: mean 4, variance 4
    # FID = (1 - 4)² + (√2 - √4)² = 9 + 6 - 4√2
    assert metrics.frechet_distance([[0.0], [2.0]], [[2.0], [4.0], [6.0]]) == pytest.approx(15 - 4 * math.sqrt(2))


@pytest.mark.parametrize("sizes", [(60, 50), (3, 5)], ids=["more images than dimensions", "fewer"])
def test_fid_against_scipy_sqrtm(sizes):
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(sizes[0], 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(sizes[1], 4)) @ rng.normal(size=(4, 4)) + 0.7
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def mmd2_by_loops(x, y):
    """The unbiased MMD² written out element by element, with k(u, v) = (u·v / d + 1)³."""
    d, m = len(x[0]), len(x)
    k = lambda u, v: (sum(p * q for p, q in zip(u, v)) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_estimate():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.5
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(mmd2_by_loops(x.tolist(), y.tolist()), rel=1e-12)
    # one subset as large as the sets: every image once, so KID is that estimate and its spread is 0
    kid, std, m = metrics.kernel_inception_distance(x, y, subsets=1, subset_size=1000)
    assert (kid, std, m) == (pytest.approx(mmd2_by_loops(x.tolist(), y.tolist()), rel=1e-12), 0.0, 7)


def test_kid_subsets_are_seeded_and_separate_distributions():
    rng = np.random.default_rng(3)
    a, b, far = rng.normal(size=(80, 6)), rng.normal(size=(80, 6)), rng.normal(size=(80, 6)) + 1.0
    same = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=30, seed=5)
    assert same == metrics.kernel_inception_distance(a, b, subsets=20, subset_size=30, seed=5)
    shifted = metrics.kernel_inception_distance(a, far, subsets=20, subset_size=30, seed=5)
    assert same[2] == shifted[2] == 30
    assert abs(same[0]) < 3 * same[1] + 1e-3  # unbiased: about 0 for one distribution
    assert shifted[0] > 10 * max(same[1], abs(same[0]))


def test_our_fid_and_kid_agree_with_torch_fidelity():
    metric_fid = pytest.importorskip("torch_fidelity.metric_fid")
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(40, 8)) * 1.3 + 0.2
    stats = [metric_fid.fid_features_to_statistics(torch.from_numpy(f)) for f in (a, b)]
    theirs = metric_fid.fid_statistics_to_metric(*stats, verbose=False)[metric_fid.KEY_METRIC_FID]
    assert metrics.frechet_distance(a, b) == pytest.approx(theirs, rel=1e-6)
    # one subset holding every image of both sets (40 each): the draw order does not matter
    kid = metric_kid.kid_features_to_metric(torch.from_numpy(a[:40]), torch.from_numpy(b), kid_subsets=1,
                                            kid_subset_size=40, verbose=False)
    ours = metrics.kernel_inception_distance(a[:40], b, subsets=1, subset_size=40)[0]
    assert ours == pytest.approx(kid[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-6)


# ---------------------------------------------------------------------------------------------- the Inception
def test_resize_is_tensorflow_1_bilinear_by_hand():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # source coordinate = target × 2/4 with no half-pixel offset; past the last pixel the edge repeats
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float)
    assert torch.allclose(resize_like_tf1(x, 4)[0, 0], expected)


def test_inception_file_loads_as_pth_or_safetensors(tmp_path, inception_state, inception_file):
    from safetensors.torch import save_file

    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception_state.items()}, str(st))
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        a, b = load_fid_inception(inception_file)(images), load_fid_inception(st)(images)
    assert a.shape == (2, 2048) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_inception_bad_files_say_what_is_expected(tmp_path, inception_state):
    with pytest.raises(ConfigError) as e:
        load_fid_inception(tmp_path / "nowhere.pth")
    assert str(e.value) == (f"--inception {tmp_path / 'nowhere.pth'}: no such file. FID and KID need the Inception-v3 "
                            f"weights of the FID reference ({WEIGHTS_NAME}, 95 MB); the README's evaluate.py section "
                            "says where to get it")
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match=r"notes.pth: not a PyTorch state dict of plain tensors .*expected "
                                          + WEIGHTS_NAME):
        load_fid_inception(text)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in inception_state.items() if not k.startswith("Mixed_7c")}, partial)
    with pytest.raises(ConfigError, match=r"partial.pth: not the FID Inception-v3 weights \(missing Mixed_7c\.\S+ "
                                          r"and \d+ more\)"):
        load_fid_inception(partial)
    wrong = dict(inception_state, **{"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match=r"Conv2d_1a_3x3.conv.weight has shape \(32, 3, 5, 5\), expected "
                                          r"\(32, 3, 3, 3\)"):
        load_fid_inception(tmp_path / "wrong.pth")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_inception_file_is_never_unpickled_as_objects(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": Payload()}))
    with pytest.raises(ConfigError, match="evil.pth: not a PyTorch state dict of plain tensors"):
        load_fid_inception(evil)
    assert "this would run" not in capsys.readouterr().out


def test_our_inception_matches_torch_fidelity(tmp_path, inception_state):
    extractor = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.save(inception_state, tmp_path / "w.pth")
    theirs = extractor.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(tmp_path / "w.pth"))
    images = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(load_fid_inception(tmp_path / "w.pth")(images), theirs(images)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture
def gallery(tmp_path):
    """A database with two runs of three images (one without a prompt) and a reference folder of three."""
    db = tmp_path / "ratings.sqlite"
    conn = connect(db)
    ids, prompts = {}, {}
    colours = {"runA": [(200, 40, 40), (190, 60, 30), (220, 30, 60)], "runB": [(40, 40, 200), (30, 90, 190),
                                                                               (60, 30, 210)]}
    for run, cols in colours.items():
        for i, colour in enumerate(cols):
            path = write_image(tmp_path / "images" / run / f"{i}.png", colour, shape="disc" if i % 2 else "square")
            prompt = None if (run, i) == ("runB", 2) else f"a photo of a {'red' if run == 'runA' else 'blue'} hand {i}"
            # runA is stored relative to the database's folder, runB absolute
            stored = path.relative_to(tmp_path) if run == "runA" else path
            ids[run, i] = add_image(conn, path, run, prompt, seed=i, stored_path=stored)
            prompts[run, i] = prompt
    conn.close()
    ref = tmp_path / "real"
    for i, colour in enumerate([(120, 90, 70), (200, 160, 130), (90, 60, 40)]):
        write_image(ref / f"sub/{i}.jpg", colour)
    return db, ids, prompts, ref


def expected_clip_scores(folder, images, prompts):
    """100 × max(cos, 0) from CLIPModel's own forward pass (it returns normalised embeddings)."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    px = CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)(images=images, return_tensors="pt")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=px["pixel_values"], **tok)
    return [100 * max(float((i * t).sum()), 0.0) for i, t in zip(out.image_embeds, out.text_embeds)]


def test_metrics_command_stores_clip_score_fid_and_kid(gallery, tiny_clip, inception_file, inception_state, capsys):
    db, ids, prompts, ref = gallery
    args = parse(["--db", str(db), "--clip", str(tiny_clip), "--reference", str(ref), "--inception",
                  str(inception_file), "--kid-subsets", "1", "--device", "cpu"])
    assert metrics.run(args) == 0
    out = capsys.readouterr().out
    conn = connect(db)
    stored = {r["image_id"]: r["value"] for r in conn.execute("SELECT * FROM metrics WHERE name = 'clip_score'")}
    with_prompt = [k for k in ids if prompts[k]]
    assert set(stored) == {ids[k] for k in with_prompt}  # the image without a prompt gets none
    images = [Image.open(db.parent / "images" / run / f"{i}.png").convert("RGB") for run, i in with_prompt]
    expected = expected_clip_scores(tiny_clip, images, [prompts[k] for k in with_prompt])
    assert [stored[ids[k]] for k in with_prompt] == pytest.approx(expected, abs=1e-4)
    assert "clip_score: 5 images" in out and "skipped: 1 without a prompt" in out

    # FID and KID per run, from features of the same images taken straight from the network
    model = FidInceptionV3().eval()
    model.load_state_dict({k: v for k, v in inception_state.items() if not k.startswith("fc.")})

    def feats(paths):
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None])
                              for p in paths]).double().numpy()

    real = feats(sorted(ref.rglob("*.jpg")))
    rows = {(r["run"], r["name"]): r for r in conn.execute("SELECT * FROM set_metrics")}
    assert set(rows) == {("runA", "fid"), ("runA", "kid"), ("runB", "fid"), ("runB", "kid")}
    for run in ("runA", "runB"):
        gen = feats([db.parent / "images" / run / f"{i}.png" for i in range(3)])
        fid = metrics.frechet_distance(gen, real)  # the maths are checked against scipy above
        assert rows[run, "fid"]["value"] == pytest.approx(fid, rel=1e-4)
        assert rows[run, "kid"]["value"] == pytest.approx(mmd2_by_loops(gen.tolist(), real.tolist()), rel=1e-6)
        assert rows[run, "kid"]["std"] == 0.0
        assert rows[run, "fid"]["std"] is None
        assert rows[run, "fid"]["images"] == 3 and rows[run, "fid"]["reference"] == str(ref)
    assert "run runA: FID" in out and "3 images against 3 real ones" in out and "FID is biased" in out

    # a second run computes only what is missing; --recompute does all again
    conn.execute("DELETE FROM metrics WHERE image_id = ?", (ids["runA", 0],))
    conn.close()
    metrics.run(parse(["--db", str(db), "--clip", str(tiny_clip), "--device", "cpu"]))
    assert "clip_score: 1 images" in capsys.readouterr().out
    metrics.run(parse(["--db", str(db), "--clip", str(tiny_clip), "--device", "cpu", "--recompute",
                       "--run", "runB"]))
    assert "clip_score: 2 images" in capsys.readouterr().out


def test_metrics_command_refuses_what_it_cannot_use(gallery, tiny_clip, inception_file, tmp_path):
    db, _, _, ref = gallery

    def error(argv):
        with pytest.raises((ConfigError, DatabaseError)) as e:
            metrics.run(parse(["--db", str(db), "--device", "cpu", *argv]))
        return str(e.value)

    assert error([]).startswith("metrics: nothing to compute; give --clip DIR")
    assert error(["--reference", str(ref)]) == (
        f"--reference {ref}: FID and KID also need --inception FILE, the Inception-v3 weights "
        f"({WEIGHTS_NAME}); see the README")
    assert error(["--clip", str(tmp_path / "no-clip")]) == (
        f"--clip {tmp_path / 'no-clip'}: no such folder; expected a CLIP model folder written by save_pretrained "
        "(config.json, model.safetensors)")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text('{"model_type": "clip"}')
    (bare / "pytorch_model.bin").write_bytes(b"pickle")
    assert error(["--clip", str(bare)]) == (
        f"--clip {bare}: no model.safetensors there (weights are read from safetensors only, never unpickled); "
        "save the model with save_pretrained(safe_serialization=True)")
    assert "no such file. FID and KID need" in error(["--reference", str(ref), "--inception", str(tmp_path / "x.pth")])
    empty = tmp_path / "empty-ref"
    empty.mkdir()
    assert error(["--reference", str(empty), "--inception", str(inception_file)]).startswith(
        f"--reference {empty}: 0 image(s) found")
    assert error(["--clip", str(tiny_clip), "--run", "runC"]) == (
        "--run runC: no such run in the database (runs: runA, runB)")
    with pytest.raises(DatabaseError, match="no such rating database"):
        metrics.run(parse(["--db", str(tmp_path / "typo.sqlite"), "--clip", str(tiny_clip)]))
    assert not (tmp_path / "typo.sqlite").exists()
