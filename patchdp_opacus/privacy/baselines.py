"""Baselines the paper compares patch-level amplification with.

(a) Gaussian-noise augmentation (Schuchardt et al. 2025): noise of std ``sigma_aug`` (pixel
    units, 0-255) is added to every input image.  Substituting a ``k_h x k_w`` patch of
    ``channels`` channels moves the input by at most ``r = 255 sqrt(channels k_h k_w)``
    (L2), and the amplification factor is the total-variation distance
    ``TV(N(0, s^2), N(r, s^2)) = 2 Phi(r / (2 s)) - 1``.  It replaces ``p`` in Theorem 2:
    ``w = q * TV``.
(b) Data-level noise: the plain Gaussian mechanism on the image itself, sensitivity ``r``,
    std ``sigma_data``, released once (no subsampling).
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.pld import privacy_loss_mechanism
from scipy.stats import norm

from patchdp_opacus.privacy._sizes import as_size

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
