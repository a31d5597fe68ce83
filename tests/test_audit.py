"""The neighbour-pair audit through the real loader: it passes sound pipelines and catches what
the hardening issue found (whole-image statistics, warps, interpolating resizes, sample-mixing
collates, non-uniform origins), also where no inspection can see it (code in __getitem__)."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms.v2 as V  # noqa: E402
from scipy import stats  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from patchdp_opacus.audit import AuditReport, audit_loader, clopper_pearson  # noqa: E402
from patchdp_opacus.plugin.loader import CropDPDataLoader  # noqa: E402
from patchdp_opacus.privacy import CropGeometry, PatchPrivacySpec, Rectangle  # noqa: E402
from patchdp_opacus.segmentation.datasets.base import SegmentationDataset  # noqa: E402

SIZE, CROP, REGION = (16, 20), (6, 7), (3, 4)
TRIALS = 400


class Scenes(SegmentationDataset):
    """uint8 images (3, H, W) and masks; ``hidden`` is applied in ``__getitem__`` and kept on
    the class, as code is (no inspection sees it); ``raw_size`` differs from ``SIZE`` when
    ``hidden`` resizes."""

    hidden = None

    def __new__(cls, *args, hidden=None, **kw):
        if hidden is not None:
            cls = type(f"Hidden_{hidden.__name__}", (cls,), {"hidden": staticmethod(hidden)})
        return super().__new__(cls)

    def __init__(self, n=6, transform=None, hidden=None, raw_size=SIZE):
        super().__init__(transform)
        self._sizes = [raw_size] * n
        self.raw_size = raw_size

    def _load(self, index):
        g = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, *self.raw_size), generator=g, dtype=torch.uint8)
        return image, (image[0] // 86).long()

    def __getitem__(self, index):
        image, mask = super().__getitem__(index)
        if self.hidden is not None:
            image, mask = self.hidden(image, mask)
        return image, mask

    @property
    def image_sizes(self):
        return {SIZE}


def loader_for(dataset, **kw):
    spec = PatchPrivacySpec(CropGeometry(CROP), Rectangle(*REGION), [SIZE])
    return CropDPDataLoader(dataset, batch_size=3, spec=spec, seed=0, **kw)


def _contrast(image, mask):  # ColorJitter(contrast) with a fixed factor: whole-image mean
    return V.functional.adjust_contrast(image, 1.5), mask


def _rotate(image, mask):
    angle = float(torch.empty(()).uniform_(-45, 45))
    return V.functional.rotate(image, angle), V.functional.rotate(mask[None], angle)[0]


def _bilinear_up(image, mask):  # raw 8x10 -> 16x20, region declared in resized pixels
    up = F.interpolate(image[None].float(), size=SIZE, mode="bilinear")[0].round().byte()
    return up, F.interpolate(mask[None, None].float(), size=SIZE)[0, 0].long()


def _nearest_up(image, mask):
    up = F.interpolate(image[None].float(), size=SIZE, mode="nearest")[0].byte()
    return up, F.interpolate(mask[None, None].float(), size=SIZE)[0, 0].long()


def _mix(batch):  # MixUp-like: every image blended with the next one
    images, masks = default_collate(batch)
    return 0.7 * images.float() + 0.3 * images.roll(1, 0).float(), masks


def test_sound_pipeline_passes_and_the_rate_matches_p():
    ds = Scenes(transform=lambda im, m: (V.functional.horizontal_flip(im),
                                         V.functional.horizontal_flip(m)))
    loader = loader_for(ds, allow_unchecked_transforms=["<lambda>"],
                        post_crop_transform=V.ColorJitter(brightness=0.5, contrast=0.5))
    report = audit_loader(loader, trials=TRIALS)
    assert report.passed, report.table()
    assert report.outside == 0 and report.leaks_to_other_samples == 0
    # the worst placement is hit with probability p exactly: the interval covers it
    assert report.ci_low <= loader.inclusion_probability <= report.ci_high
    assert "PASS" in report.table()


@pytest.mark.parametrize("hidden,raw_size", [
    (_contrast, SIZE),            # finding 1: statistics of the whole image
    (_rotate, SIZE),              # finding 2: a warp the inspection cannot see
    (_bilinear_up, (8, 10)),      # finding 9: interpolation spreads the region
], ids=["whole-image-contrast", "rotation", "bilinear-resize"])
def test_hidden_transforms_are_caught(hidden, raw_size):
    report = audit_loader(loader_for(Scenes(hidden=hidden, raw_size=raw_size)), trials=TRIALS)
    assert not report.passed, report.table()
    if raw_size == SIZE:  # a definite violation, not only a statistical one
        assert report.outside > 0 and "missed the private region" in report.table()
    else:  # the spread region is hit more often than p allows
        assert report.outside > 0 or report.refuted


def test_nearest_resize_control_passes():
    report = audit_loader(loader_for(Scenes(hidden=_nearest_up, raw_size=(8, 10))),
                          trials=TRIALS)
    assert report.passed, report.table()


def test_sample_mixing_collate_is_caught():
    """Finding 8: accepted by the override, caught by the audit."""
    loader = loader_for(Scenes(), collate_fn=_mix, allow_unchecked_transforms=["_mix"])
    report = audit_loader(loader, trials=TRIALS)
    assert report.leaks_to_other_samples > 0 and not report.passed
    assert audit_loader(loader_for(Scenes()), trials=TRIALS).leaks_to_other_samples == 0


def test_wrong_origin_moduli_are_caught_by_the_histogram():
    loader = loader_for(Scenes())
    assert audit_loader(loader, trials=50).uniform
    loader.batch_sampler.origin_moduli = (13, 17)  # not multiples of the origin counts 11, 14
    report = audit_loader(loader, trials=50)
    assert not report.uniform and not report.passed


def test_refutation_and_clopper_pearson():
    low, high = clopper_pearson(30, 100, 0.95)
    exact = stats.binomtest(30, 100).proportion_ci(0.95, method="exact")
    assert (low, high) == pytest.approx((exact.low, exact.high), rel=1e-9)
    kw = dict(p_at_audited_size=0.5, confidence=0.999, outside=0, leaks_to_other_samples=0,
              origin_uniformity={"y": 0.5}, image_size=SIZE, placement=(0, 0))
    refuted = AuditReport(trials=1000, differing=900, claimed_p=0.8,
                          ci_low=clopper_pearson(900, 1000, 0.999)[0], ci_high=1.0, **kw)
    assert refuted.refuted and not refuted.passed and "lies above" in refuted.table()
    fine = AuditReport(trials=1000, differing=790, claimed_p=0.8,
                       ci_low=clopper_pearson(790, 1000, 0.999)[0], ci_high=1.0, **kw)
    assert fine.passed
