"""Crop geometry and the worst-case patch-inclusion probability p.

Conventions (all sizes are ``(height, width)`` in pixels):

* the image is ``H x W``; constant padding of ``pad_h`` rows above *and* below and ``pad_w``
  columns left *and* right gives the padded image ``H' x W'`` with ``H' = H + 2 pad_h``;
* with ``pad_if_needed`` a padded side that is still shorter than the crop is padded further,
  symmetrically, to exactly the crop size (the extra pixel of an odd difference goes to the
  bottom/right);
* a crop of ``c_h x c_w`` has its top-left corner (origin) drawn uniformly from all integer
  origins ``0 <= i <= S_y = H' - c_h``, ``0 <= j <= S_x = W' - c_w``;
* the private region is a boolean mask (its bounding box is ``k_h x k_w``) that may sit at any
  placement inside the *original* image;
* ``p`` is the largest probability, over those placements, that the crop intersects the region.

Lemma 1 (rectangle at padded top-left ``x`` on one axis): the number of origins whose crop
window intersects ``[x, x + k - 1]`` is
``n(x) = min(S, x + k - 1) - max(0, x - c + 1) + 1`` (0 if negative); for a rectangle the 2-D
count is ``n_y(y) * n_x(x)``.  Theorem 1: ``n`` is symmetric about ``x* = (S + c - k) / 2``
and non-decreasing before it, so the worst placement inside the image is the one nearest the
centre.  For arbitrary masks the set of hit origins is the mask dilated by the crop window; its
size for every placement at once is a rectangle sum of the dilation (summed-area tables).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from patchdp_opacus.privacy._sizes import Size, _pair, as_size  # noqa: F401 - re-exported
from patchdp_opacus.privacy._sizes import as_size_list as _as_size_list
from patchdp_opacus.privacy.regions import Rectangle, as_region


@dataclass(frozen=True)
class AxisGeometry:
    """One axis of a padded image: ``before`` pixels of padding, the image of ``length``
    pixels, ``after`` pixels of padding, and a crop of ``crop`` pixels."""

    length: int
    before: int
    after: int
    crop: int

    @property
    def padded(self) -> int:
        return self.before + self.length + self.after

    @property
    def num_origins(self) -> int:
        """``S + 1``: number of integer crop origins on this axis."""
        return self.padded - self.crop + 1

    def hit_count(self, x, k: int):
        """Lemma 1: origins whose crop window intersects ``[x, x + k - 1]`` (padded coords).

        ``x`` may be an int or an integer numpy array."""
        s = self.padded - self.crop
        n = np.minimum(s, np.asarray(x) + k - 1) - np.maximum(0, np.asarray(x) - self.crop + 1) + 1
        n = np.maximum(n, 0)
        return int(n) if np.ndim(n) == 0 else n

    def worst_placement(self, k: int) -> int:
        """Theorem 1: the padded coordinate of a ``k``-pixel segment inside the image that
        maximises :meth:`hit_count` (the placement nearest the centre ``(S + c - k) / 2``)."""
        lo, hi = self.before, self.before + self.length - k
        centre = (self.padded - self.crop + self.crop - k) / 2  # (S + c - k) / 2
        return int(min(max(math.floor(centre), lo), hi))


@dataclass(frozen=True)
class CropGeometry:
    """The random crop the loader applies: its size, symmetric constant padding and
    ``pad_if_needed`` (pad a too-short side, symmetrically, up to the crop size).

    Only constant padding (zeros for images, the ignore index for masks) is covered by the
    analysis: reflect/replicate padding copies the private region into the border.
    """

    crop_size: Size
    padding: Size = (0, 0)
    pad_if_needed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "crop_size", as_size(self.crop_size, "crop_size"))
        object.__setattr__(self, "padding", as_size(self.padding, "padding", minimum=0))
        object.__setattr__(self, "pad_if_needed", bool(self.pad_if_needed))

    def axes(self, image_size) -> tuple[AxisGeometry, AxisGeometry]:
        """Padded geometry of each axis for an image of ``image_size = (H, W)``.

        Raises ``ValueError`` when the crop does not fit and ``pad_if_needed`` is off."""
        h, w = as_size(image_size, "image_size")
        out = []
        for axis, length, pad, crop in (("height", h, self.padding[0], self.crop_size[0]),
                                        ("width", w, self.padding[1], self.crop_size[1])):
            before = after = pad
            short = crop - (length + 2 * pad)
            if short > 0:
                if not self.pad_if_needed:
                    raise ValueError(
                        f"crop {axis} {crop} is larger than the padded image {axis} "
                        f"{length + 2 * pad} (image {length} + 2 x padding {pad}); use a smaller "
                        f"crop_size, more padding, or pad_if_needed=True")
                before += short // 2
                after += short - short // 2
            out.append(AxisGeometry(length, before, after, crop))
        return out[0], out[1]

    def padded_size(self, image_size) -> Size:
        ay, ax = self.axes(image_size)
        return ay.padded, ax.padded

    def pad_offsets(self, image_size) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` padding applied to an image of ``image_size``."""
        ay, ax = self.axes(image_size)
        return ay.before, ay.after, ax.before, ax.after

    def num_origins(self, image_size) -> int:
        ay, ax = self.axes(image_size)
        return ay.num_origins * ax.num_origins

    def to_dict(self) -> dict:
        return {"crop_size": list(self.crop_size), "padding": list(self.padding),
                "pad_if_needed": self.pad_if_needed}

    @classmethod
    def from_dict(cls, d: dict) -> "CropGeometry":
        return cls(tuple(d["crop_size"]), tuple(d["padding"]), bool(d["pad_if_needed"]))


