"""Inspect everything a user's data pipeline runs before the loader's crop.

The analysis (Theorem 2) needs one property of the pipeline: *with the same random draws, two
images that differ only inside the private region R give identical training samples whenever
the loader's crop misses R*.  The user's dataset runs its transforms before that crop (inside
``dataset[i]``), and the batch is assembled by the ``collate_fn`` after it, so both must keep
the property:

* allowed before the crop: flips; per-pixel transforms whose random parameters are drawn
  without looking at the image (colour jitter *without* contrast, fixed-statistics
  ``Normalize``, dtype/tensor conversions, gamma, posterize, pixel noise, grayscale by a
  per-pixel formula, data-independent occlusion); deterministic full-image geometry that does
  not interpolate (nearest resize, center crop, constant padding).  The loader checks every
  image size at crop time against the declared ``image_sizes``, which are the sizes *after*
  these transforms, and the private region is measured in those pixels.
* refused, with the reason: random crops of any kind (the loader crops), random-scale crops and
  random resizes (the loader owns them: ``RandomScaleCrop``, ``RandomResizedCrop``, ``Resize``
  of :mod:`patchdp_opacus.privacy.geometric`, given as ``crop=``), data-dependent crops,
  non-constant padding (copies R into the border), rotations / affine / perspective / elastic
  warps, sample mixing (MixUp, CutMix, Mosaic),
  image-global statistics (equalize, autocontrast, contrast around the image mean, brightness
  by the image mean, per-image normalisation, PCA grayscale, ISO noise scaled by the image's
  spread: every output pixel then depends on R), and interpolating resizes (bilinear/bicubic
  spread R over the kernel support, so crops next to R depend on it; the loader-owned
  ``Resize`` accounts for that support).
* needs review (refused unless ``allow_unchecked_transforms`` names it or is ``True``, then
  recorded in ``PatchPrivacySpec.unchecked_transforms``): neighbourhood filters (blur, sharpen,
  JPEG), arbitrary functions, 90-degree rotations, pixel noise whose random stream depends on
  the pixel values, and every callable not in the tables.

Whatever reads the whole image may run *after* the crop instead: ``post_crop_transform=`` of
the loader is applied to each crop, and a function of the crop cannot reach pixels outside it.
Refusals point there.

How the pipeline is found: :func:`inspect_dataset` walks the dataset object graph -- every
instance attribute of the dataset, of wrapped datasets (``Subset``, ``ConcatDataset``, any
object with a ``dataset``/``datasets`` attribute, any torch ``Dataset`` or user-defined object
found in an attribute), through lists, tuples, sets and dicts -- and classifies every callable
it meets.  Plain data (numbers, strings, paths, arrays, tensors, images, RNG objects) passes.
Rules are data (:data:`RULES`, :data:`ATTRIBUTE_RULES`, :data:`SAFE_CALLABLES`), matched by
class name within a library (the class's ``__module__`` prefix); subclasses defined elsewhere
count as unknown.  What no inspection can see is code inside ``__getitem__`` itself: the
neighbour-pair audit (:mod:`patchdp_opacus.audit`) runs the real pipeline and catches it.
"""

from __future__ import annotations

import collections
import enum
import functools
import hashlib
import logging
import os
import random
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

logger = logging.getLogger(__name__)

ALLOW, DENY, REVIEW, CONTAINER = "allow", "deny", "review", "container"


@dataclass(frozen=True)
class Rule:
    verdict: str  # ALLOW, DENY, REVIEW or CONTAINER
    reason: str


# --- reasons ---------------------------------------------------------------------------------
POST_CROP = ("; if you need it, apply it after the crop with post_crop_transform=... (the loader "
             "applies it to each crop, and a function of the crop cannot depend on pixels outside "
             "it)")
RANDOM_CROP = ("a random crop in the user's pipeline: the loader applies the only crop the "
               "privacy analysis covers; remove it and give the crop to the loader (crop=...)")
SCALE_CROP = ("crops a box of random size and resizes it (RandomResizedCrop-like): a crop in the "
              "user's pipeline, whose box and interpolation the accountant cannot see; remove it "
              "and let the loader own it: crop=patchdp_opacus.privacy.RandomResizedCrop(size, "
              "scale=(0.08, 1), ratio=(3/4, 4/3), grid=(8, 5)) draws the box from a finite grid "
              "and p counts the box plus the interpolation kernel's support")
