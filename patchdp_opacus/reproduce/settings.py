"""The settings of the paper's privacy-only figures (its appendix C.4, D.1, D.2), each value
that the paper's text export lost chosen here and marked so.

Noise units. The paper's figures label the noise "sigma": the standard deviation of the Gaussian
noise on a sum of clipped gradients of sensitivity 2C with C = 2 — an absolute std, not Opacus'
multiplier. Opacus' noise multiplier z (std = z * C, what :mod:`patchdp_opacus.privacy` takes)
is ``sigma / C``: the paper's sigma = 1, 2, 4 are z = 0.5, 1, 2 here. Every figure is labelled
with both. (The authors' public configs compute exactly this: std sigma, sensitivity 2C = 4.)

Defaults shared by every figure (paper C.4; the numbers come from the authors' public configs):
image 1000x1000, no padding, N = 100000 images, B = 100 (q = 1e-3), 100 epochs = 100000
steps, C = 2, delta = 1e-5, RGB (3 channels) for the data-level baseline.
Nothing here computes p or epsilon: :meth:`PrivacySetting.run` hands the privacy layer the
spec it computes ``p`` from, and the figure code calls the privacy layer's functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from patchdp_opacus.privacy import CropGeometry, PatchDPSGD, PatchPrivacySpec, make_region
from patchdp_opacus.privacy.accounting import steps_per_epoch

__all__ = ["PAPER", "PrivacySetting", "crop_grid", "epsilon_grid", "patch_grid"]


@dataclass(frozen=True)
class PrivacySetting:
    """One DP-SGD setting of a privacy figure. Sizes are (height, width) in pixels; ``sigma``
    is the paper's absolute noise std (z = sigma / clip_norm); ``sigma_data`` is the data-level
    baseline's noise std in pixel units (0-255)."""

    image_size: tuple = (1000, 1000)
    crop: int = 200
    patch: tuple = (20, 20)
    shape: str = "rectangle"
    sigma: float = 2.0
    sigma_data: float = 1000.0
    dataset_size: int = 100_000
    batch_size: int = 100
    epochs: int = 100
    clip_norm: float = 2.0
    delta: float = 1e-5
    channels: int = 3

    @property
    def noise_multiplier(self) -> float:
        """Opacus' z for the paper's sigma (noise std z * C = sigma)."""
        return self.sigma / self.clip_norm

    @property
    def steps(self) -> int:
        return self.epochs * steps_per_epoch(self.dataset_size, self.batch_size)

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def spec(self) -> PatchPrivacySpec:
        return PatchPrivacySpec(CropGeometry(self.crop), make_region(self.shape, self.patch),
                                [self.image_size])

    def run(self, inclusion_probability: float | None = None) -> PatchDPSGD:
        """The run with ``p`` from :meth:`spec` (or the given one; 1 = record level)."""
        p = self.spec().inclusion_probability if inclusion_probability is None \
            else inclusion_probability
        return PatchDPSGD(self.noise_multiplier, self.sample_rate, p, self.steps)

    def with_(self, **changes) -> "PrivacySetting":
        return replace(self, **changes)


#: Fig. 2's "representative configuration" (the paper's values were lost): crop 200, sigma 2
#: (z = 1), data-level sigma 1000 — the centre of the authors' grids (crop 100/200/400, patch
#: 10/20/40, sigma 1/2/4) and the fixed values of their D.1.4/D.1.5 runs.
PAPER = PrivacySetting()


def epsilon_grid(num: int = 50) -> np.ndarray:
    """The profiles' epsilon axis: ``num`` log-spaced values from 0.1 to 1000 nats (as the
    authors' configs)."""
    return np.logspace(-1, 3, num)


def crop_grid(image_size, num: int = 20) -> list[int]:
    """Crop sides of the crop sweeps: ``num`` evenly spaced from 10 to 700 (square images) or
    to 1000 (1000x2000), rounded to whole pixels (the authors' grids)."""
    top = 700 if image_size[0] == image_size[1] else min(image_size)
    return sorted({int(round(v)) for v in np.linspace(10, top, num)})


def patch_grid(num: int = 20) -> list[int]:
    """Patch sides of the patch sweeps: ``num`` evenly spaced from 1 to 120 pixels."""
    return sorted({int(round(v)) for v in np.linspace(1, 120, num)})
