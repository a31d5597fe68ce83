"""The neighbour-pair audit through the real loader for every loader-owned transform: it passes
the sound ones with a differing rate that matches the transform's p, and it fails -- each time
for the right reason -- when the footprint is one pixel too small, when the kernel's support is
forgotten, when p is under-claimed, and when something before the loader reads one pixel
beyond the footprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from patchdp_opacus.audit import audit_loader
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.plugin.resample import FootprintError
from patchdp_opacus.privacy import CropGeometry, PatchPrivacySpec, Rectangle
from patchdp_opacus.privacy import footprint as fp
from patchdp_opacus.privacy.geometric import RandomResizedCrop, RandomScaleCrop, Resize
from patchdp_opacus.privacy.interpolation import NEAREST

SIZE = (16, 20)
REGION = Rectangle(3, 4)


class Scenes(Dataset):
    """Float images (3, H, W) and int64 masks, decoded by ``_load`` (so the audit can inject
    its neighbour images); ``hidden`` runs in ``__getitem__``, where no inspection sees it."""

    image_sizes = [SIZE]

    def __init__(self, n=4, hidden=None):
        self.n, self._hidden = n, hidden

    def __len__(self):
        return self.n

    def _load(self, index):
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, *SIZE, generator=g, dtype=torch.float64)
        return image, (image[0] * 3).long()

    def __getitem__(self, index):
        image, mask = self._load(index)
        return self._hidden(image, mask) if self._hidden is not None else (image, mask)


def loader_for(transform, dataset=None, **kw):
    spec = PatchPrivacySpec(transform, REGION, [SIZE])
    return CropDPDataLoader(dataset or Scenes(), batch_size=2, spec=spec, seed=0, **kw)


SOUND = {
    "fixed-crop": CropGeometry((6, 7), padding=(1, 1)),
    "scale-crop": RandomScaleCrop((6, 7), (0.5, 0.75, 1, 1.5, 2), pad_if_needed=True),
    "random-resized-crop": RandomResizedCrop((6, 6), scale=(0.1, 0.5), grid=(3, 3)),
    "resize-then-crop": Resize((24, 30), crop=(6, 7)),
}


@pytest.mark.parametrize("name", list(SOUND))
def test_the_audit_passes_every_loader_owned_transform_and_its_rate_is_p(name):
    loader = loader_for(SOUND[name])
    report = audit_loader(loader, trials=400, batch=2, origin_draws=3000)
    assert report.passed, report.table()
    assert report.outside == report.footprint_errors == 0
    # these footprints are tight (footprint brute force): the worst placement is hit with
    # probability p exactly, so the interval covers it
    assert report.ci_low <= loader.inclusion_probability <= report.ci_high, report.table()
    if name != "fixed-crop":
        assert set(report.origin_uniformity) == ({"choice", "y", "x"} if
                                                  loader.transform.num_choices > 1 else {"y", "x"})


class OnePixelShort(RandomScaleCrop):
    """Deliberately broken: the footprint of every theta is one pixel short at the far end of
    each axis (the loader cuts exactly this window)."""

    def footprint(self, image_size, theta):
        window = super().footprint(image_size, theta)
        if window is None:
            return None
        (y0, y1), (x0, x1) = window
        return (y0, max(y1 - 1, y0 + 1)), (x0, max(x1 - 1, x0 + 1))


class KernelForgotten(RandomScaleCrop):
    """Deliberately broken: footprints (and so p) of the mask's nearest kernel only, while the
    image is resampled bilinearly -- the kernel's support forgotten."""

    @property
    def interpolations(self):
        return (NEAREST,)


@pytest.mark.parametrize("broken", [OnePixelShort, KernelForgotten])
def test_a_footprint_smaller_than_what_resampling_reads_fails(broken):
    """The loader never reads outside the footprint it reports: it refuses (FootprintError),
    and the audit reports the refusals as a failure instead of passing."""
    transform = broken((6, 7), (0.75, 1, 1.5))
    loader = loader_for(transform)
    with pytest.raises(FootprintError, match="outside the footprint window"):
        for _ in loader:
            pass
    report = audit_loader(loader, trials=100, batch=1, origin_draws=200)
    assert not report.passed and report.footprint_errors > 0, report.table()
    assert "outside the footprint the accountant's p is computed from" in report.table()
    control = audit_loader(loader_for(RandomScaleCrop((6, 7), (0.75, 1, 1.5))), trials=100,
                           batch=1, origin_draws=200)
    assert control.passed and control.footprint_errors == 0


def short_p(transform):
    """p of ``transform`` with every per-origin footprint one pixel short at its far end."""
    real = fp.resize_bounds

    def bounds(interps, in_size, out_size):
        lo, hi = real(interps, in_size, out_size)
        return lo, np.maximum(hi - 1, lo + 1)

    fp.resize_bounds = bounds
    try:
        return fp.inclusion_from_plans({SIZE: transform.plans(SIZE)}, transform.interpolations,
                                       REGION)
    finally:
        fp.resize_bounds = real


class UnderClaimed(RandomScaleCrop):
    """Deliberately broken: resamples correctly, but claims the p of footprints one pixel
    short."""

    def inclusion_probability(self, image_sizes, region):
        return short_p(RandomScaleCrop(self.crop, self.scales))


def test_an_under_claimed_p_is_refuted_by_the_differing_rate():
    """Resampling and footprints are right, p is one pixel short: the audit's rate, compared
    with the transform's p, refutes it; the honest transform passes the same audit."""
    honest = RandomScaleCrop((4, 4), (0.75, 1, 1.5))
    broken = UnderClaimed((4, 4), (0.75, 1, 1.5))
    loader = loader_for(broken)
    assert loader.inclusion_probability < honest.inclusion_probability([SIZE], REGION).value
    report = audit_loader(loader, trials=1500, confidence=0.99, batch=1, origin_draws=200)
    assert report.refuted and not report.passed and report.outside == 0, report.table()
    fair = audit_loader(loader_for(honest), trials=1500, confidence=0.99, batch=1,
                        origin_draws=200)
    assert fair.passed, fair.table()


def _shift_one_pixel(image, mask):  # reads the pixel above-left: one pixel beyond F(theta)
    return torch.roll(image, (1, 1), dims=(-2, -1)), mask


@pytest.mark.parametrize("name", ["scale-crop", "random-resized-crop", "resize-then-crop"])
def test_reading_one_pixel_beyond_the_footprint_is_a_definite_violation(name):
    """A one-pixel shift before the loader's transform: crops whose footprint (for the drawn
    theta, by the accountant's own function) misses the region still change.  (No flips here:
    mirrors=False makes the test exact to the pixel.)"""
    report = audit_loader(loader_for(SOUND[name], Scenes(hidden=_shift_one_pixel),
                                     allow_unchecked_transforms=True), trials=400, batch=1,
                          origin_draws=200, mirrors=False)
    assert report.outside > 0 and not report.passed, report.table()
    sound = audit_loader(loader_for(SOUND[name]), trials=400, batch=1, origin_draws=200,
                         mirrors=False)
    assert sound.passed and sound.outside == 0, sound.table()


def test_non_uniform_parameter_draws_fail_the_audit():
    loader = loader_for(SOUND["scale-crop"])
    assert audit_loader(loader, trials=20, batch=1).uniform
    loader.batch_sampler.choice_modulus = 6   # 5 scales: the first one twice as likely
    report = audit_loader(loader, trials=20, batch=1)
    assert report.origin_uniformity["choice"] < 1e-3 and not report.passed