DATA_CROP = ("data-dependent crop (placed by the mask or boxes): crop origins are not uniform and "
             "may seek out the private region; remove it")
MULTI_CROP = ("returns several crops per sample; the analysis covers one uniform crop per sample "
              "made by the loader; remove it")
RANDOM_SCALE = ("random rescaling before the crop: the private region's size in pixels changes "
                "with the scale and the interpolation spreads it, so p for the declared region "
                "does not hold; remove it and let the loader own it: "
                "crop=patchdp_opacus.privacy.RandomScaleCrop(crop_size, scale_range=(0.5, 2.0), "
                "scale_step=0.25, pad_if_needed=True) resizes by a scale from a finite grid, pads "
                "and crops, and p counts each output's source footprint")
WARP = ("rotation/affine/perspective/elastic warp before the crop moves and reshapes the private "
        "region (its footprint grows and borders may be filled from the image), which the "
        "analysis does not cover; remove it" + POST_CROP)
MIXING = ("combines several images into one sample: one image's private region can reach "
          "another sample, breaking per-sample sensitivity; remove it")
PADDING = ("non-constant padding (reflect/replicate/wrap) copies pixels of the private region "
           "into the border, so a crop can contain them without covering the region; use "
           "constant padding (padding_mode='constant' / border_mode=cv2.BORDER_CONSTANT) or the "
           "loader's padding=...")
GLOBAL_STATS = ("uses statistics of the whole image (histogram, min/max, mean, std, PCA), so "
                "every output pixel depends on the private region, even in crops that do not "
                "cover it; remove it or use fixed statistics" + POST_CROP)
AUTO_AUGMENT = ("automatic augmentation policy that includes rotations, shears and translations, "
                "which move and reshape the private region; remove it or compose the allowed "
                "photometric transforms explicitly" + POST_CROP)
INTERPOLATING_RESIZE = ("interpolating resize before the crop spreads every pixel of the private "
                        "region over the interpolation kernel (bilinear: 1 source pixel, bicubic: "
                        "2, antialiased downscaling: the kernel widened by 1/scale), so crops "
                        "next to the region depend on it and p for the declared region does not "
                        "hold; let the loader own it: crop=patchdp_opacus.privacy.Resize(size, "
                        "interpolation='bilinear', crop=(h, w)) resizes, then crops, with the "
                        "region declared in stored pixels and p counting the kernel's support; "
                        "or use interpolation=NEAREST (cv2.INTER_NEAREST) and declare the region "
                        "in resized pixels, or resize the images offline")
NEIGHBOURHOOD = ("mixes neighbouring pixels (kernel/block filter), so the private region leaks "
                 "into pixels up to the kernel radius away; enlarge private_region by the kernel "
                 "size on each side before accepting it" + POST_CROP)
VALUE_DEPENDENT_STREAM = ("per-pixel noise whose random draws depend on the pixel values (a "
                          "Poisson draw consumes a value-dependent number of random numbers), so "
                          "with the same seed the noise of pixels after the private region "
                          "differs between neighbours" + POST_CROP)
LAMBDA = "arbitrary function: its effect on pixels cannot be inspected"
ROT90 = ("90-degree rotation / transpose: swaps height and width of the image and the region; "
         "covered only if the declared image sizes include the transposed sizes and the region "
         "is symmetric under it")
INPAINT = NEIGHBOURHOOD + " (inpainting fill)"
UNKNOWN = ("not in the tables of transforms known to be safe before a uniform random crop "
           "(flips, per-pixel photometric transforms with image-independent parameters, "
           "nearest-neighbour resizes)")
UNKNOWN_COLLATE = ("a custom collate_fn assembles the batch from the cropped samples and may mix "
                   "them (MixUp/CutMix-like), which breaks per-sample sensitivity; use the "
                   "default collate, or name it in allow_unchecked_transforms after checking it "
                   "keeps each sample a function of its own crop")


def _rules(verdict: str, reason: str, names: str) -> dict[str, Rule]:
    return {n: Rule(verdict, reason) for n in names.split()}


