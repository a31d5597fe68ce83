"""Private regions: the shape of the content a patch-level guarantee protects.

A region is a boolean mask inside its bounding box of ``(height, width)`` pixels; the
guarantee holds for the region at *any* placement inside the image.  Rectangles have a closed
form (Lemma 1); every other shape is handled exactly through its mask.  Several regions of one
image can be protected together either as one :class:`Union` mask (tight) or through k-fold
group privacy (see :func:`patchdp_opacus.privacy.accounting.group_epsilon`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patchdp_opacus.privacy._sizes import as_size

_SHAPES = ("rectangle", "square", "circle", "crescent", "blob", "cluster")


class PrivateRegion:
    """Base class: a non-empty boolean mask in a bounding box of ``size = (height, width)``."""

    name = "region"

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.mask().shape)

    def mask(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"shape": self.name, "size": list(self.size), "pixels": int(self.mask().sum())}


def _check_positive(name, *values):
    for v in values:
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be positive integers (pixels), got {values}")


@dataclass(frozen=True)
class Rectangle(PrivateRegion):
    """Axis-aligned ``height x width`` rectangle (a square when both are equal)."""

    height: int
    width: int
    name = "rectangle"

    def __post_init__(self):
        _check_positive("rectangle size", self.height, self.width)

    @property
    def size(self):
        return (int(self.height), int(self.width))

    def mask(self):
        return np.ones(self.size, dtype=bool)


def Square(side: int) -> Rectangle:  # noqa: N802 - reads like a class
    """A ``side x side`` rectangle."""
    return Rectangle(side, side)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    """Pixels (by their centres) within radius ``r`` of ``(cy, cx)`` in an ``h x w`` box."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@dataclass(frozen=True)
class Circle(PrivateRegion):
    """Disc of the given diameter (pixels whose centres lie inside), e.g. a face."""

    diameter: int
    name = "circle"

    def __post_init__(self):
        _check_positive("circle diameter", self.diameter)

    def mask(self):
        d = int(self.diameter)
        m = _disc(d, d, d / 2, d / 2, d / 2)
        return m if m.any() else np.ones((d, d), dtype=bool)


@dataclass(frozen=True)
class Crescent(PrivateRegion):
    """Irregular blob: an ellipse filling the box minus a disc cut from its right side."""

    height: int
    width: int
    name = "crescent"

    def __post_init__(self):
        _check_positive("crescent size", self.height, self.width)

    def mask(self):
        h, w = int(self.height), int(self.width)
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        ellipse = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1.0
        bite = _disc(h, w, h / 2, w * 0.85, 0.45 * min(h, w))
        m = ellipse & ~bite
        return _trim(m) if m.any() else np.ones((h, w), dtype=bool)


@dataclass(frozen=True)
class Cluster(PrivateRegion):
    """Two overlapping discs along the box's diagonal (e.g. two faces side by side)."""

    height: int
    width: int
    name = "cluster"

    def __post_init__(self):
        _check_positive("cluster size", self.height, self.width)

    def mask(self):
        h, w = int(self.height), int(self.width)
        r = 0.3 * min(h, w) if h != w else 0.32 * h
        r = max(r, 0.5)
        m = _disc(h, w, r, r, r) | _disc(h, w, h - r, w - r, r)
        return _trim(m) if m.any() else np.ones((h, w), dtype=bool)


@dataclass(frozen=True, eq=False)
class Mask(PrivateRegion):
    """Any non-empty boolean mask (trimmed to its bounding box)."""

    array: np.ndarray = field(repr=False)
    name = "mask"

    def __post_init__(self):
        a = np.asarray(self.array, dtype=bool)
        if a.ndim != 2 or not a.any():
            raise ValueError("private-region mask must be a non-empty 2-D boolean array")
        object.__setattr__(self, "array", _trim(a))

    def mask(self):
        return self.array


def Union(regions_with_offsets) -> Mask:  # noqa: N802
    """Several regions of one image protected together, as one mask.

    ``regions_with_offsets``: iterable of ``(region, (dy, dx))`` giving each region's top-left
    inside a common frame; the union's bounding box is the new region."""
    items = [(as_region(r), (int(o[0]), int(o[1]))) for r, o in regions_with_offsets]
    if not items:
        raise ValueError("Union needs at least one region")
    if any(dy < 0 or dx < 0 for _, (dy, dx) in items):
        raise ValueError("region offsets must be non-negative (dy, dx)")
    h = max(dy + r.size[0] for r, (dy, dx) in items)
    w = max(dx + r.size[1] for r, (dy, dx) in items)
    out = np.zeros((h, w), dtype=bool)
    for r, (dy, dx) in items:
        m = r.mask()
        out[dy:dy + m.shape[0], dx:dx + m.shape[1]] |= m
    return Mask(out)


def _trim(m: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def make_region(shape: str, size) -> PrivateRegion:
    """Region by name: ``rectangle``/``square`` (size ``(h, w)``), ``circle`` (diameter
    ``min(h, w)``), ``crescent``/``blob`` and ``cluster`` (bounding box ``(h, w)``)."""
    h, w = as_size(size, "patch size")
    shape = shape.lower()
    if shape in ("rectangle", "square"):
        return Rectangle(h, w)
    if shape == "circle":
        return Circle(min(h, w))
    if shape in ("crescent", "blob"):
        return Crescent(h, w)
    if shape == "cluster":
        return Cluster(h, w)
    raise ValueError(f"unknown patch shape {shape!r}; choose one of {', '.join(_SHAPES)}")


def as_region(region) -> PrivateRegion:
    """Accept a region, an int (square side), a ``(h, w)`` pair (rectangle) or a bool mask."""
    if isinstance(region, PrivateRegion):
        return region
    if isinstance(region, (int, np.integer)):
        return Rectangle(int(region), int(region))
    arr = np.asarray(region)
    if arr.ndim == 1 and arr.shape == (2,) and np.issubdtype(arr.dtype, np.integer):
        return Rectangle(int(arr[0]), int(arr[1]))
    if arr.ndim == 2 and arr.dtype == bool:
        return Mask(arr)
    raise ValueError(f"cannot interpret {region!r} as a private region: pass a (height, width) "
                     f"pair, a square side, a boolean mask or a PrivateRegion")


SHAPES = _SHAPES


def region_to_dict(region: PrivateRegion) -> dict:
    """JSON-able description from which :func:`region_from_dict` rebuilds the same mask."""
    region = as_region(region)
    if isinstance(region, Rectangle):
        return {"shape": "rectangle", "size": [region.height, region.width]}
    if isinstance(region, Circle):
        return {"shape": "circle", "diameter": region.diameter}
    if isinstance(region, (Crescent, Cluster)):
        return {"shape": region.name, "size": [region.height, region.width]}
    m = region.mask()
    return {"shape": "mask", "rows": ["".join("1" if v else "0" for v in row) for row in m]}


def region_from_dict(d: dict) -> PrivateRegion:
    shape = d["shape"]
    if shape == "circle":
        return Circle(int(d["diameter"]))
    if shape == "mask":
        return Mask(np.array([[c == "1" for c in row] for row in d["rows"]], dtype=bool))
    return make_region(shape, tuple(d["size"]))