@dataclass(frozen=True)
class InclusionProbability:
    """Worst-case probability ``p`` that a random crop intersects the private region.

    ``fraction`` is exact (hit origins / all origins) for the worst image size;
    ``value`` is its float; ``image_size`` and ``placement`` (padded top-left ``(y, x)`` of the
    region's bounding box) say where the worst case is attained."""

    fraction: Fraction
    image_size: Size
    placement: tuple[int, int]

    @property
    def value(self) -> float:
        return float(self.fraction)

    def __float__(self) -> float:
        return self.value


def _check_fits(region_size: Size, image_size: Size) -> None:
    if region_size[0] > image_size[0] or region_size[1] > image_size[1]:
        raise ValueError(
            f"private region {region_size[0]}x{region_size[1]} (height x width) does not fit in "
            f"image {image_size[0]}x{image_size[1]}; use a smaller private region or check "
            f"image_size")


def rectangle_inclusion(crop: CropGeometry, image_size, patch_size) -> InclusionProbability:
    """Exact worst-case ``p`` for a ``k_h x k_w`` rectangle (Lemma 1 at the Theorem 1 placement)."""
    image_size = as_size(image_size, "image_size")
    kh, kw = as_size(patch_size, "patch_size")
    _check_fits((kh, kw), image_size)
    ay, ax = crop.axes(image_size)
    y, x = ay.worst_placement(kh), ax.worst_placement(kw)
    hits = ay.hit_count(y, kh) * ax.hit_count(x, kw)
    return InclusionProbability(Fraction(hits, ay.num_origins * ax.num_origins), image_size, (y, x))


def _box_sums(table: np.ndarray, r0, r1, c0, c1):
    """Sums of ``a[r0:r1, c0:c1]`` from the summed-area table ``table`` of ``a``
    (``table[i, j] = a[:i, :j].sum()``); indices may be arrays."""
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]


def _summed_area(a: np.ndarray) -> np.ndarray:
    t = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1, out=t[1:, 1:])
    return t


