"""Resampling kernels, one axis at a time: which source samples each output sample reads.

:func:`axis_taps` is the one function from which both sides of a claim are computed: the
footprint that the accountant's ``p`` is built on (:mod:`.footprint`) and the pixels that the
loader's resampling really reads (:mod:`patchdp_opacus.plugin.resample`).  Neither side has a
formula of its own, so the two cannot drift apart.

Conventions (one axis): the source has ``in_size`` samples, the output ``out_size``; ``o`` is an
output index (0-based) and ``r = in_size / out_size`` the scale (``r > 1``: downscaling).  Pixel
centres sit at ``index + 1/2`` (``align_corners=False``).  A *tap* is a source index with its
weight; every output sample is the weighted sum of its taps.

The kernels are those of ``torch.nn.functional.interpolate`` with ``size=`` given, which
``torchvision.transforms.v2.functional.resize`` calls for tensors (checked in torch 2.14:
``ATen/native/UpSample.h`` and ``native/cpu/UpSampleKernel.cpp``; torchvision 0.29):

* ``nearest``: ``src = min(floor(o * fl32(in/out)), in - 1)`` in *float32* arithmetic (torch keeps
  OpenCV's INTER_NEAREST formula, which is shifted by half a pixel); identity when
  ``out == in``, ``o >> 1`` when ``out == 2 in``.  One tap.  This is what torchvision uses for
  ``InterpolationMode.NEAREST`` (masks).
* ``nearest-exact``: ``src = min(floor(fl32((o + 1/2) * fl32(in/out))), in - 1)``.  One tap.
* ``bilinear`` without antialias: ``s = max(r (o + 1/2) - 1/2, 0)``, ``i0 = floor(s)``,
  taps ``i0`` and ``min(i0 + 1, in - 1)`` with weights ``1 - t`` and ``t = s - i0``: at most
  two source samples.
* ``bicubic`` without antialias: ``s = r (o + 1/2) - 1/2`` (not clamped), ``i0 = floor(s)``,
  taps ``i0 - 1 .. i0 + 2`` clamped into ``[0, in - 1]`` (the border is replicated), Keys' cubic
  convolution with ``A = -0.75``: at most four source samples.
* ``antialias=True`` (bilinear or bicubic; torchvision's default for tensors): PIL's resampling.
  Centre ``c = r (o + 1/2)``, support ``R * max(r, 1)`` with ``R = 1`` (triangle) or ``R = 2``
  (Keys' cubic with ``a = -0.5``, PIL's value, not the ``-0.75`` above); taps
  ``trunc(c - support + 1/2) .. trunc(c + support + 1/2) - 1`` clipped to the image (at most
  ``2 ceil(support) + 1``), weight ``filter((j - c + 1/2) / max(r, 1))``, normalised to sum 1.
  **Downscaling by r widens the footprint by the factor r**; upscaling with the triangle
  equals plain bilinear.

Zero weights at either end of an output's taps are dropped: a sample with weight zero is not
read.  (Zero weights *between* non-zero ones stay; a footprint is an interval, so a hole in it
only makes ``p`` an upper bound.)  Every kernel reduces to the identity when
``in_size == out_size`` (torch copies; the kernels give weight exactly 1 there).

Precision: weights and real-valued source positions are float64; the two nearest modes copy
torch's float32 index arithmetic so that masks match torchvision exactly.  Tap *indices* are
integers, and the footprint and the resampling both take them from here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")
_KEYS_A = -0.75          # torch's bicubic (upsample_bicubic2d)
_KEYS_A_ANTIALIAS = -0.5  # torch's antialiased bicubic (PIL's value)


@dataclass(frozen=True)
class Interpolation:
    """A resampling kernel: ``mode`` in :data:`INTERPOLATIONS` and ``antialias`` (bilinear and
    bicubic only; ignored, and stored as False, for the nearest modes, as torchvision does)."""

    mode: str = "bilinear"
    antialias: bool = True

    def __post_init__(self):
        mode = str(self.mode).lower().replace("_", "-")
        if mode not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.mode!r}; choose one of "
                             f"{', '.join(INTERPOLATIONS)}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "antialias", bool(self.antialias) and not self.is_nearest)

    @property
    def is_nearest(self) -> bool:
        return self.mode in ("nearest", "nearest-exact")

    def describe(self) -> str:
        return self.mode + (" (antialiased)" if self.antialias else "")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "antialias": self.antialias}

    @classmethod
    def from_dict(cls, d: dict) -> "Interpolation":
        return cls(d["mode"], bool(d.get("antialias", False)))


#: The kernel every mask is resampled with (labels must not be blended).
NEAREST = Interpolation("nearest", False)


@dataclass(frozen=True, eq=False)
class Taps:
    """Taps of ``n`` output samples: output ``k`` reads source samples ``first[k] + t`` with
    weights ``weights[k, t]`` for ``t < count[k]`` (``weights[k, 0]`` and
    ``weights[k, count[k] - 1]`` are non-zero; columns beyond ``count[k]`` are zero padding)."""

    first: np.ndarray
    weights: np.ndarray
    count: np.ndarray

    @property
    def last(self) -> np.ndarray:
        """Last source index read (inclusive)."""
        return self.first + self.count - 1

    def __len__(self) -> int:
        return len(self.first)


def axis_taps(interp: Interpolation, in_size: int, out_size: int, out_index=None) -> Taps:
    """Taps of the output samples ``out_index`` (default: all ``out_size``) of a resize of one
    axis from ``in_size`` to ``out_size`` samples with kernel ``interp``; see the module
    docstring for each kernel."""
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize lengths must be >= 1 pixel, got {in_size} -> {out_size}")
    o = np.arange(out_size, dtype=np.int64) if out_index is None else \
        np.asarray(out_index, dtype=np.int64).reshape(-1)
    if o.size and (o.min() < 0 or o.max() >= out_size):
        raise ValueError(f"output indices must lie in [0, {out_size}), got {o.min()}..{o.max()}")
    if in_size == out_size:
        return Taps(o.copy(), np.ones((o.size, 1)), np.ones(o.size, dtype=np.int64))
    if interp.is_nearest:
        src = _nearest_index(interp.mode, in_size, out_size, o)
        return Taps(src, np.ones((o.size, 1)), np.ones(o.size, dtype=np.int64))
    if interp.antialias:
        base, w = _antialias_weights(interp.mode, in_size, out_size, o)
    elif interp.mode == "bilinear":
        base, w = _bilinear_weights(in_size, out_size, o)
    else:
        base, w = _bicubic_weights(in_size, out_size, o)
    return _fold_and_trim(base, w, in_size)


def _nearest_index(mode: str, in_size: int, out_size: int, o: np.ndarray) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)  # compute_scales_value<float>
    if mode == "nearest":
        if out_size == 2 * in_size:
            return o >> 1
        src = np.floor(o.astype(np.float32) * scale)  # floorf(int64 * float), float32 product
    else:  # floorf((o + 0.5) * scale): a double product, rounded to float by floorf's argument
        src = np.floor(((o + 0.5) * np.float64(scale)).astype(np.float32))
    return np.minimum(src.astype(np.int64), in_size - 1)


def _source_position(in_size: int, out_size: int, o: np.ndarray) -> np.ndarray:
    return (in_size / out_size) * (o + 0.5) - 0.5


def _bilinear_weights(in_size, out_size, o):
    s = np.maximum(_source_position(in_size, out_size, o), 0.0)
    i0 = np.minimum(np.floor(s).astype(np.int64), in_size - 1)
    t = np.clip(s - i0, 0.0, 1.0)
    return i0, np.stack([1.0 - t, t], axis=1)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distance ``|x|`` (support 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic_weights(in_size, out_size, o):
    s = _source_position(in_size, out_size, o)
    i0 = np.minimum(np.floor(s).astype(np.int64), in_size - 1)
    t = np.clip(s - i0, 0.0, 1.0)
    # torch evaluates the two branches at t + 1, t, 1 - t, 2 - t; the same polynomial pieces
    dist = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=1)
    return i0 - 1, _cubic(dist, _KEYS_A)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _antialias_weights(mode, in_size, out_size, o):
    r = in_size / out_size
    half = 1.0 if mode == "bilinear" else 2.0           # interp_size / 2
    support = half * r if r >= 1.0 else half
    invscale = 1.0 / r if r >= 1.0 else 1.0
    max_taps = int(math.ceil(support)) * 2 + 1
    centre = r * (o + 0.5)
    xmin = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, max_taps)                 # torch clips a float-rounding extra tap
    j = np.arange(max_taps)
    x = (j[None, :] + xmin[:, None] - centre[:, None] + 0.5) * invscale
    w = _triangle(x) if mode == "bilinear" else _cubic(x, _KEYS_A_ANTIALIAS)
    w = np.where(j[None, :] < xsize[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return xmin, w


def _fold_and_trim(base: np.ndarray, w: np.ndarray, in_size: int) -> Taps:
    """Taps at ``base + t`` (clamped into the image: a clamped tap adds its weight to the border
    sample) -> :class:`Taps` with zero weights removed from both ends."""
    n, width = w.shape
    idx = np.clip(base[:, None] + np.arange(width), 0, in_size - 1)
    first = idx[:, 0]
    dense = np.zeros((n, width))
    np.add.at(dense, (np.repeat(np.arange(n), width), (idx - first[:, None]).ravel()), w.ravel())
    nonzero = dense != 0
    if n and not nonzero.any(axis=1).all():  # pragma: no cover - no kernel gives an empty row
        raise RuntimeError("an output sample has no non-zero tap")
    lead = nonzero.argmax(axis=1)
    trail = width - 1 - nonzero[:, ::-1].argmax(axis=1)
    count = trail - lead + 1
    cols = np.minimum(lead[:, None] + np.arange(width), width - 1)
    out = np.where(np.arange(width) < count[:, None], np.take_along_axis(dense, cols, axis=1), 0.0)
    keep = int(count.max()) if n else 1
    return Taps(first + lead, out[:, :keep], count.astype(np.int64))


@functools.lru_cache(maxsize=512)
def _all_taps(interp: Interpolation, in_size: int, out_size: int) -> Taps:
    taps = axis_taps(interp, in_size, out_size)
    for a in (taps.first, taps.weights, taps.count):
        a.setflags(write=False)
    return taps


def taps_at(interp: Interpolation, in_size: int, out_size: int, out_index) -> Taps:
    """:func:`axis_taps` of the outputs ``out_index``, sliced from the (cached) taps of the
    whole axis: the same numbers, computed once per resize."""
    taps = _all_taps(interp, int(in_size), int(out_size))
    o = np.asarray(out_index, dtype=np.int64).reshape(-1)
    count = taps.count[o]
    width = int(count.max()) if o.size else 1
    return Taps(taps.first[o], taps.weights[o, :width], count)


@functools.lru_cache(maxsize=512)
def resize_bounds(interps: tuple, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds ``lo[o] <= hi[o]`` such that the outputs ``a..b`` of a resize ``in_size ->
    out_size`` read, under *any* of the kernels ``interps`` (e.g. the image's and the mask's),
    only source samples in ``[lo[a], hi[b])``; both arrays are non-decreasing.

    ``lo[o] = min over o' >= o`` of the first tap and ``hi[o] = max over o' <= o`` of the last
    tap + 1.  For every kernel whose tap bounds already grow with ``o`` that is exactly the hull
    of the taps; only the cubic kernels, whose zero-weight end taps are dropped (e.g. at
    integer source positions), can make it one sample wider.  Cached; read-only."""
    lo = hi = None
    for interp in interps:
        taps = _all_taps(interp, in_size, out_size)
        lo = taps.first if lo is None else np.minimum(lo, taps.first)
        hi = taps.last + 1 if hi is None else np.maximum(hi, taps.last + 1)
    if lo is None:
        raise ValueError("need at least one interpolation")
    lo = np.minimum.accumulate(lo[::-1])[::-1].copy()
    hi = np.maximum.accumulate(hi)
    lo.setflags(write=False)
    hi.setflags(write=False)
    return lo, hi