def _allowed(names: str, note: str = "") -> dict[str, Rule]:
    return _rules(ALLOW, note, names)


#: Library -> class name -> rule.  A class belongs to a library when its ``__module__`` starts
#: with one of the library's module prefixes (:data:`LIBRARY_MODULES`).  Allowed entries may
#: still be refused by an attribute rule (:data:`ATTRIBUTE_RULES`), e.g. ``ColorJitter`` with a
#: contrast range or ``Resize`` with bilinear interpolation.
RULES: dict[str, dict[str, Rule]] = {
    "torchvision": {
        **_rules(CONTAINER, "", "Compose RandomApply RandomChoice RandomOrder"),
        **_allowed("ToTensor PILToTensor ToPILImage ConvertImageDtype ToImage ToDtype "
                   "ToPureTensor RGB Identity", "type/dtype conversion"),
        **_allowed("Normalize ColorJitter Grayscale RandomGrayscale RandomInvert "
                   "RandomPosterize RandomSolarize RandomChannelPermutation "
                   "RandomPhotometricDistort GaussianNoise RandomErasing",
                   "per-pixel photometric with image-independent parameters"),
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
                   "MultiplicativeNoise SaltAndPepper AdditiveNoise PixelDropout CoarseDropout "
                   "Erasing GridDropout XYMasking",
                   "per-pixel photometric with image-independent parameters / "
                   "data-independent occlusion"),
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
        **_rules(DENY, GLOBAL_STATS, "Equalize AutoContrast CLAHE FancyPCA ISONoise"),
        **_rules(REVIEW, VALUE_DEPENDENT_STREAM, "ShotNoise"),
        **_rules(REVIEW, NEIGHBOURHOOD, "Blur GaussianBlur MedianBlur MotionBlur GlassBlur "
                                        "AdvancedBlur Defocus ZoomBlur Sharpen Emboss "
                                        "UnsharpMask RingingOvershoot Downscale "
                                        "ImageCompression Morphological Superpixels"),
        **_rules(REVIEW, ROT90, "RandomRotate90 Transpose D4 SquareSymmetry"),
        **_rules(REVIEW, LAMBDA, "Lambda"),
    },
    "torch": _rules(CONTAINER, "", "Sequential"),
    "patchdp_opacus": {
        **_rules(CONTAINER, "", "Compose"),
        **_allowed("ColourLookup", "per-pixel label-colour lookup"),
    },
}

LIBRARY_MODULES: dict[str, tuple[str, ...]] = {
    "torchvision": ("torchvision.transforms",),
    "albumentations": ("albumentations",),
    "torch": ("torch.nn.modules.container",),
    "patchdp_opacus": ("patchdp_opacus.segmentation", "patchdp_opacus.classification"),
}

#: Qualified names of callables that load or assemble data without touching pixel geometry.
SAFE_CALLABLES: dict[str, str] = {
    "torchvision.datasets.folder.default_loader": "decodes an image file",
    "torchvision.datasets.folder.pil_loader": "decodes an image file",
    "torchvision.datasets.folder.accimage_loader": "decodes an image file",
    "torchvision.io.image.decode_image": "decodes an image file",
    "torchvision.io.image.read_image": "decodes an image file",
    "PIL.Image.open": "opens an image file",
    "numpy.load": "reads an array file",
    "torch.utils.data._utils.collate.default_collate": "stacks samples, one row each",
    "torch.utils.data._utils.collate.default_convert": "converts samples, one row each",
}

_NEAREST = ("nearest", "nearest-exact")
_CV2_NEAREST = (0, 6)  # cv2.INTER_NEAREST, cv2.INTER_NEAREST_EXACT
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


def _contrast_around_mean(t) -> Rule | None:
    """torchvision ColorJitter / RandomPhotometricDistort and albumentations ColorJitter blend
    each pixel with the mean gray level of the whole image."""
    if type(t).__name__ not in ("ColorJitter", "RandomPhotometricDistort"):
        return None
    contrast = getattr(t, "contrast", None)
    if contrast is not None and tuple(float(c) for c in contrast) != (1.0, 1.0):
        return Rule(DENY, GLOBAL_STATS + f" (contrast={tuple(contrast)!r} blends every pixel "
                                         f"with the image's mean gray level; set contrast=0)")
    return None


