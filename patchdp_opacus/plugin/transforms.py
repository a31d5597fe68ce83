"""Inspect a user's transform pipeline for what the patch-level analysis covers.

The analysis assumes that the only randomness that moves pixels is the loader's crop (uniform
origins over the constant-padded image) and that a crop which does not cover the private
region does not depend on it.  The user's transforms run *before* that crop (inside
``dataset[i]``), so they must preserve both:

* allowed: flips; per-pixel photometric transforms (colour jitter, fixed-statistics
  ``Normalize``, dtype/tensor conversions, brightness/contrast, pixel noise, grayscale, ...);
  deterministic geometry of the *full* image: resize to a fixed size, center crop, constant
  padding.  The loader checks every image size at crop time against the declared
  ``image_sizes``, which must be the sizes *after* these transforms (e.g. the resized size),
  and the private region is measured in those pixels.  Interpolating resizes spread a pixel
  over the interpolation support (about 1 pixel for bilinear upsampling, the scale factor when
  downsampling with antialiasing): enlarge the declared region by that much if it matters.
* refused, with the reason: random crops of any kind (the loader crops), random-scale crops
  and random resizes (the region's size in pixels changes), data-dependent crops,
  non-constant padding (copies the region into the border), rotations / affine / perspective
  / elastic warps, sample-mixing (MixUp, CutMix, Mosaic), and image-global statistics
  (equalize, autocontrast, per-image normalisation: every pixel then depends on the region).
* needs review (refused unless ``allow_unchecked_transforms=True``, then recorded in
  ``PatchPrivacySpec.unchecked_transforms``): neighbourhood filters (blur, sharpen, JPEG: they
  spread the region by the kernel radius), arbitrary ``Lambda`` functions, 90-degree
  rotations / transposes, and every transform not in the tables.

Rules are data (:data:`RULES`, :data:`ATTRIBUTE_RULES`), matched by class name within a library
(the class's ``__module__`` prefix); subclasses defined elsewhere count as unknown.  Only
transforms reachable from a dataset's ``transform`` / ``transforms`` / ``target_transform``
attributes are seen: random crops hard-coded in ``__getitem__`` cannot be detected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ALLOW, DENY, REVIEW, CONTAINER = "allow", "deny", "review", "container"


@dataclass(frozen=True)
class Rule:
    verdict: str  # ALLOW, DENY, REVIEW or CONTAINER
    reason: str


# --- reasons ---------------------------------------------------------------------------------
RANDOM_CROP = ("a random crop in the user's pipeline: the loader applies the only crop the "
               "privacy analysis covers; remove it and give the crop to the loader (crop=...)")
SCALE_CROP = ("crops at a random scale and resizes: the private region's size in pixels changes "
              "with the scale, so p computed for the declared region does not hold; remove it "
              "(the loader crops), or use a deterministic Resize before the loader's crop")
DATA_CROP = ("data-dependent crop (placed by the mask or boxes): crop origins are not uniform and "
             "may seek out the private region; remove it")
MULTI_CROP = ("returns several crops per sample; the analysis covers one uniform crop per sample "
              "made by the loader; remove it")
RANDOM_SCALE = ("random rescaling: the private region's size in pixels changes with the scale; "
                "use a deterministic Resize to a fixed size and declare that size")
WARP = ("rotation/affine/perspective/elastic warp before the crop moves and reshapes the private "
        "region (its footprint grows and borders may be filled from the image), which the "
        "analysis does not cover; remove it, or apply it to the cropped batch in the training "
        "step")
MIXING = ("combines several images into one sample: one image's private region can reach "
          "another sample, breaking per-sample sensitivity; remove it")
PADDING = ("non-constant padding (reflect/replicate/wrap) copies pixels of the private region "
           "into the border, so a crop can contain them without covering the region; use "
           "constant padding (padding_mode='constant' / border_mode=cv2.BORDER_CONSTANT) or the "
           "loader's padding=...")
GLOBAL_STATS = ("uses statistics of the whole image (histogram, min/max, per-image mean/std, "
                "PCA), so every output pixel depends on the private region, even in crops that "
                "do not cover it; remove it or use fixed statistics")
AUTO_AUGMENT = ("automatic augmentation policy that includes rotations, shears and translations, "
                "which move and reshape the private region; remove it or compose the allowed "
                "photometric transforms explicitly")
NEIGHBOURHOOD = ("mixes neighbouring pixels (kernel/block filter), so the private region leaks "
                 "into pixels up to the kernel radius away; enlarge private_region by the kernel "
                 "size on each side before accepting it")
LAMBDA = "arbitrary function: its effect on pixels cannot be inspected"
ROT90 = ("90-degree rotation / transpose: swaps height and width of the image and the region; "
         "covered only if the declared image sizes include the transposed sizes and the region "
         "is symmetric under it")
INPAINT = NEIGHBOURHOOD + " (inpainting fill)"
UNKNOWN = ("not in the tables of transforms known to be safe before a uniform random crop "
           "(flips, per-pixel photometric transforms, deterministic resizes)")


def _rules(verdict: str, reason: str, names: str) -> dict[str, Rule]:
    return {n: Rule(verdict, reason) for n in names.split()}


def _allowed(names: str, note: str = "") -> dict[str, Rule]:
    return _rules(ALLOW, note, names)


#: Library -> class name -> rule.  A class belongs to a library when its ``__module__`` starts
#: with one of the library's module prefixes (:data:`LIBRARY_MODULES`).
RULES: dict[str, dict[str, Rule]] = {
    "torchvision": {
        **_rules(CONTAINER, "", "Compose RandomApply RandomChoice RandomOrder"),
        **_allowed("ToTensor PILToTensor ToPILImage ConvertImageDtype ToImage ToDtype "
                   "ToPureTensor RGB Identity", "type/dtype conversion"),
        **_allowed("Normalize ColorJitter Grayscale RandomGrayscale RandomInvert "
                   "RandomPosterize RandomSolarize RandomChannelPermutation "
                   "RandomPhotometricDistort GaussianNoise RandomErasing",
                   "per-pixel photometric"),
        **_allowed("RandomHorizontalFlip RandomVerticalFlip", "flip"),
        **_allowed("Resize CenterCrop Pad", "deterministic geometry: declare the output size"),
        **_rules(DENY, RANDOM_CROP, "RandomCrop"),
        **_rules(DENY, SCALE_CROP, "RandomResizedCrop"),
        **_rules(DENY, DATA_CROP, "RandomIoUCrop"),
        **_rules(DENY, MULTI_CROP, "FiveCrop TenCrop"),
        **_rules(DENY, RANDOM_SCALE, "RandomResize RandomShortestSize ScaleJitter RandomZoomOut"),
        **_rules(DENY, WARP, "RandomRotation RandomAffine RandomPerspective ElasticTransform"),
        **_rules(DENY, MIXING, "MixUp CutMix"),
        **_rules(DENY, AUTO_AUGMENT, "AutoAugment RandAugment TrivialAugmentWide AugMix"),
        **_rules(DENY, GLOBAL_STATS, "RandomEqualize RandomAutocontrast LinearTransformation"),
        **_rules(REVIEW, NEIGHBOURHOOD, "GaussianBlur RandomAdjustSharpness JPEG"),
        **_rules(REVIEW, LAMBDA, "Lambda"),
    },
    "albumentations": {
        **_rules(CONTAINER, "", "Compose OneOf SomeOf Sequential OneOrOther RandomOrder "
                                "ReplayCompose SelectiveChannelTransform"),
        **_allowed("ToTensorV2 ToFloat FromFloat NoOp", "type/dtype conversion"),
        **_allowed("Normalize RandomBrightnessContrast ColorJitter HueSaturationValue RGBShift "
                   "ChannelShuffle ChannelDropout ToGray ToRGB ToSepia InvertImg Solarize "
                   "Posterize RandomGamma RandomToneCurve PlanckianJitter GaussNoise "
                   "MultiplicativeNoise ShotNoise SaltAndPepper AdditiveNoise ISONoise "
                   "PixelDropout CoarseDropout Erasing GridDropout XYMasking",
                   "per-pixel photometric / data-independent occlusion"),
        **_allowed("HorizontalFlip VerticalFlip", "flip"),
        **_allowed("Resize LongestMaxSize SmallestMaxSize PadIfNeeded Pad CenterCrop Crop",
                   "deterministic geometry: declare the output size"),
        **_rules(DENY, RANDOM_CROP, "RandomCrop RandomCropFromBorders CropAndPad"),
        **_rules(DENY, SCALE_CROP, "RandomResizedCrop RandomSizedCrop"),
        **_rules(DENY, DATA_CROP, "CropNonEmptyMaskIfExists BBoxSafeRandomCrop "
                                  "RandomSizedBBoxSafeCrop RandomCropNearBBox "
                                  "AtLeastOneBBoxRandomCrop"),
        **_rules(DENY, RANDOM_SCALE, "RandomScale"),
        **_rules(DENY, WARP, "Affine ShiftScaleRotate Rotate SafeRotate Perspective "
                             "ElasticTransform GridDistortion OpticalDistortion PiecewiseAffine "
                             "ThinPlateSpline GridElasticDeform RandomGridShuffle "
                             "ChromaticAberration"),
        **_rules(DENY, MIXING, "Mosaic OverlayElements FDA HistogramMatching "
                               "PixelDistributionAdaptation"),
        **_rules(DENY, GLOBAL_STATS, "Equalize AutoContrast CLAHE FancyPCA"),
        **_rules(REVIEW, NEIGHBOURHOOD, "Blur GaussianBlur MedianBlur MotionBlur GlassBlur "
                                        "AdvancedBlur Defocus ZoomBlur Sharpen Emboss "
                                        "UnsharpMask RingingOvershoot Downscale "
                                        "ImageCompression Morphological Superpixels"),
        **_rules(REVIEW, ROT90, "RandomRotate90 Transpose D4 SquareSymmetry"),
        **_rules(REVIEW, LAMBDA, "Lambda"),
    },
    "torch": _rules(CONTAINER, "", "Sequential"),
}

LIBRARY_MODULES: dict[str, tuple[str, ...]] = {
    "torchvision": ("torchvision.transforms",),
    "albumentations": ("albumentations",),
    "torch": ("torch.nn.modules.container",),
}

_BORDER_CONSTANT = 0  # cv2.BORDER_CONSTANT


def _bad_padding_mode(t) -> Rule | None:
    mode = getattr(t, "padding_mode", None)
    if mode is not None and str(getattr(mode, "value", mode)).lower() != "constant":
        return Rule(DENY, PADDING + f" (padding_mode={mode!r})")
    return None


def _bad_border_mode(t) -> Rule | None:
    mode = getattr(t, "border_mode", None)
    if mode is not None and mode != _BORDER_CONSTANT:
        return Rule(DENY, PADDING + f" (border_mode={mode!r})")
    return None


def _image_statistics_normalize(t) -> Rule | None:
    norm = getattr(t, "normalization", "standard")
    if type(t).__name__ == "Normalize" and norm not in ("standard", None):
        return Rule(DENY, GLOBAL_STATS + f" (normalization={norm!r})")
    return None


def _inpainting_fill(t) -> Rule | None:
    fill = getattr(t, "fill", None)
    if isinstance(fill, str) and fill.startswith("inpaint"):
        return Rule(REVIEW, INPAINT + f" (fill={fill!r})")
    return None


#: Library -> checks run on every instance not denied by name (e.g. an allowed ``Pad`` with
#: reflect padding); the first rule returned wins over the name table.
ATTRIBUTE_RULES = {
    "torchvision": (_bad_padding_mode,),
    "albumentations": (_bad_border_mode, _image_statistics_normalize, _inpainting_fill),
    "torch": (),
}


class TransformNotAllowedError(ValueError):
    """A transform the patch-level analysis does not cover (``verdict`` "deny"), or one it
    cannot verify (``verdict`` "review" / "unknown") without the explicit override."""

    def __init__(self, message: str, *, name: str, where: str, verdict: str, reason: str):
        super().__init__(message)
        self.name, self.where, self.verdict, self.reason = name, where, verdict, reason


@dataclass
class InspectionReport:
    """``checked``: transforms found safe; ``unchecked``: transforms accepted only through
    ``allow_unchecked_transforms=True`` (to be recorded in ``spec.unchecked_transforms``)."""

    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    def merge(self, other: "InspectionReport") -> None:
        for name in other.checked:
            if name not in self.checked:
                self.checked.append(name)
        for name in other.unchecked:
            if name not in self.unchecked:
                self.unchecked.append(name)


def qualified_name(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    if callable(obj) and not isinstance(obj, type) and hasattr(obj, "__qualname__"):
        cls = obj  # a plain function or lambda
    module = getattr(cls, "__module__", None) or "?"
    return f"{module}.{getattr(cls, '__qualname__', type(obj).__name__)}"


def library_of(obj) -> str | None:
    module = getattr(type(obj), "__module__", "") or ""
    for lib, prefixes in LIBRARY_MODULES.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return lib
    return None


def rule_for(obj) -> Rule | None:
    """The rule for one transform instance, or ``None`` if unknown."""
    lib = library_of(obj)
    if lib is None:
        return None
    rule = RULES[lib].get(type(obj).__name__)
    if rule is not None and rule.verdict == DENY:  # the class's own reason comes first
        return rule
    for check in ATTRIBUTE_RULES.get(lib, ()):
        found = check(obj)
        if found is not None:
            return found
    return rule


def _children(obj) -> list:
    if type(obj).__name__ == "Sequential" and library_of(obj) == "torch":
        return list(obj.children())
    return list(getattr(obj, "transforms", None) or [])


def inspect_pipeline(transform: Any, *, allow_unchecked: bool = False,
                     where: str = "transform") -> InspectionReport:
    """Walk ``transform`` (nested containers included) and apply the rule tables.

    Raises :class:`TransformNotAllowedError` for a refused transform, and for an unknown /
    needs-review one unless ``allow_unchecked``; with it, their qualified names are returned
    in ``report.unchecked``."""
    report = InspectionReport()
    _walk(transform, where, allow_unchecked, report, set())
    return report


def _walk(obj, where: str, allow_unchecked: bool, report: InspectionReport, seen: set) -> None:
    if obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    name = qualified_name(obj)
    if type(obj).__name__ == "StandardTransform" \
            and type(obj).__module__.startswith("torchvision.datasets"):
        # VisionDataset.transforms pairs transform and target_transform
        for child, attr in ((obj.transform, "transform"), (obj.target_transform,
                                                           "target_transform")):
            _walk(child, f"{where}.{attr}", allow_unchecked, report, seen)
        return
    if isinstance(obj, (list, tuple)):
        for i, child in enumerate(obj):
            _walk(child, f"{where}[{i}]", allow_unchecked, report, seen)
        return
    rule = rule_for(obj)
    if rule is not None and rule.verdict == CONTAINER:
        for i, child in enumerate(_children(obj)):
            _walk(child, f"{where}.transforms[{i}]", allow_unchecked, report, seen)
        return
    if rule is not None and rule.verdict == ALLOW:
        if name not in report.checked:
            report.checked.append(name)
        if type(obj).__name__ in ("Pad", "PadIfNeeded", "CenterCrop", "Crop") \
                and getattr(obj, "fill_mask", None) == 0:
            logger.warning("%s (%s) pads masks with 0, a real class in most label sets; set "
                           "fill_mask to the ignore index (255)", where, name)
        return
    if rule is not None and rule.verdict == DENY:
        raise TransformNotAllowedError(
            f"{where}: {name} is not allowed before the patch-level DP crop: {rule.reason}",
            name=name, where=where, verdict=DENY, reason=rule.reason)
    verdict, reason = (REVIEW, rule.reason) if rule is not None else ("unknown", UNKNOWN)
    if not allow_unchecked:
        raise TransformNotAllowedError(
            f"{where}: {name} cannot be verified for patch-level DP: {reason}. If you have "
            f"checked that it keeps crops that miss the private region independent of it, pass "
            f"allow_unchecked_transforms=True; it will be recorded in the privacy report "
            f"(spec.unchecked_transforms)",
            name=name, where=where, verdict=verdict, reason=reason)
    logger.warning("%s: accepting unchecked transform %s (%s); recorded in "
                   "spec.unchecked_transforms", where, name, reason)
    if name not in report.unchecked:
        report.unchecked.append(name)


_DATASET_ATTRIBUTES = ("transform", "transforms", "target_transform")


def inspect_dataset(dataset: Any, *, allow_unchecked: bool = False) -> InspectionReport:
    """Inspect a dataset's ``transform``, ``transforms`` and ``target_transform`` attributes
    (``Subset`` -> its ``dataset``, ``ConcatDataset`` -> each of its ``datasets``)."""
    report = InspectionReport()
    _inspect_dataset(dataset, "dataset", allow_unchecked, report, set())
    return report


def _inspect_dataset(dataset, where, allow_unchecked, report, seen) -> None:
    if id(dataset) in seen:
        return
    seen.add(id(dataset))
    kind = type(dataset).__name__
    module = type(dataset).__module__
    if module.startswith("torch.utils.data") and kind == "Subset":
        _inspect_dataset(dataset.dataset, f"{where}.dataset", allow_unchecked, report, seen)
        return
    if module.startswith("torch.utils.data") and kind == "ConcatDataset":
        for i, d in enumerate(dataset.datasets):
            _inspect_dataset(d, f"{where}.datasets[{i}]", allow_unchecked, report, seen)
        return
    walked: set = set()
    for attr in _DATASET_ATTRIBUTES:
        value = getattr(dataset, attr, None)
        if value is None or not (callable(value) or isinstance(value, (list, tuple))):
            continue
        report.merge(_walk_into(value, f"{where}.{attr}", allow_unchecked, walked))


def _walk_into(value, where, allow_unchecked, walked: set) -> InspectionReport:
    report = InspectionReport()
    _walk(value, where, allow_unchecked, report, walked)
    return report
