"""The loader's Gaussian-noise augmentation (the paper's baseline, Schuchardt et al. 2025).

Mechanism.  When the loader's :class:`~patchdp_opacus.privacy.spec.PatchPrivacySpec` holds a
:class:`~patchdp_opacus.privacy.baselines.GaussianAugmentation` ``(sigma, channels)``, the
cropping dataset adds i.i.d. ``N(0, sigma^2)`` to every value of every sample's image, in the
pixel units of the images the dataset returns (0-255), and the accountant may claim
``w = q * TV(sigma)`` with ``TV`` for ``r = 255 * sqrt(channels * k_h * k_w)``.  The claim is
about exactly that: two neighbouring images differ by at most 255 per value inside the region,
and the model sees only the noisy values.

Where the noise goes (stored-image pixels, as the region):

* a fixed-size crop: on the crop, right after it.  Cropping i.i.d. noise on the whole image gives
  i.i.d. noise on the window, so this is the same distribution as noising the stored image first
  (pixels of the constant padding get noise too: independent of the data, post-processing);
* a loader-owned resampling transform (random scale, RandomResizedCrop, resize): on the whole
  stored image, *before* resampling (the resampling is then post-processing; noise added after
  it would not be in stored-image units: an upscale spreads one pixel over several);
* always before ``post_crop_transform`` (a normalisation there divides the noise and the
  sensitivity alike, after the noise).

Units are enforced, not assumed: the dataset's image (after its own transforms, before the
loader) must be ``uint8`` (a tensor ``(C, H, W)`` / ``(H, W)`` or an array ``(H, W, C)`` /
``(H, W)``) with the declared number of channels; anything else (floats scaled to 0-1, images
normalised by the dataset, PIL images) raises :class:`AugmentationUnitsError`, since the TV
computed for 0-255 units would then be false.  The noisy image is ``float32``, not clipped.

Randomness: the noise of one sample is drawn from a ``torch.Generator`` seeded with the
token's ``noise_seed`` (62 uniform bits the loader's sampler draws, per sample and per use,
from a generator seeded with OS entropy unless the user seeds it; see
:mod:`patchdp_opacus.plugin.sampler`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from patchdp_opacus.privacy.baselines import GaussianAugmentation

__all__ = ["AugmentationUnitsError", "check_pixel_units", "gaussian_noise", "noisy_sample",
           "replace_image"]


class AugmentationUnitsError(TypeError):
    """An image the Gaussian augmentation cannot vouch for (not 0-255 units, wrong channels)."""


def _channels(image) -> int:
    if isinstance(image, torch.Tensor):
        return 1 if image.ndim == 2 else int(image.shape[0])
    return 1 if image.ndim == 2 else int(image.shape[2])


def check_pixel_units(image, augmentation: GaussianAugmentation) -> None:
    """Refuse an image that is not ``uint8`` pixel values with ``augmentation.channels``
    channels (the units and the channel count the TV is computed for)."""
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim in (2, 3):
        dtype = image.dtype
        if dtype not in (torch.uint8, np.uint8):
            raise AugmentationUnitsError(
                f"Gaussian augmentation needs uint8 images (pixel values 0-255, the units of "
                f"sigma_aug and of the sensitivity r = 255*sqrt(C*k_h*k_w)); the dataset returns "
                f"{dtype}. Return the raw 8-bit pixels from the dataset and normalise later, "
                f"e.g. inside the model or in post_crop_transform (after the noise)")
        channels = _channels(image)
        if channels != augmentation.channels:
            raise AugmentationUnitsError(
                f"image has {channels} channel(s), the Gaussian augmentation was declared for "
                f"{augmentation.channels} (its sensitivity r grows with sqrt(channels)); declare "
                f"channels={channels}")
        return
    raise AugmentationUnitsError(
        f"Gaussian augmentation adds noise to uint8 tensors (C, H, W) or arrays (H, W, C); got "
        f"{type(image).__name__}{'' if not hasattr(image, 'shape') else tuple(image.shape)}. "
        f"Convert PIL images with torchvision.transforms.PILToTensor() in the dataset")


def gaussian_noise(shape, sigma: float, noise_seed: int) -> torch.Tensor:
    """``float32`` noise ``N(0, sigma^2)`` of ``shape`` from a generator seeded with
    ``noise_seed`` (a function of the seed alone: the loader draws a fresh secret seed per
    sample and use)."""
    generator = torch.Generator().manual_seed(int(noise_seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * float(sigma)


def _noisy(image, augmentation: GaussianAugmentation, noise_seed: int):
    check_pixel_units(image, augmentation)
    if isinstance(image, torch.Tensor):
        noise = gaussian_noise(image.shape, augmentation.sigma, noise_seed).to(image.device)
        return image.to(torch.float32) + noise
    return image.astype(np.float32) + gaussian_noise(image.shape, augmentation.sigma,
                                                     noise_seed).numpy()


def replace_image(sample: Any, image) -> Any:
    """``sample`` with its image (a bare image, ``sample[0]`` or ``sample["image"]``) replaced;
    the sample's type is kept."""
    if isinstance(sample, dict):
        return {**sample, "image": image}
    if isinstance(sample, tuple):
        items = (image, *sample[1:])
        return type(sample)(*items) if hasattr(sample, "_fields") else items
    if isinstance(sample, list):
        return [image, *sample[1:]]
    return image


def noisy_sample(sample: Any, image, augmentation: GaussianAugmentation, noise_seed: int):
    """``sample`` whose image ``image`` (``sample``'s own, already located) gets the noise."""
    return replace_image(sample, _noisy(image, augmentation, noise_seed))