def _brightness_by_image_mean(t) -> Rule | None:
    if type(t).__name__ == "RandomBrightnessContrast" and not getattr(t, "brightness_by_max",
                                                                      True):
        return Rule(DENY, GLOBAL_STATS + " (brightness_by_max=False shifts brightness by the "
                                         "image's mean; use brightness_by_max=True)")
    return None


def _pca_gray(t) -> Rule | None:
    if type(t).__name__ == "ToGray" and getattr(t, "method", None) == "pca":
        return Rule(DENY, GLOBAL_STATS + " (method='pca' projects on the image's principal "
                                         "component; use method='weighted_average')")
    return None


def _interpolating_resize_tv(t) -> Rule | None:
    if type(t).__name__ != "Resize":
        return None
    mode = getattr(t, "interpolation", None)
    if str(getattr(mode, "value", mode)).lower() not in _NEAREST:
        return Rule(DENY, INTERPOLATING_RESIZE + f" (interpolation={mode!r})")
    return None


def _interpolating_resize_alb(t) -> Rule | None:
    if type(t).__name__ not in ("Resize", "LongestMaxSize", "SmallestMaxSize"):
        return None
    mode = getattr(t, "interpolation", None)
    if mode not in _CV2_NEAREST:
        return Rule(DENY, INTERPOLATING_RESIZE + f" (interpolation={mode!r})")
    if getattr(t, "area_for_downscale", None) is not None:
        return Rule(DENY, INTERPOLATING_RESIZE + f" (area_for_downscale="
                                                 f"{t.area_for_downscale!r} averages pixels when "
                                                 f"downscaling)")
    sizes = getattr(t, "max_size", None)
    if isinstance(sizes, (list, tuple)) and len(set(sizes)) > 1:
        return Rule(DENY, RANDOM_SCALE + f" (max_size={list(sizes)} draws the size at random)")
    return None


#: Library -> checks run on every instance not denied by name (e.g. an allowed ``Pad`` with
#: reflect padding); the first rule returned wins over the name table.
ATTRIBUTE_RULES = {
    "torchvision": (_bad_padding_mode, _contrast_around_mean, _interpolating_resize_tv),
    "albumentations": (_bad_border_mode, _image_statistics_normalize, _inpainting_fill,
                       _contrast_around_mean, _brightness_by_image_mean, _pca_gray,
                       _interpolating_resize_alb),
    "torch": (),
    "patchdp_opacus": (),
}


class TransformNotAllowedError(ValueError):
    """A transform the patch-level analysis does not cover (``verdict`` "deny"), or one it
    cannot verify (``verdict`` "review" / "unknown") without the explicit override."""

    def __init__(self, message: str, *, name: str, where: str, verdict: str, reason: str):
        super().__init__(message)
        self.name, self.where, self.verdict, self.reason = name, where, verdict, reason


@dataclass
class InspectionReport:
    """``checked``: transforms and callables found safe; ``unchecked``: those accepted only
    through ``allow_unchecked_transforms`` (to be recorded in ``spec.unchecked_transforms``)."""

    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    def merge(self, other: "InspectionReport") -> None:
        for name in other.checked:
            self._add(self.checked, name)
        for name in other.unchecked:
            self._add(self.unchecked, name)

    @staticmethod
    def _add(names: list, name: str) -> None:
        if name not in names:
            names.append(name)


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


class _Override:
    """``allow_unchecked_transforms``: ``True`` (accept every unknown / review item), ``False``,
    or names (qualified or bare class/function names) of the items to accept."""

    def __init__(self, allow):
        if isinstance(allow, (bool, type(None))):
            self.all, self.names = bool(allow), frozenset()
        elif isinstance(allow, str):
            self.all, self.names = False, frozenset([allow])
        else:
            self.all, self.names = False, frozenset(str(a) for a in allow)

    def accepts(self, name: str) -> bool:
        return self.all or name in self.names or name.rsplit(".", 1)[-1] in self.names


