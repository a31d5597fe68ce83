"""Baselines the paper compares patch-level amplification with.

(a) Gaussian-noise augmentation (Schuchardt et al. 2025): noise of std ``sigma_aug`` (pixel
    units, 0-255) is added to every input image.  Substituting a ``k_h x k_w`` patch of
    ``channels`` channels moves the input by at most ``r = 255 sqrt(channels k_h k_w)``
    (L2), and the amplification factor is the total-variation distance
    ``TV(N(0, s^2), N(r, s^2)) = 2 Phi(r / (2 s)) - 1``.  It replaces ``p`` in Theorem 2:
    ``w = q * TV``.
(b) Data-level noise: the plain Gaussian mechanism on the image itself, sensitivity ``r``,
    std ``sigma_data``, released once (no subsampling).

(a) as a training mechanism is :class:`GaussianAugmentation`, the object a
:class:`~patchdp_opacus.privacy.spec.PatchPrivacySpec` holds when the loader adds the noise.
What it assumes: the noise is i.i.d. ``N(0, sigma^2)`` per pixel and channel, in the units in
which two neighbouring images differ by at most ``pixel_range`` per value (0-255 pixel values),
added to *every* sample the loader yields, fresh at every use and unknown to the adversary; the
model sees nothing of the image but the noisy values (anything after the noise, a crop or a
normalisation, is post-processing).  What is proven (Schuchardt et al. 2025, as the paper's
baseline): one DP-SGD step is then dominated by Theorem 2's pair with ``w = q * TV``.  What
would be wrong: noise drawn in other units than ``r`` (e.g. 0-1 after ``ToTensor``, or after a
normalisation by the std: ``r`` would have to be rescaled), noise that a seed can regenerate,
or noise added to some samples only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from dp_accounting.pld import privacy_loss_mechanism
from scipy.stats import norm

from patchdp_opacus.privacy._sizes import as_size
from patchdp_opacus.privacy.regions import as_region

PIXEL_RANGE = 255.0


def input_sensitivity(patch_size, channels: int = 3, pixel_range: float = PIXEL_RANGE) -> float:
    """L2 distance between two images that differ in one ``patch_size`` patch (pixel units)."""
    kh, kw = as_size(patch_size, "patch_size")
    return pixel_range * math.sqrt(channels * kh * kw)


def gaussian_augmentation_tv(sigma_aug: float, patch_size, channels: int = 3,
                             pixel_range: float = PIXEL_RANGE) -> float:
    """Amplification factor of Gaussian input noise: ``2 Phi(r / (2 sigma_aug)) - 1``."""
    if not sigma_aug > 0:
        raise ValueError(f"sigma_aug must be > 0 (pixel units), got {sigma_aug}")
    r = input_sensitivity(patch_size, channels, pixel_range)
    return float(2.0 * norm.cdf(r / (2.0 * sigma_aug)) - 1.0)


def data_level_profile(sigma_data: float, patch_size, epsilons, channels: int = 3,
                       pixel_range: float = PIXEL_RANGE) -> np.ndarray:
    """``delta(eps)`` of one release of the image with Gaussian noise of std ``sigma_data``
    (pixel units) under patch substitution (sensitivity :func:`input_sensitivity`)."""
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0 (pixel units), got {sigma_data}")
    r = input_sensitivity(patch_size, channels, pixel_range)
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(standard_deviation=sigma_data,
                                                      sensitivity=r)
    return np.asarray(loss.get_delta_for_epsilon(np.asarray(epsilons, dtype=float)), dtype=float)


@dataclass(frozen=True)
class GaussianAugmentation:
    """Gaussian-noise augmentation as a training mechanism (baseline (a) above).

    sigma: noise std in pixel units (values ``0 .. pixel_range``); channels: channels of every
    image the noise is added to (the input sensitivity grows with ``sqrt(channels)``);
    pixel_range: largest change of one value between neighbours (255 for 8-bit images).

    :meth:`amplification` is the factor that replaces ``p``: ``w = q * TV``, with ``TV`` from
    :func:`gaussian_augmentation_tv` for the region's bounding box (``k_h x k_w``; a mask with
    fewer pixels would allow a smaller ``r``, the box is the conservative choice)."""

    sigma: float
    channels: int
    pixel_range: float = PIXEL_RANGE

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise ValueError(f"sigma_aug must be a positive finite number (pixel units 0-255), "
                             f"got {self.sigma!r}")
        if int(self.channels) != self.channels or self.channels < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}")
        object.__setattr__(self, "sigma", float(self.sigma))
        object.__setattr__(self, "channels", int(self.channels))
        object.__setattr__(self, "pixel_range", float(self.pixel_range))

    def sensitivity(self, region) -> float:
        """``r = pixel_range * sqrt(channels * k_h * k_w)`` for the region's bounding box."""
        return input_sensitivity(as_region(region).size, self.channels, self.pixel_range)

    def amplification(self, region) -> float:
        """``TV(N(0, sigma^2), N(r, sigma^2)) = 2 Phi(r / (2 sigma)) - 1`` (in ``(0, 1]``)."""
        return gaussian_augmentation_tv(self.sigma, as_region(region).size, self.channels,
                                        self.pixel_range)

    def to_dict(self) -> dict:
        return {"kind": "gaussian", "sigma": self.sigma, "channels": self.channels,
                "pixel_range": self.pixel_range}

    @classmethod
    def from_dict(cls, d: dict) -> "GaussianAugmentation":
        if d.get("kind", "gaussian") != "gaussian":
            raise ValueError(f"unknown augmentation kind {d.get('kind')!r}")
        return cls(float(d["sigma"]), int(d["channels"]), float(d.get("pixel_range",
                                                                      PIXEL_RANGE)))

    def describe(self) -> str:
        return (f"Gaussian noise augmentation sigma_aug = {self.sigma:g} (pixel units 0-"
                f"{self.pixel_range:g}), {self.channels} channel(s)")
