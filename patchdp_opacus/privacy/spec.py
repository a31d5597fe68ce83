"""What a patch-level claim is about: crop geometry, private region and image sizes.

One :class:`PatchPrivacySpec` is shared by the loader (which applies exactly this crop and
refuses images of undeclared sizes) and the accountant (which uses its ``p``), so the geometry
accounted for is the geometry applied.  The geometry is a fixed-size random crop
(:class:`~.geometry.CropGeometry`, Lemma 1) or a loader-owned geometric transform
(:class:`~.geometric.GeometricTransform`: random scale + crop, RandomResizedCrop, resize;
``p`` from its footprint, :mod:`.footprint`).

The spec may also hold a :class:`~.baselines.GaussianAugmentation`: then the loader adds
``N(0, sigma_aug^2)`` to every sample (in stored-image pixel units) and the accountant can
report the Gaussian-augmentation baseline, ``w = q * TV(sigma_aug)``, from the same object.
Two specs carry the same claim only if their augmentation is the same too
(:meth:`PatchPrivacySpec.same_geometry`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from patchdp_opacus.privacy.baselines import GaussianAugmentation
from patchdp_opacus.privacy.geometric import (
    GeometricTransform,
    as_transform,
    transform_from_dict,
)
from patchdp_opacus.privacy.geometry import (
    CropGeometry,
    InclusionProbability,
    _as_size_list,
    inclusion_probability,
)
from patchdp_opacus.privacy.regions import (
    PrivateRegion,
    as_region,
    region_from_dict,
    region_to_dict,
)


@dataclass(frozen=True, eq=False)
class PatchPrivacySpec:
    """crop: the random crop applied by the loader (a :class:`CropGeometry`) or a loader-owned
    :class:`~.geometric.GeometricTransform` (then ``inclusion`` is its footprint ``p``, with
    placements in stored-image pixels); region: the private region protected at
    any placement; image_sizes: every ``(H, W)`` the data set may contain (``p`` is the worst
    case over them); group_size: number of regions per image protected by group privacy (1 =
    one region, or a :class:`~.regions.Union` mask); unchecked_transforms: names of user
    transforms the pipeline inspection could not vouch for, accepted by an explicit override
    (recorded in privacy reports); augmentation: the Gaussian noise the loader adds to every
    sample (a :class:`~.baselines.GaussianAugmentation` or its dict), or None."""

    crop: CropGeometry | GeometricTransform
    region: PrivateRegion
    image_sizes: tuple
    group_size: int = 1
    unchecked_transforms: tuple = field(default=())
    augmentation: GaussianAugmentation | None = None

    def __post_init__(self):
        if not isinstance(self.crop, (CropGeometry, GeometricTransform)):
            object.__setattr__(self, "crop", CropGeometry(self.crop))
        object.__setattr__(self, "region", as_region(self.region))
        object.__setattr__(self, "image_sizes", tuple(_as_size_list(self.image_sizes)))
        object.__setattr__(self, "unchecked_transforms", tuple(self.unchecked_transforms))
        if isinstance(self.augmentation, dict):
            object.__setattr__(self, "augmentation",
                               GaussianAugmentation.from_dict(self.augmentation))
        if self.augmentation is not None and not isinstance(self.augmentation,
                                                            GaussianAugmentation):
            raise TypeError(f"augmentation must be a GaussianAugmentation, got "
                            f"{type(self.augmentation).__name__}")
        if int(self.group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        for size in self.image_sizes:  # fail early: crop must fit, region must fit
            self.transform.validate(size)
        _ = self.inclusion

    @property
    def transform(self) -> GeometricTransform:
        """The geometry behind the common transform interface (a CropGeometry as FixedCrop):
        ``draw_moduli``, ``theta_from_draws``, ``footprint``, ``plans``."""
        return as_transform(self.crop)

    @functools.cached_property
    def inclusion(self) -> InclusionProbability:
        if isinstance(self.crop, CropGeometry):
            return inclusion_probability(self.crop, self.image_sizes, self.region)
        return self.crop.inclusion_probability(self.image_sizes, self.region)

    @property
    def inclusion_probability(self) -> float:
        """p as a float (exact fraction in ``self.inclusion.fraction``)."""
        return self.inclusion.value

    @property
    def augmentation_tv(self) -> float | None:
        """``TV(sigma_aug)`` of the region (the Gaussian-augmentation factor replacing ``p``),
        or None without augmentation."""
        if self.augmentation is None:
            return None
        return self.augmentation.amplification(self.region)

    def to_dict(self) -> dict:
        return {
            "crop": self.crop.to_dict(),
            "region": region_to_dict(self.region),
            "image_sizes": [list(s) for s in self.image_sizes],
            "group_size": int(self.group_size),
            "unchecked_transforms": list(self.unchecked_transforms),
            "inclusion_probability": self.inclusion.value,
            "inclusion_fraction": f"{self.inclusion.fraction.numerator}/"
                                  f"{self.inclusion.fraction.denominator}",
            "augmentation": None if self.augmentation is None else {
                **self.augmentation.to_dict(), "tv": self.augmentation_tv,
                "sensitivity": self.augmentation.sensitivity(self.region)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PatchPrivacySpec":
        return cls(transform_from_dict(d["crop"]), region_from_dict(d["region"]),
                   tuple(tuple(s) for s in d["image_sizes"]), int(d.get("group_size", 1)),
                   tuple(d.get("unchecked_transforms", ())), d.get("augmentation"))

    def describe_geometry(self) -> str:
        """One line: the crop (padding included) or the transform, for logs and reports."""
        crop = self.crop
        if isinstance(crop, CropGeometry):
            return (f"crop {crop.crop_size[0]}x{crop.crop_size[1]}, padding "
                    f"{crop.padding[0]}x{crop.padding[1]}, pad_if_needed={crop.pad_if_needed}")
        inner = getattr(crop, "crop", None)
        pad = "" if inner is None else (f", padding {inner.padding[0]}x{inner.padding[1]}, "
                                        f"pad_if_needed={inner.pad_if_needed}")
        return crop.describe() + pad

    def same_geometry(self, other: "PatchPrivacySpec") -> bool:
        """Same crop/transform, region, image sizes, group size and augmentation (the
        unchecked-transform list may differ): the same claim."""
        a, b = self.to_dict(), other.to_dict()
        a.pop("unchecked_transforms"), b.pop("unchecked_transforms")
        return a == b
