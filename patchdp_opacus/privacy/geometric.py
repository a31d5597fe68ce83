"""Loader-owned geometric transforms, each with a finite parameter distribution and its ``p``.

Every transform here is a frozen, JSON-serialisable object (``to_dict`` /
:func:`transform_from_dict`) whose random parameters ``theta = (choice, origin_y, origin_x)``
are drawn independently of the data: a *choice* uniformly from a finite list fixed at
construction (a scale, a box shape), then an origin uniformly from the origins of that choice
for the image's size.  No retry loops, no fallbacks.  Sizes are ``(height, width)`` in pixels;
the private region is always declared in *stored-image* pixels (before any resize).

* :class:`FixedCrop` — today's random crop (:class:`~.geometry.CropGeometry`) behind the same
  interface (one choice, identity resampling).
* :class:`RandomScaleCrop` — resize by a scale ``s`` from a grid (``scale_range``,
  ``scale_step``), to ``floor(H s + 1/2) x floor(W s + 1/2)`` (mmsegmentation's rounding), pad
  per ``padding`` / ``pad_if_needed`` (:class:`~.geometry.CropGeometry` semantics:
  symmetric, constant), then crop ``crop_size``; the loader resamples only the crop.
* :class:`RandomResizedCrop` — a box of area ``a * H * W`` and aspect ratio ``r`` (``a`` from
  ``grid[0]`` midpoints of ``scale``, ``r`` from ``grid[1]`` log-midpoints of ``ratio``; box side
  lengths rounded as torchvision does and clamped to the image, where torchvision would retry
  and fall back to a centre crop), uniformly placed inside the image, resized to ``size``.
* :class:`Resize` — a deterministic resize (torchvision's ``size`` rule), optionally followed by
  a random fixed-size crop of the resized image.

Images use the transform's ``interpolation``; masks always use nearest.  Each transform's
footprint and ``p`` come from :mod:`.footprint`, its kernels from :mod:`.interpolation`; the
loader's resampling (:mod:`patchdp_opacus.plugin.resample`) reads the same plans.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Iterator

from patchdp_opacus.privacy import footprint as fp
from patchdp_opacus.privacy._sizes import Size, as_size, as_size_list
from patchdp_opacus.privacy.footprint import AxisPlan, FootprintInclusion, Theta
from patchdp_opacus.privacy.geometry import CropGeometry
from patchdp_opacus.privacy.interpolation import NEAREST, Interpolation

#: Largest number of choices a grid may have (a guard against a mistyped step).
MAX_CHOICES = 10_000


def as_fraction(value, name: str) -> Fraction:
    """An exact rational from an int, a Fraction, a string (``"0.25"``, ``"3/4"``) or a float
    (read through its shortest decimal form and limited to denominators <= 10**6, so that
    ``4/3`` typed as ``1.3333333333333333`` becomes ``4/3``)."""
    try:
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError
            return Fraction(repr(value)).limit_denominator(10**6)
        return Fraction(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None


def scale_grid(scale_range, scale_step) -> tuple[Fraction, ...]:
    """``lo, lo + step, ...`` up to and including ``hi`` (exact fractions)."""
    lo, hi = (as_fraction(v, "scale_range") for v in scale_range)
    step = as_fraction(scale_step, "scale_step")
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got ({lo}, {hi})")
    if step <= 0:
        raise ValueError(f"scale_step must be positive, got {step}")
    count = math.floor((hi - lo) / step) + 1
    if count > MAX_CHOICES:
        raise ValueError(f"scale_range / scale_step give {count} scales (> {MAX_CHOICES})")
    return tuple(lo + k * step for k in range(count))


def scaled_length(length: int, scale: Fraction) -> int:
    """``floor(length * scale + 1/2)``: the resized side (exact, half up)."""
    return math.floor(length * scale + Fraction(1, 2))


class GeometricTransform:
    """Interface shared by every loader-owned transform (see the module docstring)."""

    kind: ClassVar[str] = ""
    interpolation: Interpolation = NEAREST

    # -- what each transform defines --------------------------------------------------------
    def _plans(self, image_size: Size) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_size(self, image_size) -> Size:  # pragma: no cover - abstract
        raise NotImplementedError

    def choices(self, image_size) -> list:  # pragma: no cover - abstract
        """What each choice ``g`` is (for reports)."""
        raise NotImplementedError

    def to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def interpolations(self) -> tuple[Interpolation, ...]:
        """Kernels whose footprints are united: the image's and the mask's (nearest)."""
        return tuple(dict.fromkeys((self.interpolation, NEAREST)))

    def plans(self, image_size) -> tuple[tuple[AxisPlan, AxisPlan], ...]:
        """``(plan_y, plan_x)`` of every choice for an image of ``image_size`` (cached).
        Raises ``ValueError`` when the transform cannot be applied to that size."""
        return _cached_plans(self, as_size(image_size, "image_size"))

    @property
    def num_choices(self) -> int:
        return len(self._choice_values())

    def _choice_values(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, image_size) -> None:
        self.plans(image_size)

    def num_origins(self, image_size, choice: int) -> tuple[int, int]:
        plan_y, plan_x = self.plans(image_size)[choice]
        return plan_y.num_origins, plan_x.num_origins

    def draw_moduli(self, image_sizes) -> tuple[int, int, int]:
        """Ranges ``(M_g, M_y, M_x)`` of the uniform integer draws ``(u_g, u_y, u_x)`` that make
        :meth:`theta_from_draws` exactly uniform for every declared size (see
        :func:`.footprint.draw_moduli`)."""
        return fp.draw_moduli({s: self.plans(s) for s in as_size_list(image_sizes)})

    def theta_from_draws(self, image_size, draws) -> Theta:
        """``theta = (u_g mod G, u_y mod n_y(g), u_x mod n_x(g))``."""
        return fp.theta_from_draws(self.plans(image_size), draws)

    def thetas(self, image_size) -> Iterator[tuple[Theta, Fraction]]:
        """Every ``theta`` with its probability (for brute-force checks; can be long)."""
        plans = self.plans(image_size)
        for g, (plan_y, plan_x) in enumerate(plans):
            prob = Fraction(1, len(plans) * plan_y.num_origins * plan_x.num_origins)
            for i in range(plan_y.num_origins):
                for j in range(plan_x.num_origins):
                    yield Theta(g, i, j), prob

    def footprint(self, image_size, theta) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """Source window ``((y0, y1), (x0, x1))`` (half-open, stored pixels) that the output
        for ``theta`` reads, for images and masks alike; ``None`` if it reads nothing (the
        output is all padding).  The loader cuts exactly this window before resampling."""
        g, i, j = Theta(*theta)
        plan_y, plan_x = self.plans(image_size)[g]
        if not (0 <= i < plan_y.num_origins and 0 <= j < plan_x.num_origins):
            raise ValueError(f"origin ({i}, {j}) is outside the {plan_y.num_origins} x "
                             f"{plan_x.num_origins} origins of choice {g}")
        (y0,), (y1,) = fp.origin_footprints(plan_y, self.interpolations, [i])
        (x0,), (x1,) = fp.origin_footprints(plan_x, self.interpolations, [j])
        if y0 >= y1 or x0 >= x1:
            return None
        return (int(y0), int(y1)), (int(x0), int(x1))

    def inclusion_probability(self, image_sizes, region) -> FootprintInclusion:
        """Exact worst-case ``p`` over the declared sizes and every placement of ``region``
        (stored pixels), with the looser ``average_of_maxima`` beside it."""
        plans = {s: self.plans(s) for s in as_size_list(image_sizes)}
        return fp.inclusion_from_plans(plans, self.interpolations, region)

    def placement_probabilities(self, image_size, region):
        """Exact ``p(y, x)`` at every placement (small images; see
        :func:`.footprint.placement_probabilities`)."""
        return fp.placement_probabilities(self.plans(image_size), self.interpolations,
                                          as_size(image_size, "image_size"), region)


@functools.lru_cache(maxsize=256)
def _cached_plans(transform: GeometricTransform, image_size: Size):
    return tuple(transform._plans(image_size))


def clear_caches() -> None:
    """Forget cached plans and taps (for cold-start timings)."""
    from patchdp_opacus.privacy import interpolation

    _cached_plans.cache_clear()
    interpolation.resize_bounds.cache_clear()
    interpolation._all_taps.cache_clear()


def _window_plans(image_size: Size, resized: Size, crop: CropGeometry, what: str):
    try:
        ay, ax = crop.axes(resized)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return tuple(AxisPlan(n, n, a.length, a.crop, a.before, a.after)
                 for n, a in zip(image_size, (ay, ax)))


def _crop_from(crop_size, padding, pad_if_needed) -> CropGeometry:
    if isinstance(crop_size, CropGeometry):
        return crop_size
    return CropGeometry(crop_size, padding, pad_if_needed)


@dataclass(frozen=True)
class FixedCrop(GeometricTransform):
    """A :class:`~.geometry.CropGeometry` behind the common interface: one choice, identity
    resampling, footprint = the crop window inside the image."""

    crop: CropGeometry
    kind: ClassVar[str] = "crop"

    def __post_init__(self):
        if not isinstance(self.crop, CropGeometry):
            object.__setattr__(self, "crop", CropGeometry(self.crop))

    def _choice_values(self):
        return (None,)

    def _plans(self, image_size):
        return [_window_plans(image_size, image_size, self.crop, "crop")]

    def output_size(self, image_size) -> Size:
        return self.crop.crop_size

    def choices(self, image_size):
        return [{"crop": list(self.crop.crop_size)}]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.crop.to_dict()}

    def describe(self) -> str:
        return f"random crop {_text(self.crop.crop_size)}"


@dataclass(frozen=True, init=False)
class RandomScaleCrop(GeometricTransform):
    """Resize by ``s`` (uniform over ``scales``), pad, crop ``crop_size`` (see module docs).

    ``scales`` (explicit) or ``scale_range=(lo, hi)`` with ``scale_step`` (default 0.25): the
    grid ``lo, lo + step, ... <= hi``, as exact fractions.  ``interpolation`` /
    ``antialias``: the image kernel (torchvision's defaults: bilinear, antialiased)."""

    crop: CropGeometry
    scales: tuple
    interpolation: Interpolation
    kind: ClassVar[str] = "random_scale_crop"

    def __init__(self, crop_size, scales=None, *, scale_range=None, scale_step=None,
                 padding=(0, 0), pad_if_needed=False, interpolation="bilinear", antialias=True):
        if (scales is None) == (scale_range is None):
            raise ValueError("give either scales=[...] or scale_range=(low, high)")
        if scales is None:
            scales = scale_grid(scale_range, Fraction(1, 4) if scale_step is None else scale_step)
        elif scale_step is not None:
            raise ValueError("scale_step goes with scale_range, not with explicit scales")
        scales = tuple(sorted({as_fraction(s, "scales") for s in scales}))
        if not scales or scales[0] <= 0 or len(scales) > MAX_CHOICES:
            raise ValueError(f"scales must be 1..{MAX_CHOICES} positive numbers, got {scales}")
        object.__setattr__(self, "crop", _crop_from(crop_size, padding, pad_if_needed))
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "interpolation", _interp(interpolation, antialias))

    def _choice_values(self):
        return self.scales

    def resized_size(self, image_size, scale) -> Size:
        h, w = as_size(image_size, "image_size")
        return scaled_length(h, scale), scaled_length(w, scale)

    def _plans(self, image_size):
        out = []
        for s in self.scales:
            resized = self.resized_size(image_size, s)
            if min(resized) < 1:
                raise ValueError(f"scale {s} shrinks image {_text(image_size)} to "
                                 f"{_text(resized)} pixels; use larger scales")
            out.append(_window_plans(image_size, resized, self.crop,
                                     f"image {_text(image_size)} at scale {s} "
                                     f"(resized to {_text(resized)})"))
        return out

    def output_size(self, image_size) -> Size:
        return self.crop.crop_size

    def choices(self, image_size):
        return [{"scale": str(s), "resized": list(self.resized_size(image_size, s))}
                for s in self.scales]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "crop": self.crop.to_dict(),
                "scales": [str(s) for s in self.scales],
                "interpolation": self.interpolation.to_dict()}

    def describe(self) -> str:
        s = self.scales
        grid = (f"{len(s)} scales {_num(s[0])}..{_num(s[-1])}" if len(s) > 2
                else "scales " + ", ".join(map(_num, s)))
        return (f"random scale ({grid}, {self.interpolation.describe()}) then crop "
                f"{_text(self.crop.crop_size)}")