def _refuse_or_record(name, where, verdict, reason, override: _Override, report) -> None:
    if not override.accepts(name):
        raise TransformNotAllowedError(
            f"{where}: {name} cannot be verified for patch-level DP: {reason}. If you have "
            f"checked that it keeps crops that miss the private region independent of it, pass "
            f"allow_unchecked_transforms=[{name.rsplit('.', 1)[-1]!r}] (or True); it will be "
            f"recorded in the privacy report (spec.unchecked_transforms)",
            name=name, where=where, verdict=verdict, reason=reason)
    logger.warning("%s: accepting unchecked %s (%s); recorded in spec.unchecked_transforms",
                   where, name, reason)
    report._add(report.unchecked, name)


# --- the object-graph walk -------------------------------------------------------------------
_DATA_TYPES: tuple = (type(None), bool, int, float, complex, str, bytes, bytearray, range,
                      os.PathLike, enum.Enum, type, random.Random,
                      types.ModuleType)  # a module held by a closure or default: code
_DATA_MODULES = ("numpy", "PIL", "pandas", "h5py", "pyarrow", "zarr", "lmdb")


def _is_plain_data(obj) -> bool:
    if isinstance(obj, _DATA_TYPES):
        return True
    module = (getattr(type(obj), "__module__", "") or "").split(".")[0]
    if module in _DATA_MODULES and not callable(obj):
        return True  # arrays, images, data frames, numpy Generators
    if module == "torch" and not callable(obj):
        return True  # tensors, torch.Generator, devices, dtypes
    return False


#: Standard-library infrastructure objects (loggers, locks, files) are not walked into.
_INFRASTRUCTURE = frozenset("logging threading multiprocessing io socket sqlite3 zipfile tarfile "
                            "queue concurrent asyncio subprocess tempfile weakref ssl".split())


