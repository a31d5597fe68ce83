"""Brute force through the real resampling: for every parameter draw theta and every placement of
the private region, run the loader's resampling on two samples (image and mask) that differ only
inside the region, and count the draws whose output changes.  That probability must never
exceed the accountant's p(y, x), must equal it where the footprint is tight, and this check
must catch a footprint that is one pixel too small or forgets the kernel support."""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import pytest
import torch

from patchdp_opacus.plugin.resample import resample
from patchdp_opacus.privacy import footprint as fp
from patchdp_opacus.privacy.geometric import (
    FixedCrop,
    RandomResizedCrop,
    RandomScaleCrop,
    Resize,
)
from patchdp_opacus.privacy.geometry import CropGeometry
from patchdp_opacus.privacy.interpolation import NEAREST
from patchdp_opacus.privacy.regions import Mask, Rectangle

IMAGE = (11, 13)
L_SHAPE = Mask(np.array([[1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=bool))


def brute_force_changes(transform, image_size, region) -> np.ndarray:
    """Exact P_theta(output changes) at every placement (object array of Fractions)."""
    mask = region.mask()
    (h, w), (mh, mw) = image_size, mask.shape
    places = [(y, x) for y in range(h - mh + 1) for x in range(w - mw + 1)]
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(h, w, generator=gen, dtype=torch.float64) + 1.0
    labels = torch.randint(0, 10, (h, w), generator=gen, dtype=torch.uint8)
    img_a = base.expand(len(places), h, w).clone()
    lab_a = labels.expand(len(places), h, w).clone()
    img_b, lab_b = img_a.clone(), lab_a.clone()
    # a huge positive difference: even a weight of 1e-16 changes the output detectably
    bump = torch.as_tensor(mask, dtype=torch.float64) * 2.0 ** 40
    for k, (y, x) in enumerate(places):
        img_b[k, y:y + mh, x:x + mw] += bump
        lab_b[k, y:y + mh, x:x + mw][torch.as_tensor(mask)] = 20
    counts = {}
    for theta, _ in transform.thetas(image_size):
        changed = (resample(img_a, transform, theta) != resample(img_b, transform, theta))
        changed = changed.flatten(1).any(1)
        changed |= (resample(lab_a, transform, theta, is_mask=True)
                    != resample(lab_b, transform, theta, is_mask=True)).flatten(1).any(1)
        counts.setdefault(theta.choice, np.zeros(len(places), dtype=np.int64))
        counts[theta.choice] += changed.numpy()
    plans = transform.plans(image_size)
    out = np.zeros(len(places), dtype=object)
    out[:] = Fraction(0)
    for g, c in counts.items():
        n = plans[g][0].num_origins * plans[g][1].num_origins
        out = out + c.astype(object) * Fraction(1, len(plans) * n)
    return out.reshape(h - mh + 1, w - mw + 1)


SCALES = (0.5, 0.75, 1, 1.25, 1.5, 2)
TIGHT = {  # id: (transform, region)  -- footprints with no holes: the bound is attained
    "scale-bilinear-aa": (RandomScaleCrop((6, 7), SCALES), Rectangle(2, 3)),
    "scale-up-bilinear": (RandomScaleCrop((6, 7), (1, 1.25, 1.5, 2), antialias=False),
                          Rectangle(2, 3)),
    "scale-nearest-padded": (RandomScaleCrop((6, 7), SCALES, padding=(2, 1), pad_if_needed=True,
                                             interpolation="nearest"), Rectangle(3, 2)),
    "rrc-bilinear-aa": (RandomResizedCrop((5, 6), scale=(0.2, 1), grid=(3, 3)), Rectangle(2, 2)),
    "resize-up-crop": (Resize((17, 19), crop=(6, 6)), Rectangle(2, 3)),
    "fixed-crop": (FixedCrop(CropGeometry((5, 4), (1, 2))), Rectangle(2, 3)),
    "scale-mask": (RandomScaleCrop((6, 7), SCALES), L_SHAPE),
}
VALID = {  # kernels with negative weights or holes: the bound must hold, equality need not
    # downscaling without antialias: torch's nearest (masks) reads floor(o r), which can lie one
    # pixel before the bilinear taps; image and mask footprints then differ and their union is
    # not a product of intervals, so the per-axis hull is slightly larger than what is read
    "scale-bilinear": (RandomScaleCrop((6, 7), SCALES, antialias=False), Rectangle(2, 3)),
    "scale-bicubic-aa": (RandomScaleCrop((6, 7), SCALES, interpolation="bicubic"), L_SHAPE),
    "scale-bicubic": (RandomScaleCrop((6, 7), (0.5, 1.5, 2), interpolation="bicubic",
                                      antialias=False), Rectangle(1, 2)),
    "scale-down-quarter": (RandomScaleCrop((2, 3), (0.25, 0.5), antialias=False,
                                           pad_if_needed=True), Rectangle(1, 1)),
    "resize-down-nearest": (Resize((5, 4), "nearest"), Rectangle(1, 1)),
    "rrc-bicubic": (RandomResizedCrop((4, 7), grid=(2, 2), interpolation="bicubic"), L_SHAPE),
}


@functools.lru_cache(maxsize=None)
def changes(name: str) -> np.ndarray:
    transform, region = {**TIGHT, **VALID}[name]
    return brute_force_changes(transform, IMAGE, region)


@pytest.mark.parametrize("name", list(TIGHT))
def test_tight_footprints_are_attained_at_every_placement(name):
    transform, region = TIGHT[name]
    changed = changes(name)
    accounted = transform.placement_probabilities(IMAGE, region)
    np.testing.assert_array_equal(changed, accounted)
    inc = transform.inclusion_probability(IMAGE, region)
    assert inc.fraction == changed.max() > 0
    y, x = inc.placement
    assert changed[y, x] == inc.fraction


@pytest.mark.parametrize("name", list(VALID))
def test_footprints_bound_the_change_probability(name):
    transform, region = VALID[name]
    changed = changes(name)
    accounted = transform.placement_probabilities(IMAGE, region)
    assert (changed <= accounted).all()
    assert transform.inclusion_probability(IMAGE, region).fraction >= changed.max()


def _shrunk(which):
    real = fp.resize_bounds

    def bounds(interps, in_size, out_size):
        lo, hi = real(interps, in_size, out_size)
        if which == "first+1":
            return np.minimum(lo + 1, hi - 1), hi
        return lo, np.maximum(hi - 1, lo + 1)
    return bounds


@pytest.mark.parametrize("broken", [None, "first+1", "last-1", "kernel-forgotten"])
def test_brute_force_catches_a_broken_footprint(broken, monkeypatch):
    """The accountant's footprint shrunk by one pixel (at either end), or computed with the
    nearest kernel for a bilinear image (the kernel's support forgotten), under-reports p; the
    brute force through the real resampling must see it."""
    transform, region = TIGHT["scale-bilinear-aa"]
    changed = changes("scale-bilinear-aa")
    with monkeypatch.context() as m:
        if broken in ("first+1", "last-1"):
            m.setattr(fp, "resize_bounds", _shrunk(broken))
        plans = transform.plans(IMAGE)
        kernels = (NEAREST,) if broken == "kernel-forgotten" else transform.interpolations
        accounted = fp.placement_probabilities(plans, kernels, IMAGE, region)
        p = fp.inclusion_from_plans({IMAGE: plans}, kernels, region).fraction
    exceeded = changed > accounted
    if broken is None:
        assert not exceeded.any() and changed.max() == p
    else:
        assert exceeded.any(), f"a {broken} footprint went unnoticed"
        assert changed.max() > p


def test_resampling_refuses_taps_outside_a_shrunk_footprint(monkeypatch):
    """The loader cuts the footprint window before resampling: if that window were too small,
    resampling raises instead of reading past it."""
    transform = RandomScaleCrop((6, 7), SCALES)
    image = torch.rand(3, *IMAGE)
    monkeypatch.setattr(fp, "resize_bounds", _shrunk("last-1"))
    with pytest.raises(RuntimeError, match="outside the footprint window"):
        for theta, _ in transform.thetas(IMAGE):
            resample(image, transform, theta)


@pytest.mark.parametrize("name", ["scale-bilinear-aa", "scale-bicubic-aa", "rrc-bicubic"])
def test_output_never_reads_outside_the_footprint(name):
    """Pixels outside the footprint window set to NaN: no output ever sees one."""
    transform = {**TIGHT, **VALID}[name][0]
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, *IMAGE, generator=gen, dtype=torch.float64)
    for theta, _ in transform.thetas(IMAGE):
        window = transform.footprint(IMAGE, theta)
        poisoned = torch.full_like(image, float("nan"))
        if window is not None:
            (y0, y1), (x0, x1) = window
            poisoned[..., y0:y1, x0:x1] = image[..., y0:y1, x0:x1]
        out = resample(poisoned, transform, theta)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, resample(image, transform, theta), rtol=0, atol=0)