@dataclass(frozen=True, init=False)
class RandomResizedCrop(GeometricTransform):
    """Box of area ``a H W`` and aspect ratio ``r`` (width / height), uniformly placed inside the
    image, resized to ``size``.  ``a``: the ``grid[0]`` midpoints of equal bins of ``scale``
    (a discretised uniform); ``r``: the ``grid[1]`` midpoints of equal bins of ``log ratio``
    (a discretised log-uniform, as torchvision).  Box sides:
    ``w = round(sqrt(a H W r))``, ``h = round(sqrt(a H W / r))`` (Python's round, as
    torchvision), clamped to ``[1, W]``, ``[1, H]``.  ``p`` is exact for these integer boxes."""

    size: Size
    scale: tuple
    ratio: tuple
    grid: tuple
    interpolation: Interpolation
    kind: ClassVar[str] = "random_resized_crop"

    def __init__(self, size, scale=(Fraction(2, 25), 1), ratio=(Fraction(3, 4), Fraction(4, 3)),
                 grid=(8, 5), *, interpolation="bilinear", antialias=True):
        a0, a1 = (as_fraction(v, "scale") for v in scale)
        r0, r1 = (as_fraction(v, "ratio") for v in ratio)
        if not 0 < a0 <= a1 <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got ({a0}, {a1})")
        if not 0 < r0 <= r1:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got ({r0}, {r1})")
        na, nr = as_size(grid, "grid")
        if na * nr > MAX_CHOICES:
            raise ValueError(f"grid {na} x {nr} has more than {MAX_CHOICES} choices")
        object.__setattr__(self, "size", as_size(size, "size"))
        object.__setattr__(self, "scale", (a0, a1))
        object.__setattr__(self, "ratio", (r0, r1))
        object.__setattr__(self, "grid", (na, nr))
        object.__setattr__(self, "interpolation", _interp(interpolation, antialias))

    def _choice_values(self):
        (a0, a1), (r0, r1), (na, nr) = self.scale, self.ratio, self.grid
        areas = [a0 + (a1 - a0) * Fraction(2 * k + 1, 2 * na) for k in range(na)]
        logs = [math.log(r0) + (math.log(r1) - math.log(r0)) * (2 * k + 1) / (2 * nr)
                for k in range(nr)]
        return tuple((a, math.exp(lr)) for a in areas for lr in logs)

    def boxes(self, image_size) -> list[Size]:
        """The integer ``(h, w)`` box of every choice for an image of ``image_size``."""
        h, w = as_size(image_size, "image_size")
        out = []
        for area, ratio in self._choice_values():
            target = float(area) * h * w
            bw = int(round(math.sqrt(target * ratio)))
            bh = int(round(math.sqrt(target / ratio)))
            out.append((min(max(bh, 1), h), min(max(bw, 1), w)))
        return out

    def _plans(self, image_size):
        return [tuple(AxisPlan(n, b, o, o, moves="box")
                      for n, b, o in zip(image_size, box, self.size))
                for box in self.boxes(image_size)]

    def output_size(self, image_size) -> Size:
        return self.size

    def choices(self, image_size):
        return [{"area": str(a), "ratio": r, "box": list(b)}
                for (a, r), b in zip(self._choice_values(), self.boxes(image_size))]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": list(self.size),
                "scale": [str(v) for v in self.scale], "ratio": [str(v) for v in self.ratio],
                "grid": list(self.grid), "interpolation": self.interpolation.to_dict()}

    def describe(self) -> str:
        (a0, a1), (r0, r1), (na, nr) = self.scale, self.ratio, self.grid
        return (f"random resized crop to {_text(self.size)} (area {_num(a0)}..{_num(a1)} x "
                f"ratio {_num(r0)}..{_num(r1)}, grid {na}x{nr}, "
                f"{self.interpolation.describe()})")


