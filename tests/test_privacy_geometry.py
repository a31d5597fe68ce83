"""Inclusion probability p: closed form and mask path against brute force, exact fractions."""

from fractions import Fraction

import numpy as np
import pytest

from patchdp_opacus.privacy import (
    Circle,
    Cluster,
    Crescent,
    CropGeometry,
    Mask,
    Rectangle,
    Union,
    inclusion_probability,
    make_region,
    mask_hit_counts,
    rectangle_inclusion,
)


def brute_force_counts(image_size, crop_size, padding, mask):
    """For every placement inside the image (image coords), count crop origins whose window
    contains at least one mask pixel — plain loops over origins, no shared code."""
    H, W = image_size
    ch, cw = crop_size
    ph, pw = padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    mh, mw = mask.shape
    out = np.zeros((H - mh + 1, W - mw + 1), dtype=np.int64)
    for a in range(H - mh + 1):
        for b in range(W - mw + 1):
            canvas = np.zeros((Hp, Wp), dtype=bool)
            canvas[ph + a:ph + a + mh, pw + b:pw + b + mw] = mask
            n = 0
            for i in range(Hp - ch + 1):
                for j in range(Wp - cw + 1):
                    n += bool(canvas[i:i + ch, j:j + cw].any())
            out[a, b] = n
    return out, (Hp - ch + 1) * (Wp - cw + 1)


def brute_force_p(image_size, crop_size, padding, mask):
    counts, total = brute_force_counts(image_size, crop_size, padding, mask)
    return Fraction(int(counts.max()), total)


RNG = np.random.default_rng(1234)
RECT_CASES = [
    # (H, W), (ch, cw), (ph, pw), (kh, kw)
    ((9, 13), (4, 6), (0, 0), (2, 3)),      # H != W, c_h != c_w, k_h != k_w
    ((7, 7), (7, 7), (0, 0), (2, 2)),       # crop == image -> p = 1
    ((6, 8), (8, 10), (1, 1), (1, 2)),      # crop == padded image -> p = 1
    ((8, 8), (3, 3), (0, 0), (5, 5)),       # patch larger than the crop
    ((6, 7), (4, 3), (4, 3), (2, 2)),       # padding > (H - k) / 2 (the reference code's trap)
    ((5, 9), (6, 4), (2, 5), (3, 1)),       # large padding on both axes
    ((10, 4), (3, 4), (0, 0), (1, 1)),      # single pixel
]
for _ in range(12):
    H, W = RNG.integers(3, 11, size=2)
    kh, kw = RNG.integers(1, H + 1), RNG.integers(1, W + 1)
    ph, pw = RNG.integers(0, 4, size=2)
    ch, cw = RNG.integers(1, H + 2 * ph + 1), RNG.integers(1, W + 2 * pw + 1)
    RECT_CASES.append(((int(H), int(W)), (int(ch), int(cw)), (int(ph), int(pw)), (int(kh), int(kw))))


@pytest.mark.parametrize("image,crop,pad,patch", RECT_CASES)
def test_rectangle_closed_form_equals_brute_force(image, crop, pad, patch):
    geom = CropGeometry(crop, pad)
    expected = brute_force_p(image, crop, pad, np.ones(patch, dtype=bool))
    got = rectangle_inclusion(geom, image, patch)
    assert isinstance(got.fraction, Fraction)
    assert got.fraction == expected
    # The mask path is exact too, for every placement at once.
    counts, total = brute_force_counts(image, crop, pad, np.ones(patch, dtype=bool))
    np.testing.assert_array_equal(mask_hit_counts(geom, image, np.ones(patch, bool)), counts)


def test_crop_equal_to_padded_image_gives_one():
    assert rectangle_inclusion(CropGeometry((8, 10), (1, 1)), (6, 8), (1, 1)).fraction == 1
    assert inclusion_probability(CropGeometry((7, 7)), (7, 7), Circle(3)).fraction == 1


def test_known_cityscapes_value():
    p = inclusion_probability(CropGeometry(505), (1024, 2048), (10, 10))
    assert p.fraction == Fraction(514 * 514, 520 * 1544)


@pytest.mark.parametrize("region", [Circle(4), Circle(5), Crescent(4, 6), Cluster(5, 4), Cluster(4, 4),
                                    Mask(np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0]], bool))])
@pytest.mark.parametrize("image,crop,pad", [((9, 12), (4, 5), (0, 0)), ((8, 7), (3, 6), (3, 1)),
                                           ((7, 9), (9, 3), (1, 0))])