def _module_root(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return (getattr(cls, "__module__", "") or "").split(".")[0].lstrip("_")


#: Classes from these packages are not walked for class attributes (their own code and
#: constants); transforms of the known libraries are classified by the rule tables instead.
_NOT_WALKED_CLASS_ROOTS = frozenset({"builtins", "torch", "torchvision", "numpy", "PIL",
                                     "albumentations", "opacus", "typing", "abc",
                                     *sys.stdlib_module_names})
_CODE_TYPES = (types.FunctionType, types.BuiltinFunctionType, staticmethod, classmethod,
               property, types.MethodType, type)


def _slot_names(cls) -> tuple:
    slots = vars(cls).get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(s for s in slots if s != "__dict__")


def _is_stdlib(obj) -> bool:
    module = _module_root(obj)
    return module in sys.stdlib_module_names or module == "builtins"


def _children(obj) -> list:
    if type(obj).__name__ == "Sequential" and library_of(obj) == "torch":
        return list(obj.children())
    return list(getattr(obj, "transforms", None) or [])


def _global_names(code: types.CodeType) -> list[str]:
    """Names a function's code (and the code nested in it) may read from its module."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return list(dict.fromkeys(names))


_CODE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)


def _users(module_name) -> bool:
    """Whether a module is the user's (not one of the known libraries or the standard ones)."""
    return (module_name or "").split(".")[0].lstrip("_") not in _NOT_WALKED_CLASS_ROOTS


def _globals_read(function, deep: bool):
    """The module globals ``function``'s code names: data always; with ``deep``, also the
    user's own functions it calls, and the data attributes of the user's modules and classes
    it names (``state.RUN``, ``Running.total``)."""
    names = _global_names(function.__code__)
    for name in names:
        if name not in function.__globals__:
            continue
        value = function.__globals__[name]
        if not isinstance(value, _CODE):
            yield f".<global {name}>", value
        elif not deep:
            continue
        elif isinstance(value, types.FunctionType) and _users(value.__module__):
            yield f".<global {name}>", value
        elif isinstance(value, (types.ModuleType, type)) and \
                _users(value.__name__ if isinstance(value, types.ModuleType)
                       else value.__module__):
            namespace = vars(value)
            for attr in names:
                if attr in namespace and not attr.startswith("__") and \
                        (not isinstance(namespace[attr], _CODE) or
                         isinstance(namespace[attr], types.FunctionType)):
                    yield f".<global {name}>.{attr}", namespace[attr]


def _held(obj, deep: bool = False):
    """``(where suffix, value)`` of everything ``obj`` holds: a partial's function and
    arguments; a function's closure cells and default arguments; a bound method's object and
    function; instance attributes, ``__slots__`` and class attributes of classes defined
    outside the known libraries (a transform kept on the class is used like one on the
    instance; methods and other code on the class are not data); the module data the user's
    functions read (:func:`_globals_read`, ``deep`` for the post-crop stage, where helper
    functions are not transforms to classify but may hold state)."""
    if isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield ".args", [*obj.args, *obj.keywords.values()]
    if isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            yield f".<closure {i}>", value
        if obj.__defaults__:
            yield ".__defaults__", obj.__defaults__
        if obj.__kwdefaults__:
            yield ".__kwdefaults__", obj.__kwdefaults__
        if _users(obj.__module__):  # the user's own functions: the module data they read
            yield from _globals_read(obj, deep)
    attributes = getattr(obj, "__dict__", None)
    attributes = attributes if isinstance(attributes, dict) else {}
    yield from ((f".{key}", value) for key, value in list(attributes.items()))
    for cls in type(obj).__mro__:
        if _module_root(cls) in _NOT_WALKED_CLASS_ROOTS or cls is object:
            continue
        for key in _slot_names(cls):
            if hasattr(obj, key):
                yield f".{key}", getattr(obj, key)
        for key, value in list(vars(cls).items()):
            if key.startswith("__") or isinstance(value, _CODE_TYPES) or key in attributes:
                continue  # code, or shadowed by the instance
            yield f".{key} (class attribute)", value


class _Walker:
    def __init__(self, override: _Override, report: InspectionReport):
        self.override = override
        self.report = report
        self.seen: set[int] = set()
        self.kept: list = []  # visited objects stay alive: a freed temporary's id is reused

    def visit(self, obj, where: str) -> None:
        if _is_plain_data(obj) or id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        self.kept.append(obj)
        if isinstance(obj, dict):
            for key, value in obj.items():
                self.visit(value, f"{where}[{key!r}]")
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, value in enumerate(obj):
                self.visit(value, f"{where}[{i}]")
            return
        if type(obj).__name__ == "StandardTransform" \
                and type(obj).__module__.startswith("torchvision.datasets"):
            # VisionDataset.transforms pairs transform and target_transform
            self.visit(obj.transform, f"{where}.transform")
            self.visit(obj.target_transform, f"{where}.target_transform")
            return
        name = qualified_name(obj)
        rule = rule_for(obj)
        if rule is not None:
            self._apply(obj, name, rule, where)
            return
        if name in SAFE_CALLABLES:
            self.report._add(self.report.checked, name)
            return
        if isinstance(obj, functools.partial):
            self.visit_attributes(obj, where)
            return
        if _is_dataset(obj):
            self.visit_attributes(obj, where)
            return
        if callable(obj):
            # look inside first: a refused transform held by an unknown callable gives the more
            # useful message; then the callable itself needs the override
            self.visit_attributes(obj, where)
            _refuse_or_record(name, where, "unknown", UNKNOWN, self.override, self.report)
            return
        if _module_root(obj) not in _INFRASTRUCTURE:
            self.visit_attributes(obj, where)  # holder objects (namespaces, user classes)

    def visit_attributes(self, obj, where: str) -> None:
        """Everything ``obj`` holds (:func:`_held`)."""
        for suffix, value in _held(obj):
            self.visit(value, f"{where}{suffix}")

    def _apply(self, obj, name: str, rule: Rule, where: str) -> None:
        if rule.verdict == CONTAINER:
            for i, child in enumerate(_children(obj)):
                self.visit(child, f"{where}.transforms[{i}]")
            return
        if rule.verdict == ALLOW:
            self.report._add(self.report.checked, name)
            if type(obj).__name__ in ("Pad", "PadIfNeeded", "CenterCrop", "Crop") \
                    and getattr(obj, "fill_mask", None) == 0:
                logger.warning("%s (%s) pads masks with 0, a real class in most label sets; set "
                               "fill_mask to the ignore index (255)", where, name)
            return
        if rule.verdict == DENY:
            raise TransformNotAllowedError(
                f"{where}: {name} is not allowed before the patch-level DP crop: {rule.reason}",
                name=name, where=where, verdict=DENY, reason=rule.reason)
        _refuse_or_record(name, where, REVIEW, rule.reason, self.override, self.report)


def _is_dataset(obj) -> bool:
    try:
        from torch.utils.data import Dataset
    except ImportError:  # pragma: no cover
        Dataset = ()
    return isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                        and hasattr(obj, "__dict__") and not _is_stdlib(obj))