@dataclass(frozen=True, init=False)
class Resize(GeometricTransform):
    """Deterministic resize of the stored image, optionally followed by a random crop.

    ``size``: ``(h, w)``, or an int = the shorter side (the longer one
    ``floor(size * long / short)``, torchvision's rule).  ``crop``: ``None`` (the output is the
    whole resized image) or a crop size / :class:`~.geometry.CropGeometry` applied to the
    resized image.  The private region is declared in stored pixels and mapped through the
    kernel's footprint."""

    size: object
    crop: CropGeometry | None
    interpolation: Interpolation
    kind: ClassVar[str] = "resize"

    def __init__(self, size, interpolation="bilinear", antialias=True, *, crop=None,
                 padding=(0, 0), pad_if_needed=False):
        if isinstance(size, int):
            if size < 1:
                raise ValueError(f"size must be >= 1 pixel, got {size}")
        else:
            size = as_size(size, "size")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "crop", None if crop is None else
                           _crop_from(crop, padding, pad_if_needed))
        object.__setattr__(self, "interpolation", _interp(interpolation, antialias))

    def _choice_values(self):
        return (None,)

    def resized_size(self, image_size) -> Size:
        h, w = as_size(image_size, "image_size")
        if not isinstance(self.size, int):
            return self.size
        short, long = min(h, w), max(h, w)
        other = self.size * long // short
        return (other, self.size) if w <= h else (self.size, other)

    def _plans(self, image_size):
        resized = self.resized_size(image_size)
        crop = self.crop if self.crop is not None else CropGeometry(resized)
        return [_window_plans(image_size, resized, crop,
                              f"image {_text(image_size)} resized to {_text(resized)}")]

    def output_size(self, image_size) -> Size:
        return self.crop.crop_size if self.crop is not None else self.resized_size(image_size)

    def choices(self, image_size):
        return [{"resized": list(self.resized_size(image_size))}]

    def to_dict(self) -> dict:
        return {"kind": self.kind,
                "size": self.size if isinstance(self.size, int) else list(self.size),
                "crop": None if self.crop is None else self.crop.to_dict(),
                "interpolation": self.interpolation.to_dict()}

    def describe(self) -> str:
        size = f"shorter side {self.size}" if isinstance(self.size, int) else _text(self.size)
        crop = f" then crop {_text(self.crop.crop_size)}" if self.crop is not None else ""
        return f"resize to {size} ({self.interpolation.describe()}){crop}"