def test_mask_path_equals_brute_force(region, image, crop, pad):
    mask = region.mask()
    if mask.shape[0] > image[0] or mask.shape[1] > image[1]:
        pytest.skip("region does not fit")
    counts, total = brute_force_counts(image, crop, pad, mask)
    geom = CropGeometry(crop, pad)
    np.testing.assert_array_equal(mask_hit_counts(geom, image, mask), counts)
    assert inclusion_probability(geom, image, region).fraction == Fraction(int(counts.max()), total)


def test_random_masks_equal_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(8):
        m = rng.random((rng.integers(1, 5), rng.integers(1, 5))) < 0.4
        if not m.any():
            continue
        image = (int(rng.integers(5, 10)), int(rng.integers(5, 10)))
        pad = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        crop = (int(rng.integers(1, image[0] + 2 * pad[0] + 1)),
                int(rng.integers(1, image[1] + 2 * pad[1] + 1)))
        region = Mask(m)  # trimmed to its bounding box
        counts, total = brute_force_counts(image, crop, pad, region.mask())
        assert inclusion_probability(CropGeometry(crop, pad), image, region).fraction == \
            Fraction(int(counts.max()), total)


def test_pad_if_needed_pads_short_side_to_crop():
    geom = CropGeometry((10, 4), (0, 0), pad_if_needed=True)
    assert geom.padded_size((6, 9)) == (10, 9)
    assert geom.pad_offsets((7, 9)) == (1, 2, 0, 0)  # odd difference: extra row at the bottom
    # Brute force on the padded canvas: 7 rows padded to 10 as (1 above, 2 below).
    mask = np.ones((2, 2), bool)
    H, W = 7, 9
    best = 0
    for a in range(H - 1):
        for b in range(W - 1):
            canvas = np.zeros((10, W), bool)
            canvas[1 + a:3 + a, b:b + 2] = True
            n = sum(canvas[0:10, j:j + 4].any() for j in range(W - 4 + 1))
            best = max(best, n)
    assert rectangle_inclusion(geom, (H, W), (2, 2)).fraction == Fraction(best, W - 4 + 1)
    assert inclusion_probability(geom, (H, W), Mask(mask)).fraction == Fraction(best, W - 4 + 1)


def test_worst_case_over_several_image_sizes():
    geom = CropGeometry(5)
    sizes = [(20, 30), (8, 9), (12, 12)]
    each = [rectangle_inclusion(geom, s, (2, 2)).fraction for s in sizes]
    got = inclusion_probability(geom, sizes, (2, 2))
    assert got.fraction == max(each)
    assert got.image_size == sizes[int(np.argmax(each))]


def test_monotone_in_crop_and_patch_size():
    image = (40, 64)
    ps = [inclusion_probability(CropGeometry(c), image, (5, 5)).fraction for c in range(1, 41)]
    assert all(a <= b for a, b in zip(ps, ps[1:])) and ps[0] < ps[-1] == 1
    ps = [inclusion_probability(CropGeometry(12), image, (k, k)).fraction for k in range(1, 41)]
    assert all(a <= b for a, b in zip(ps, ps[1:]))
    ps = [inclusion_probability(CropGeometry(12), image, Circle(d)).fraction for d in range(1, 30)]
    assert all(a <= b for a, b in zip(ps, ps[1:]))


def test_shapes_are_no_worse_than_their_bounding_box():
    geom, image = CropGeometry(50), (128, 256)
    for region in (Circle(21), Crescent(21, 27), Cluster(21, 35)):
        box = inclusion_probability(geom, image, Rectangle(*region.size)).fraction
        assert inclusion_probability(geom, image, region).fraction <= box


def test_union_and_make_region():
    u = Union([(Rectangle(2, 2), (0, 0)), (Rectangle(1, 1), (3, 4))])
    assert u.size == (4, 5) and u.mask().sum() == 5
    assert make_region("square", (3, 3)) == Rectangle(3, 3)
    assert make_region("circle", (7, 9)).size == (7, 7)


@pytest.mark.parametrize("call,match", [
    (lambda: rectangle_inclusion(CropGeometry(5), (10, 10), (11, 2)), "does not fit"),
    (lambda: rectangle_inclusion(CropGeometry(12), (10, 10), (2, 2)), "pad_if_needed"),
    (lambda: CropGeometry(0), "crop_size"),
    (lambda: CropGeometry(5, padding=-1), "padding"),
    (lambda: Rectangle(0, 3), "positive"),
    (lambda: make_region("star", (3, 3)), "unknown patch shape"),
    (lambda: Mask(np.zeros((3, 3), bool)), "non-empty"),
    (lambda: inclusion_probability(CropGeometry(5), [], (2, 2)), "empty"),
])
def test_impossible_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