def inspect_pipeline(transform: Any, *, allow_unchecked: bool | Iterable[str] = False,
                     where: str = "transform") -> InspectionReport:
    """Walk ``transform`` (nested containers included) and apply the rule tables.

    Raises :class:`TransformNotAllowedError` for a refused transform, and for an unknown /
    needs-review one unless ``allow_unchecked`` accepts it (``True`` or its name); accepted
    ones are returned in ``report.unchecked``."""
    report = InspectionReport()
    _Walker(_Override(allow_unchecked), report).visit(transform, where)
    return report


def inspect_dataset(dataset: Any, *, allow_unchecked: bool | Iterable[str] = False
                    ) -> InspectionReport:
    """Inspect every attribute of ``dataset`` and of the datasets and objects it holds (see the
    module docstring); same errors and override as :func:`inspect_pipeline`."""
    report = InspectionReport()
    _Walker(_Override(allow_unchecked), report).visit_attributes(dataset, "dataset")
    return report


def inspect_collate(collate_fn, *, allow_unchecked: bool | Iterable[str] = False
                    ) -> InspectionReport:
    """``None`` and torch's ``default_collate`` pass; sample-mixing transforms (MixUp,
    CutMix) are refused; any other ``collate_fn`` needs the override."""
    report = InspectionReport()
    if collate_fn is None:
        return report
    override = _Override(allow_unchecked)
    name = qualified_name(collate_fn)
    if name in SAFE_CALLABLES:
        report._add(report.checked, name)
        return report
    rule = rule_for(collate_fn)
    if rule is not None and rule.verdict == DENY:
        raise TransformNotAllowedError(f"collate_fn: {name} is not allowed: {rule.reason}",
                                       name=name, where="collate_fn", verdict=DENY,
                                       reason=rule.reason)
    _refuse_or_record(name, "collate_fn", "unknown", UNKNOWN_COLLATE, override, report)
    return report


#: Random number generators: their state advances with every draw and depends on no pixel.
_GENERATORS = ("Generator", "RandomState", "Random", "SystemRandom")
#: Attributes that a library resets at the start of every call and reads only within it (a
#: record of the last call), by library: albumentations' ``BasicTransform.params`` (read by
#: the next call only in replay mode, which is then fingerprinted).
_PER_CALL_RECORDS = {"albumentations": frozenset({"params"})}


def _per_call_record(obj, key: str) -> bool:
    return key in _PER_CALL_RECORDS.get(library_of(obj) or "", ()) and \
        not getattr(obj, "replay_mode", False)


def _generator_state(obj) -> tuple:
    """What a reseed changes but a draw does not: a torch generator's seed, a numpy
    generator's seed sequence (reseeding numpy or Python generators in place through their
    ``state`` / ``seed()`` is not seen)."""
    if isinstance(obj, torch.Generator):
        return ("torch generator", obj.initial_seed())
    seed_seq = getattr(getattr(obj, "bit_generator", None), "seed_seq", None)
    return ("generator", type(obj).__name__, getattr(seed_seq, "entropy", None),
            tuple(getattr(seed_seq, "spawn_key", ())))