def mask_hit_counts(crop: CropGeometry, image_size, mask: np.ndarray) -> np.ndarray:
    """Number of crop origins hitting ``mask`` for *every* placement inside the image.

    Returns an int64 array of shape ``(H - m_h + 1, W - m_w + 1)``; entry ``[a, b]`` is for the
    mask's bounding box at image coordinates ``(a, b)`` (padded ``(a + top, b + left)``).

    The crop at origin ``(i, j)`` meets the mask at padded placement ``(y, x)`` iff
    ``(i - y, j - x)`` lies in ``D``, the mask dilated by the crop window
    (``D[du, dv] = 1`` iff some mask pixel ``(u, v)`` has ``0 <= u - du < c_h`` and
    ``0 <= v - dv < c_w``).  The count is ``D`` summed over the offsets that keep the origin
    on the grid ``[0, S_y] x [0, S_x]`` — a rectangle sum of ``D`` per placement.
    """
    image_size = as_size(image_size, "image_size")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("private-region mask must be a non-empty 2-D boolean array")
    mh, mw = mask.shape
    _check_fits((mh, mw), image_size)
    ay, ax = crop.axes(image_size)
    ch, cw = crop.crop_size
    # Dilation by the crop window: D index (r, s) <-> offset (du, dv) = (r - (c_h - 1), s - (c_w - 1)),
    # D[r, s] = any(mask[r - c_h + 1 : r + 1, s - c_w + 1 : s + 1]).
    m_sat = _summed_area(mask.astype(np.int64))
    r = np.arange(mh + ch - 1)
    s = np.arange(mw + cw - 1)
    r0, r1 = np.clip(r - ch + 1, 0, mh), np.clip(r + 1, 0, mh)
    s0, s1 = np.clip(s - cw + 1, 0, mw), np.clip(s + 1, 0, mw)
    dilated = _box_sums(m_sat, r0[:, None], r1[:, None], s0[None, :], s1[None, :]) > 0
    d_sat = _summed_area(dilated.astype(np.int64))
    # Placements: padded y = top + a; origin i = y + du must lie in [0, S_y]
    # -> du in [-y, S_y - y] -> D rows r in [c_h - 1 - y, c_h - 1 + S_y - y].
    y = ay.before + np.arange(ay.length - mh + 1)
    x = ax.before + np.arange(ax.length - mw + 1)
    sy, sx = ay.padded - ch, ax.padded - cw
    ry0 = np.clip(ch - 1 - y, 0, mh + ch - 1)
    ry1 = np.clip(ch - 1 + sy - y + 1, 0, mh + ch - 1)
    rx0 = np.clip(cw - 1 - x, 0, mw + cw - 1)
    rx1 = np.clip(cw - 1 + sx - x + 1, 0, mw + cw - 1)
    return _box_sums(d_sat, ry0[:, None], ry1[:, None], rx0[None, :], rx1[None, :])


def mask_inclusion(crop: CropGeometry, image_size, mask: np.ndarray) -> InclusionProbability:
    """Exact worst-case ``p`` for an arbitrary boolean mask, maximised over all placements."""
    image_size = as_size(image_size, "image_size")
    counts = mask_hit_counts(crop, image_size, mask)
    a, b = np.unravel_index(int(np.argmax(counts)), counts.shape)
    top, _, left, _ = crop.pad_offsets(image_size)
    return InclusionProbability(Fraction(int(counts[a, b]), crop.num_origins(image_size)),
                                image_size, (int(a) + top, int(b) + left))


def inclusion_probability(crop: CropGeometry, image_sizes, region) -> InclusionProbability:
    """Worst-case patch-inclusion probability ``p`` over every declared image size.

    ``image_sizes`` is one ``(H, W)`` or an iterable of them; ``region`` is a
    :class:`~patchdp_opacus.privacy.regions.PrivateRegion`, a ``(k_h, k_w)`` pair / int
    (rectangle / square) or a boolean mask.  Rectangles use the closed form, other regions the
    exact all-placement count; both return exact fractions.
    """
    region = as_region(region)
    sizes = _as_size_list(image_sizes)
    worst = None
    for size in sizes:
        if isinstance(region, Rectangle):
            cur = rectangle_inclusion(crop, size, region.size)
        else:
            cur = mask_inclusion(crop, size, region.mask())
        if worst is None or cur.fraction > worst.fraction:
            worst = cur
    return worst