def _interp(interpolation, antialias) -> Interpolation:
    if isinstance(interpolation, Interpolation):
        return interpolation
    return Interpolation(interpolation, antialias)


def _text(size) -> str:
    return f"{size[0]}x{size[1]}"


def _num(x: Fraction) -> str:
    return str(x) if x.denominator > 100 else f"{float(x):g}"


TRANSFORMS = {cls.kind: cls for cls in (FixedCrop, RandomScaleCrop, RandomResizedCrop, Resize)}


def transform_from_dict(d: dict):
    """Inverse of ``to_dict`` for every transform; a dict without ``kind`` is a
    :class:`~.geometry.CropGeometry` (the format privacy reports have always used)."""
    kind = d.get("kind")
    if kind is None:
        return CropGeometry.from_dict(d)
    interp = Interpolation.from_dict(d["interpolation"]) if "interpolation" in d else NEAREST
    if kind == FixedCrop.kind:
        return FixedCrop(CropGeometry.from_dict(d))
    if kind == RandomScaleCrop.kind:
        return RandomScaleCrop(CropGeometry.from_dict(d["crop"]), d["scales"],
                               interpolation=interp)
    if kind == RandomResizedCrop.kind:
        return RandomResizedCrop(tuple(d["size"]), tuple(d["scale"]), tuple(d["ratio"]),
                                 tuple(d["grid"]), interpolation=interp)
    if kind == Resize.kind:
        size = d["size"] if isinstance(d["size"], int) else tuple(d["size"])
        crop = None if d.get("crop") is None else CropGeometry.from_dict(d["crop"])
        return Resize(size, interp, crop=crop)
    raise ValueError(f"unknown transform kind {kind!r}; known: {', '.join(TRANSFORMS)}")