def _tensor_digest(t: torch.Tensor) -> bytes:
    data = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def post_crop_state(transform) -> tuple:
    """A fingerprint of the data a post-crop stage holds (everything :func:`_held` reaches,
    and containers): values of numbers, numpy scalars and strings, digests of the bytes of
    tensors and arrays, the seeds of random generators (not their state, which every draw
    advances).  If a call changes it, the stage carries state from one sample to the next (a
    running mean, a cache of earlier crops) and a sample's output depends on other samples'
    crops."""
    out: list = []
    seen: set = set()
    kept: list = []  # visited objects stay alive: a freed temporary's id is reused

    def visit(obj, where):
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            out.append((where, obj))
            return
        if isinstance(obj, np.generic):
            out.append((where, str(obj.dtype), obj.tobytes()))
            return
        if id(obj) in seen:
            out.append((where, "seen"))
            return
        seen.add(id(obj))
        kept.append(obj)
        if isinstance(obj, (types.ModuleType, type)):
            return
        if isinstance(obj, torch.Generator) or type(obj).__name__ in _GENERATORS:
            out.append((where, id(obj), *_generator_state(obj)))
            return
        if isinstance(obj, torch.Tensor):
            out.append((where, tuple(obj.shape), str(obj.dtype), _tensor_digest(obj)))
            return
        if isinstance(obj, np.ndarray):
            out.append((where, obj.shape, str(obj.dtype),
                        hashlib.blake2b(np.ascontiguousarray(obj).tobytes(),
                                        digest_size=16).digest()))
            return
        if isinstance(obj, dict):
            out.append((where, len(obj)))
            for key, value in list(obj.items()):
                visit(key, f"{where}.keys()")
                visit(value, f"{where}[{key!r}]")
            return
        if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            out.append((where, len(obj)))
            items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
            for i, value in enumerate(list(items)):
                visit(value, f"{where}[{i}]")
            return
        for suffix, value in _held(obj, deep=True):
            if not _per_call_record(obj, suffix[1:]):
                visit(value, f"{where}{suffix}")

    visit(transform, "post_crop_transform")
    return tuple(out)


POST_CROP_CARRIES_STATE = ("the post-crop stage changed the data it holds while transforming a "
                           "sample (a running mean, a cache or counter of earlier samples): "
                           "later samples then depend on earlier crops, including crops that "
                           "covered other images' private regions, which the accountant does "
                           "not cover; make it a function of the sample alone (fixed "
                           "statistics computed from public data)")


def check_post_crop_state(transform, before: tuple) -> None:
    """Raise :class:`TransformNotAllowedError` if ``transform``'s :func:`post_crop_state` is no
    longer ``before``."""
    after = post_crop_state(transform)
    if after != before:
        changed = next((a[0] for a, b in zip(after, before) if a != b),
                       "post_crop_transform")
        raise TransformNotAllowedError(f"{changed}: {POST_CROP_CARRIES_STATE}",
                                       name=qualified_name(transform), where=changed,
                                       verdict=DENY, reason=POST_CROP_CARRIES_STATE)


POST_CROP_READS_DATA = ("the post-crop stage holds a data set or loader: it can paste pixels of "
                        "other (uncropped) images into a sample, so a sample no longer depends "
                        "on its own crop only; remove it (copy-paste/mosaic-style mixing is not "
                        "covered)")


def inspect_post_crop(transform) -> InspectionReport:
    """The post-crop stage may read the whole crop, so almost anything is allowed there; what
    is refused is reaching *other* samples: a data set, a data loader or a sample-mixing
    transform (MixUp, CutMix, Mosaic, ...) anywhere inside it."""
    report = InspectionReport()
    seen: set = set()
    kept: list = []  # visited objects stay alive: a freed temporary's id is reused

    def visit(obj, where):
        if _is_plain_data(obj) or id(obj) in seen:
            return
        seen.add(id(obj))
        kept.append(obj)
        if isinstance(obj, dict):
            for key, value in obj.items():
                visit(value, f"{where}[{key!r}]")
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, value in enumerate(obj):
                visit(value, f"{where}[{i}]")
            return
        rule = rule_for(obj)
        if rule is not None and rule.verdict == DENY and rule.reason == MIXING:
            raise TransformNotAllowedError(f"{where}: {qualified_name(obj)} mixes samples: "
                                           f"{MIXING}", name=qualified_name(obj), where=where,
                                           verdict=DENY, reason=MIXING)
        if rule is not None and rule.verdict == CONTAINER:  # (albumentations' are indexable)
            for i, child in enumerate(_children(obj)):
                visit(child, f"{where}.transforms[{i}]")
            return
        if _is_dataset(obj) or type(obj).__name__ == "DataLoader":
            raise TransformNotAllowedError(f"{where}: {POST_CROP_READS_DATA}",
                                           name=qualified_name(obj), where=where, verdict=DENY,
                                           reason=POST_CROP_READS_DATA)
        for suffix, value in _held(obj, deep=True):
            visit(value, f"{where}{suffix}")
        report._add(report.checked, qualified_name(obj))

    visit(transform, "post_crop_transform")
    return report
