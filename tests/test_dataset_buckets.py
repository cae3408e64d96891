"""Bucket lists and bucket choice: pure functions, checked against independent derivations."""

from library.dataset.buckets import crop_offset, make_bucket_resolutions, select_bucket

# Worked out by hand from sd-scripts' rule for resolution 512 (area 262144), sides 256..1024, step 64:
# for each width, the largest height on the grid with w·h ≤ area (capped at 1024), both orientations.
SD_SCRIPTS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
    (1024, 256),
]


def brute_force_buckets(res: int, lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    """The same rule stated as a search: the tallest fitting height per width, plus the largest square."""
    area = res * res
    grid = range(lo, hi + 1, step)
    out = set()
    for w in grid:
        fitting = [h for h in range(step, hi + 1, step) if w * h <= area]
        if fitting and max(fitting) >= lo:
            out |= {(w, max(fitting)), (max(fitting), w)}
    side = max(s for s in range(step, 4 * res, step) if s * s <= area)
    out.add((side, side))
    return sorted(out)


def test_bucket_list_512_matches_sd_scripts():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD_SCRIPTS_512


def test_bucket_list_768_matches_independent_derivation():
    got = make_bucket_resolutions((768, 768), 256, 1024, 64)
    assert got == brute_force_buckets(768, 256, 1024, 64)
    assert (768, 768) in got and all(w * h <= 768 * 768 for w, h in got)


def test_bucket_list_other_settings():
    for res, lo, hi, step in [(512, 256, 1024, 32), (640, 320, 960, 64), (128, 64, 256, 64)]:
        assert make_bucket_resolutions((res, res), lo, hi, step) == brute_force_buckets(res, lo, hi, step)


def test_image_goes_to_nearest_aspect_and_covers_it():
    buckets = SD_SCRIPTS_512
    kw = dict(max_area=512 * 512, steps=64)
    square = select_bucket((1000, 1000), buckets, **kw)
    assert square.bucket == (512, 512) and square.resized == (512, 512)
    land = select_bucket((1024, 768), buckets, **kw)  # 1.333 -> 576×448 (1.286) is nearest
    assert land.bucket == (576, 448)
    assert land.resized == (597, 448)  # heights match, the width is cropped
    portrait = select_bucket((768, 1024), buckets, **kw)
    assert portrait.bucket == (448, 576) and portrait.resized == (448, 597)
    wide = select_bucket((3000, 500), buckets, **kw)
    assert wide.bucket == (1024, 256) and wide.resized[1] == 256 and wide.resized[0] >= 1024
    exact = select_bucket((640, 384), buckets, **kw)  # an exact size match is kept as is
    assert exact.bucket == (640, 384) and exact.resized == (640, 384)
    small = select_bucket((100, 100), buckets, **kw)  # small images are enlarged to cover
    assert small.bucket == (512, 512) and small.resized == (512, 512)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones():
    kw = dict(max_area=512 * 512, steps=64)
    small = select_bucket((300, 200), None, **kw)
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    large = select_bucket((2048, 1536), None, **kw)
    w, h = large.bucket
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
    assert large.resized[0] >= w and large.resized[1] >= h
    assert abs(large.resized[0] / large.resized[1] - 4 / 3) < 0.02


def test_crop_offsets():
    assert crop_offset((597, 448), (576, 448), None) == (10, 0)
    assert crop_offset((597, 448), (576, 448), (0.0, 0.0)) == (0, 0)
    assert crop_offset((597, 448), (576, 448), (0.999, 0.5)) == (21, 0)