def as_transform(obj) -> GeometricTransform:
    """A :class:`GeometricTransform` for ``obj`` (a :class:`~.geometry.CropGeometry` becomes a
    :class:`FixedCrop`)."""
    if isinstance(obj, GeometricTransform):
        return obj
    if isinstance(obj, CropGeometry):
        return FixedCrop(obj)
    raise TypeError(f"expected a CropGeometry or a geometric transform, got {type(obj).__name__}")


#: ``privacy.transform`` of a config: kind -> the keys it may hold (constructor arguments; the
#: crop, padding and pad_if_needed come from ``privacy.crop`` / ``padding`` / ``pad_if_needed``).
CONFIG_KEYS = {
    RandomScaleCrop.kind: ("scales", "scale_range", "scale_step", "interpolation", "antialias"),
    Resize.kind: ("size", "interpolation", "antialias"),
    RandomResizedCrop.kind: ("scale", "ratio", "grid", "interpolation", "antialias"),
}


def geometry_from_config(crop, padding=(0, 0), pad_if_needed=False, transform=None):
    """The loader's geometry from a config's ``privacy`` section: ``crop`` (the output size
    the model sees, ``(h, w)``), ``padding``, ``pad_if_needed`` and an optional ``transform``
    mapping ``{kind: ..., <arguments>}`` (keys: :data:`CONFIG_KEYS`; numbers may be strings
    such as ``"3/4"``, read exactly)::

        None                                          -> CropGeometry(crop, padding, ...)
        {kind: random_scale_crop, scale_range: [0.5, 2.0], scale_step: 0.25}
                                                      -> RandomScaleCrop(CropGeometry(...), ...)
        {kind: resize, size: [300, 300]}              -> Resize(size, crop=CropGeometry(...))
        {kind: random_resized_crop, scale: [0.08, 1]} -> RandomResizedCrop(crop, ...)

    RandomResizedCrop's output size is ``crop`` (its box lies inside the image: ``padding`` and
    ``pad_if_needed`` must stay at 0 / false).  Raises ``ValueError`` naming the key."""
    geometry = CropGeometry(tuple(crop), tuple(padding), bool(pad_if_needed))
    if transform is None:
        return geometry
    if not isinstance(transform, dict) or "kind" not in transform:
        raise ValueError(f"transform must be a mapping with a 'kind' ({', '.join(CONFIG_KEYS)}), "
                         f"got {transform!r}")
    kind, args = transform["kind"], {k: v for k, v in transform.items() if k != "kind"}
    if kind not in CONFIG_KEYS:
        raise ValueError(f"transform.kind {kind!r} is not a loader-owned transform; known: "
                         f"{', '.join(CONFIG_KEYS)} (a plain crop needs no transform)")
    unknown = sorted(set(args) - set(CONFIG_KEYS[kind]))
    if unknown:
        raise ValueError(f"transform ({kind}): unknown key(s) {unknown}; known: "
                         f"{', '.join(CONFIG_KEYS[kind])}")
    for key in ("scale_range", "scale", "ratio", "grid", "size"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    try:
        if kind == RandomScaleCrop.kind:
            return RandomScaleCrop(geometry, **args)
        if kind == Resize.kind:
            if "size" not in args:
                raise ValueError("needs size: [h, w] (or the shorter side)")
            return Resize(args.pop("size"), crop=geometry, **args)
        if geometry.padding != (0, 0) or geometry.pad_if_needed:
            raise ValueError("its box lies inside the image: leave padding at [0, 0] and "
                             "pad_if_needed false")
        return RandomResizedCrop(geometry.crop_size, **args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"transform ({kind}): {exc}") from None


def footprint_inclusion(transform, image_sizes, region) -> FootprintInclusion:
    """``p`` of any transform (a CropGeometry included) through the footprint analysis."""
    return as_transform(transform).inclusion_probability(image_sizes, region)


__all__ = ["GeometricTransform", "FixedCrop", "RandomScaleCrop", "RandomResizedCrop", "Resize",
           "TRANSFORMS", "transform_from_dict", "as_transform", "footprint_inclusion",
           "geometry_from_config", "CONFIG_KEYS",
           "scale_grid", "scaled_length", "as_fraction", "clear_caches"]
