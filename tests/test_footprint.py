"""Footprint p (privacy layer, no torch): the generic machinery reproduces Lemma 1 for fixed crops,
equals an independent enumeration of every parameter draw (exact fractions and float sums), the
joint maximum never exceeds the average of per-choice maxima, and the draws' moduli make
theta exactly uniform."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from patchdp_opacus.privacy import (
    Circle,
    CropGeometry,
    FixedCrop,
    Mask,
    PatchPrivacySpec,
    RandomResizedCrop,
    RandomScaleCrop,
    Rectangle,
    Resize,
    footprint_inclusion,
    inclusion_probability,
    mask_hit_counts,
    transform_from_dict,
)
from patchdp_opacus.privacy.geometric import scale_grid, scaled_length
from patchdp_opacus.privacy.interpolation import Interpolation, axis_taps

L_SHAPE = Mask(np.array([[1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=bool))


def axis_hull(plan, origin, interps):
    """Source interval read on one axis, one output sample at a time (no shared window code)."""
    lo, hi = None, None
    for k in range(plan.out):
        r, offset = (k, origin) if plan.moves == "box" else (origin - plan.before + k, 0)
        if not 0 <= r < plan.resized:
            continue
        for interp in interps:
            t = axis_taps(interp, plan.box, plan.resized, [r])
            a, b = offset + int(t.first[0]), offset + int(t.last[0]) + 1
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return (lo, hi) if lo is not None else None


def enumerate_p(transform, size, region):
    """(exact p(y, x) as Fractions, the same summed in floats, per-choice maxima average)."""
    mask = region.mask()
    (h, w), (mh, mw) = size, mask.shape
    exact = np.full((h - mh + 1, w - mw + 1), Fraction(0), dtype=object)
    approx = np.zeros(exact.shape)
    per_choice = {}
    pixels = list(zip(*np.nonzero(mask)))
    for theta, prob in transform.thetas(size):
        plan_y, plan_x = transform.plans(size)[theta.choice]
        ys = axis_hull(plan_y, theta.origin_y, transform.interpolations)
        xs = axis_hull(plan_x, theta.origin_x, transform.interpolations)
        read = np.zeros(size, dtype=bool)
        if ys and xs:
            read[ys[0]:ys[1], xs[0]:xs[1]] = True
        hit = np.zeros(exact.shape, dtype=bool)
        for u, v in pixels:
            hit |= read[u:u + exact.shape[0], v:v + exact.shape[1]]
        exact[hit] += prob
        approx[hit] += float(prob)
        per_choice.setdefault(theta.choice, np.zeros(exact.shape, dtype=object))
        per_choice[theta.choice] = per_choice[theta.choice] + hit.astype(object) * prob
    return exact, approx, sum((c.max() for c in per_choice.values()), Fraction(0))


SCALES = (0.5, 0.75, 1, 1.25, 1.5, 2)
CASES = {
    "scale-bilinear-aa": RandomScaleCrop((4, 5), SCALES),
    "scale-nearest-padded": RandomScaleCrop((6, 5), SCALES, padding=(3, 1), pad_if_needed=True,
                                            interpolation="nearest"),
    "scale-bicubic": RandomScaleCrop((5, 5), (0.5, 1.5), interpolation="bicubic",
                                     antialias=False),
    "rrc": RandomResizedCrop((5, 4), scale=(0.2, 1), grid=(3, 2)),
    "resize-crop": Resize((13, 7), crop=(5, 5), padding=(1, 0)),
    "resize-whole": Resize(6, "bilinear"),
    "fixed-crop": FixedCrop(CropGeometry((4, 6), (2, 0), pad_if_needed=True)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("region", [Rectangle(2, 3), L_SHAPE, Rectangle(1, 1)],
                         ids=["rect", "mask", "pixel"])
def test_p_equals_an_independent_enumeration(name, region):
    transform = CASES[name]
    size = (9, 11)
    exact, approx, loose = enumerate_p(transform, size, region)
    got = transform.placement_probabilities(size, region)
    cubic = transform.interpolation.mode == "bicubic"
    if cubic:   # the monotone envelope may add a sample where a zero cubic tap was dropped
        assert (got >= exact).all()
    else:
        np.testing.assert_array_equal(got, exact)
    inc = transform.inclusion_probability(size, region)
    assert isinstance(inc.fraction, Fraction) and inc.fraction == got.max()
    assert got[inc.placement] == inc.fraction
    np.testing.assert_allclose(approx, exact.astype(float), rtol=1e-12)  # float brute force
    if not cubic:
        assert inc.average_of_maxima == loose
    assert inc.fraction <= inc.average_of_maxima <= 1


@pytest.mark.parametrize("geometry, size, region", [
    (CropGeometry((4, 6)), (9, 13), Rectangle(2, 3)),
    (CropGeometry((7, 7)), (7, 7), Rectangle(2, 2)),
    (CropGeometry((3, 4), (4, 3)), (6, 7), Rectangle(2, 2)),
    (CropGeometry((6, 4), (2, 5)), (5, 9), Rectangle(3, 1)),
    (CropGeometry((10, 4), pad_if_needed=True), (7, 9), Rectangle(2, 2)),
    (CropGeometry((9, 5)), (12, 12), Circle(5)),
    (CropGeometry((4, 5), (1, 1)), (9, 12), L_SHAPE),
])
def test_fixed_crop_reproduces_lemma_1_and_the_mask_counts(geometry, size, region):
    """The generic footprint path on a plain crop equals geometry.py's closed form / dilation
    counts, at every placement (stored-image coordinates)."""
    generic = footprint_inclusion(geometry, size, region)
    assert generic.fraction == inclusion_probability(geometry, size, region).fraction
    total = geometry.num_origins(size)
    counts = mask_hit_counts(geometry, size, region.mask())
    expected = counts.astype(object) * Fraction(1, total)
    np.testing.assert_array_equal(FixedCrop(geometry).placement_probabilities(size, region),
                                  expected)


def test_cityscapes_fixed_crop_through_the_footprint_path():
    p = footprint_inclusion(CropGeometry(505), (1024, 2048), (10, 10))
    assert p.fraction == Fraction(514 * 514, 520 * 1544) == p.average_of_maxima


def test_rectangles_take_the_separable_path_and_agree_with_the_mask_path():
    for transform in (RandomScaleCrop((40, 48), scale_range=(0.5, 2), pad_if_needed=True),
                      RandomResizedCrop((32, 32), grid=(4, 3))):
        for box in ((1, 1), (5, 7), (12, 3)):
            size = [(64, 96), (80, 80)]
            rect = transform.inclusion_probability(size, Rectangle(*box))
            as_mask = transform.inclusion_probability(size, Mask(np.ones(box, dtype=bool)))
            assert rect == as_mask


def test_joint_maximum_is_tighter_than_the_average_of_maxima():
    """Short crops on a rescaled grid: each scale's hit profile is periodic, with maxima at
    different placements, so the joint maximum over placements of the average is strictly
    below the average of the per-scale maxima (both exact, both checked by enumeration)."""
    transform = RandomScaleCrop((1, 3), (0.75, 1.25), antialias=False)
    inc = transform.inclusion_probability((1, 9), Rectangle(1, 1))
    exact, _, loose = enumerate_p(transform, (1, 9), Rectangle(1, 1))
    assert inc.fraction == exact.max() == Fraction(28, 45)
    assert inc.average_of_maxima == loose == Fraction(61, 90)


def test_one_scale_of_one_is_the_fixed_crop():
    for region in (Rectangle(10, 10), Circle(9)):
        fixed = inclusion_probability(CropGeometry((101, 77), (3, 2)), (300, 200), region)
        scaled = RandomScaleCrop((101, 77), (1,), padding=(3, 2)).inclusion_probability(
            (300, 200), region)
        assert scaled.fraction == fixed.fraction


def test_wider_kernels_and_more_downscaling_never_lower_p():
    size, region = (120, 160), Rectangle(4, 4)

    def p(interp, antialias, scales=(0.5, 0.75, 1)):
        t = RandomScaleCrop((48, 48), scales, interpolation=interp, antialias=antialias)
        return t.inclusion_probability(size, region).fraction
    assert p("nearest", False) <= p("bilinear", False) <= p("bilinear", True) <= \
        p("bicubic", True)
    assert p("bilinear", False) <= p("bicubic", False)
    assert p("bilinear", True, (1,)) < p("bilinear", True, (0.5,))


def test_worst_case_over_several_sizes():
    transform = RandomScaleCrop((20, 20), (0.75, 1.25), pad_if_needed=True)
    sizes = [(30, 50), (24, 24), (60, 40)]
    each = [transform.inclusion_probability(s, Rectangle(3, 3)) for s in sizes]
    both = transform.inclusion_probability(sizes, Rectangle(3, 3))
    assert both.fraction == max(e.fraction for e in each)
    assert both.image_size == max(each, key=lambda e: e.fraction).image_size


def test_scale_grid_and_rounding_are_exact():
    assert scale_grid((0.5, 2.0), 0.25) == tuple(Fraction(k, 4) for k in range(2, 9))
    assert scale_grid(("0.1", "0.3"), "0.1") == (Fraction(1, 10), Fraction(2, 10),
                                                 Fraction(3, 10))
    assert scale_grid((0.5, 1.0), 0.3) == (Fraction(1, 2), Fraction(4, 5))
    assert scaled_length(1024, Fraction(3, 4)) == 768 and scaled_length(7, Fraction(1, 2)) == 4
    t = RandomScaleCrop(505, scale_range=(0.5, 2.0))
    assert t.num_choices == 7 and t.scales[0] == Fraction(1, 2)
    assert [c["resized"] for c in t.choices((1024, 2048))][:2] == [[512, 1024], [768, 1536]]


@pytest.mark.parametrize("transform", [
    RandomScaleCrop((8, 9), (0.5, 1.25), padding=(1, 2), pad_if_needed=True,
                    interpolation="bicubic", antialias=False),
    RandomResizedCrop((8, 8), scale=(0.25, 0.75), ratio=("1/2", 2), grid=(2, 3),
                      interpolation="nearest"),
    Resize(12, crop=(5, 5)), Resize((12, 13)), FixedCrop(CropGeometry((3, 4), (1, 1))),
])
def test_transforms_round_trip_through_json(transform):
    import json

    d = json.loads(json.dumps(transform.to_dict()))
    again = transform_from_dict(d)
    assert again == transform and hash(again) == hash(transform)
    spec = PatchPrivacySpec(transform, (2, 2), [(20, 24), (16, 30)])
    back = PatchPrivacySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.same_geometry(spec) and back.inclusion.fraction == spec.inclusion.fraction
    assert isinstance(transform.describe(), str)


def test_plain_crop_specs_keep_their_format():
    spec = PatchPrivacySpec(CropGeometry(505), (10, 10), (1024, 2048))
    assert "kind" not in spec.to_dict()["crop"]
    assert PatchPrivacySpec.from_dict(spec.to_dict()).crop == CropGeometry(505)
    assert spec.transform == FixedCrop(CropGeometry(505))


@pytest.mark.parametrize("transform, sizes", [
    (RandomScaleCrop((3, 4), (0.5, 1, 1.5), pad_if_needed=True), [(5, 6), (7, 4)]),
    (RandomResizedCrop((3, 3), grid=(2, 2)), [(6, 5)]),
])
def test_draw_moduli_make_theta_exactly_uniform(transform, sizes):
    """Every draw in the full range [0, M_g) x [0, M_y) x [0, M_x): each theta is hit exactly
    in proportion to its probability, for every declared size."""
    moduli = transform.draw_moduli(sizes)
    for size in sizes:
        probs = dict(transform.thetas(size))
        hits = {}
        for draws in itertools.product(*(range(m) for m in moduli)):
            theta = transform.theta_from_draws(size, draws)
            hits[theta] = hits.get(theta, 0) + 1
        total = moduli[0] * moduli[1] * moduli[2]
        assert {k: Fraction(v, total) for k, v in hits.items()} == probs


def test_cityscapes_moduli():
    t = RandomScaleCrop(505, scale_range=(0.5, 2.0), scale_step=0.25)
    g, my, mx = t.draw_moduli([(1024, 2048)])
    assert g == 7
    for plan_y, plan_x in t.plans((1024, 2048)):
        assert my % plan_y.num_origins == 0 and mx % plan_x.num_origins == 0


@pytest.mark.parametrize("call, match", [
    (lambda: RandomScaleCrop(5, scale_range=(0, 1)), "0 < low"),
    (lambda: RandomScaleCrop(5, scale_range=(1, 0.5)), "0 < low"),
    (lambda: RandomScaleCrop(5, scale_range=(0.5, 1), scale_step=0), "positive"),
    (lambda: RandomScaleCrop(5, scale_range=(0.5, 1e6), scale_step=0.001), "scales"),
    (lambda: RandomScaleCrop(5), "either scales"),
    (lambda: RandomScaleCrop(5, (1,), scale_step=1), "scale_step goes with"),
    (lambda: RandomScaleCrop(5, (1,), interpolation="lanczos"), "unknown interpolation"),
    (lambda: RandomScaleCrop(50, (0.5, 1)).validate((60, 60)), "scale 1/2"),
    (lambda: RandomScaleCrop(5, (0.01,)).validate((20, 20)), "larger scales"),
    (lambda: RandomScaleCrop(5, (1,)).inclusion_probability((20, 20), (30, 2)), "does not fit"),
    (lambda: RandomResizedCrop(8, scale=(0.5, 2)), "<= 1"),
    (lambda: RandomResizedCrop(8, ratio=(2, 1)), "ratio"),
    (lambda: Resize(0), ">= 1"),
    (lambda: Resize((10, 10), crop=12).validate((30, 30)), "pad_if_needed"),
    (lambda: transform_from_dict({"kind": "rotate"}), "unknown transform"),
    (lambda: PatchPrivacySpec(RandomScaleCrop(50, (0.5,)), (2, 2), (80, 80)), "scale 1/2"),
])
def test_impossible_settings_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nearest_has_no_antialias_and_footprint_of_padding_is_empty():
    assert Interpolation("nearest", True).antialias is False
    t = RandomScaleCrop((4, 4), (1,), padding=(6, 6))
    assert t.footprint((5, 5), (0, 0, 0)) is None       # the crop sees only padding
    assert t.footprint((5, 5), (0, 5, 5)) == ((0, 3), (0, 3))
