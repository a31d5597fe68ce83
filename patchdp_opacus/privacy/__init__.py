"""The pure privacy layer (numpy, scipy, dp-accounting; never torch).

* :mod:`.regions` — private-region shapes and masks;
* :mod:`.geometry` — crop geometry and the exact worst-case inclusion probability ``p``;
* :mod:`.interpolation` — resampling kernels per axis (torch's), the source of every footprint;
* :mod:`.footprint` — the footprint analysis: exact ``p`` of any loader-owned geometric
  transform (random scale + crop, RandomResizedCrop, resize), parameter draws;
* :mod:`.geometric` — those transforms (frozen, serialisable, finite parameter grids);
* :mod:`.accounting` — Theorem-2 PLD accounting: epsilon/delta, profiles, noise calibration;
* :mod:`.baselines` — Gaussian-augmentation and data-level-noise baselines.
"""

from patchdp_opacus.privacy.accounting import (
    DEFAULT_DISCRETIZATION,
    SENSITIVITY,
    PatchDPSGD,
    calibrate_noise,
    delta,
    epsilon,
    group_epsilon,
    privacy_profile,
)
from patchdp_opacus.privacy.baselines import (
    GaussianAugmentation,
    data_level_profile,
    gaussian_augmentation_tv,
    input_sensitivity,
)
from patchdp_opacus.privacy.footprint import FootprintInclusion, Theta
from patchdp_opacus.privacy.geometric import (
    FixedCrop,
    GeometricTransform,
    RandomResizedCrop,
    RandomScaleCrop,
    Resize,
    as_transform,
    footprint_inclusion,
    transform_from_dict,
)
from patchdp_opacus.privacy.geometry import (
    CropGeometry,
    InclusionProbability,
    inclusion_probability,
    mask_hit_counts,
    rectangle_inclusion,
)
from patchdp_opacus.privacy.interpolation import Interpolation
from patchdp_opacus.privacy.regions import (
    Circle,
    Cluster,
    Crescent,
    Mask,
    PrivateRegion,
    Rectangle,
    Square,
    Union,
    as_region,
    make_region,
    region_from_dict,
    region_to_dict,
)
from patchdp_opacus.privacy.spec import PatchPrivacySpec

__all__ = [
    "DEFAULT_DISCRETIZATION", "SENSITIVITY", "PatchDPSGD", "calibrate_noise", "delta", "epsilon",
    "group_epsilon", "privacy_profile", "GaussianAugmentation", "data_level_profile",
    "gaussian_augmentation_tv",
    "input_sensitivity", "CropGeometry", "InclusionProbability", "inclusion_probability",
    "mask_hit_counts", "rectangle_inclusion", "Circle", "Cluster", "Crescent", "Mask",
    "PrivateRegion", "Rectangle", "Square", "Union", "as_region", "make_region",
    "region_from_dict", "region_to_dict", "PatchPrivacySpec", "FootprintInclusion", "Theta",
    "FixedCrop", "GeometricTransform", "RandomResizedCrop", "RandomScaleCrop", "Resize",
    "as_transform", "footprint_inclusion", "transform_from_dict", "Interpolation",
]
