"""Footprints: the exact patch-inclusion probability of any loader-owned geometric transform.

Setting.  A random transform ``T_theta`` (crop, resize-then-crop, RandomResizedCrop, ...) maps a
stored image of ``H x W`` pixels (sizes are ``(height, width)`` in pixels) to its output.  Its
parameters ``theta`` are drawn from a finite distribution fixed by the transform and the image
*size* only, never by pixel values.  The *footprint* ``F(theta)`` is the set of stored pixels
that the output can depend on: for every pair of images that agree on ``F(theta)``,
``T_theta`` gives identical outputs.

Claim.  Let ``R`` be the private region at placement ``rho`` and
``p(rho) = P_theta(F(theta) ∩ R_rho != ∅)``.  Then Theorem 2 holds with ``w = q * p`` for
``p = max_rho p(rho)``.  Proof sketch: the two neighbouring images ``x, x'`` differ only inside
``R_rho``.  On the event ``E = {F(theta) ∩ R_rho = ∅}`` (probability ``1 - p(rho)``) the outputs
are equal, so the loader's sample is, on both sides, a mixture
``(1 - p) mu_0 + p mu_1`` vs ``(1 - p) mu_0 + p mu_1'`` with the *same* ``mu_0`` (the law of the
output given ``E``, which depends on ``x`` only through pixels outside ``R_rho``).  That is the
only property of the crop that Theorem 2's proof uses (the canary's clipped gradient is the
common one on ``E`` and arbitrary in the clip ball otherwise), and the dominating pair is
monotone in ``w``, so any upper bound on ``p(rho)`` is also valid.  A fixed-size crop is the
case ``F = `` crop window (Lemma 1).

What is computed.  Here ``theta = (g, i, j)``: a *choice* ``g`` (a scale, a box shape) drawn
uniformly from ``G`` choices, then an origin ``(i, j)`` drawn uniformly from the ``n_y(g) x
n_x(g)`` origins of that choice.  Resampling is separable, so ``F(theta)`` is contained in a
product of one source interval per axis: ``F_y(g, i) x F_x(g, j)``, where ``F_y`` is the hull of
the non-zero taps (:func:`~.interpolation.axis_taps`, through
:func:`~.interpolation.resize_bounds`) of the output rows that read the image, taken over the
image's kernel *and* the mask's (nearest) kernel.  This hull is the footprint used both here and
by the loader, which cuts exactly this window out of the image before it resamples.  It equals
the set of pixels a sample really reads when, on each axis, the taps leave no holes and the
mask's nearest taps lie inside the image's; the brute-force tests find this for antialiased
bilinear at scales 1/2 to 2 and for upscaling.  Otherwise ``p`` is an upper bound: without
antialias, downscaling by more than 2 skips pixels, and torch's nearest (``floor(o r)``) can read
a mask pixel one before the bilinear taps, so the union of the image's and the mask's footprints
is not a product of intervals.  With these footprints, exactly,

    p(y, x) = (1/G) sum_g  C_g(y, x) / (n_y(g) n_x(g)),

with ``C_g(y, x)`` the number of origins whose footprint meets the region at ``(y, x)``.  For a
``k_h x k_w`` rectangle ``C_g = A_g(y) B_g(x)`` (separable per axis); for a mask,
``C_g = N_g(y) H N'_g(x)^T`` where ``N_g(y)`` counts origins by *which rows of the region's box
their footprint covers* and ``H[(r0, r1), (c0, c1)] = any(mask[r0:r1, c0:c1])`` (summed-area
table).  All placements are evaluated at once; the maximum is located in float64 over
de-duplicated per-axis profiles and confirmed in exact :class:`fractions.Fraction` arithmetic.

Two bounds, both valid: ``p = max_rho E_g[P(hit | g, rho)]`` (the *joint* maximum over
placements of the average, reported as ``fraction``) and the looser
``E_g[max_rho P(hit | g, rho)]`` (``average_of_maxima``, always ``>= fraction``).  (The average
over full ``theta`` of per-``theta`` maxima is 1: useless.)

Tempting mistakes: taking the crop window in resized pixels and dividing by the scale (forgets
the kernel support; antialiased downscaling by ``r`` widens it ``r``-fold); using the mask's
nearest footprint for the image; assuming Theorem 1's central placement is the worst for a
mixture of scales; declaring the region in resized pixels when a ``Resize`` comes first (declare
it in stored pixels); drawing ``theta`` with a modulus that is not a multiple of the number of
choices (biased draws: see :func:`draw_moduli`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, Sequence

import numpy as np

from patchdp_opacus.privacy.geometry import InclusionProbability
from patchdp_opacus.privacy.interpolation import Interpolation, Taps, resize_bounds, taps_at
from patchdp_opacus.privacy.regions import PrivateRegion, Rectangle, as_region

_MODES = ("window", "box")


@dataclass(frozen=True)
class AxisPlan:
    """One axis of one choice ``g``: how output samples map to source samples.

    ``moves="window"`` (resize, then pad, then crop): the whole source axis (``length`` pixels,
    ``box == length``) is resized to ``resized`` samples, padded by ``before``/``after``
    constant samples, and the output is the ``out`` padded samples from the origin ``i``.
    ``moves="box"`` (crop, then resize: RandomResizedCrop): the source samples
    ``[i, i + box)`` are resized to ``resized == out`` samples; no padding."""

    length: int
    box: int
    resized: int
    out: int
    before: int = 0
    after: int = 0
    moves: str = "window"

    def __post_init__(self):
        if self.moves not in _MODES:
            raise ValueError(f"moves must be one of {_MODES}, got {self.moves!r}")
        if min(self.length, self.box, self.resized, self.out) < 1 or min(self.before,
                                                                          self.after) < 0:
            raise ValueError(f"invalid axis plan {self}")
        if self.moves == "box" and (self.resized != self.out or self.before or self.after
                                    or self.box > self.length):
            raise ValueError(f"a box plan resizes a box inside the image to the output: {self}")
        if self.moves == "window" and (self.box != self.length
                                       or self.out > self.before + self.resized + self.after):
            raise ValueError(f"the crop does not fit the padded resized axis: {self}")

    @property
    def num_origins(self) -> int:
        if self.moves == "box":
            return self.length - self.box + 1
        return self.before + self.resized + self.after - self.out + 1

    def output_range(self, origin: int) -> tuple[int, int, int]:
        """``(start, stop, r0)``: outputs ``start <= k < stop`` read resized sample
        ``r0 + k - start``; the others are padding (constant fill)."""
        if self.moves == "box":
            return 0, self.out, 0
        shift = int(origin) - self.before            # resized index of output 0
        start = min(max(-shift, 0), self.out)
        stop = max(min(self.resized - shift, self.out), start)
        return start, stop, shift + start

    def source_offset(self, origin: int) -> int:
        return int(origin) if self.moves == "box" else 0


class Theta(NamedTuple):
    """One draw of a transform's parameters: ``choice`` (index into its choices) and the
    origin ``(origin_y, origin_x)`` among that choice's origins."""

    choice: int
    origin_y: int
    origin_x: int


def origin_footprints(plan: AxisPlan, interps: Sequence[Interpolation],
                      origins=None) -> tuple[np.ndarray, np.ndarray]:
    """Source interval ``[lo, hi)`` read on this axis from each origin (default: all
    ``plan.num_origins``), under any of the kernels ``interps``.  Empty (``lo == hi == 0``)
    when the whole output lies in the padding."""
    i = np.arange(plan.num_origins, dtype=np.int64) if origins is None else \
        np.asarray(origins, dtype=np.int64).reshape(-1)
    lo_r, hi_r = resize_bounds(tuple(interps), plan.box, plan.resized)
    if plan.moves == "box":
        return i + lo_r[0], i + hi_r[-1]
    shift = i - plan.before
    first = np.maximum(shift, 0)
    last = np.minimum(shift + plan.out, plan.resized) - 1
    empty = first > last
    lo = np.where(empty, 0, lo_r[np.clip(first, 0, plan.resized - 1)])
    hi = np.where(empty, 0, hi_r[np.clip(last, 0, plan.resized - 1)])
    return lo, hi


def output_taps(plan: AxisPlan, origin: int, interp: Interpolation) -> tuple[int, int, Taps]:
    """``(start, stop, taps)``: the outputs ``start <= k < stop`` that read the image, and their
    taps in *source* coordinates (the same :func:`~.interpolation.axis_taps`, cached per
    resize, that the footprint is built from)."""
    start, stop, r0 = plan.output_range(origin)
    taps = taps_at(interp, plan.box, plan.resized, np.arange(r0, r0 + stop - start))
    return start, stop, Taps(taps.first + plan.source_offset(origin), taps.weights, taps.count)


# --------------------------------------------------------------------------- counting

def _axis_profile(lo: np.ndarray, hi: np.ndarray, extent: int, length: int, rectangle: bool):
    """Per placement ``y in [0, length - extent]`` of a region of ``extent`` pixels on this
    axis: origins counted by the rows ``[r0, r1)`` of the region's box that their footprint
    ``[lo, hi)`` covers.  Returns ``(N, keys)``: ``N[y, k]`` origins cover key ``k`` (a
    ``(r0, r1)`` pair); for a rectangle one column, "covers any row"."""
    places = length - extent + 1
    keep = lo < hi
    lo, hi = lo[keep], hi[keep]
    if rectangle:   # footprint meets [y, y + extent) iff lo <= y + extent - 1 and hi > y
        y = np.arange(places)
        count = np.searchsorted(np.sort(lo), y + extent - 1, side="right") - \
            np.searchsorted(np.sort(hi), y, side="right")
        return count.astype(np.int64)[:, None], [(0, extent)]
    m = extent
    # full coverage for y in [lo, hi - m]: a difference array
    start, stop = np.clip(lo, 0, places), np.clip(hi - m + 1, 0, places)
    full = np.zeros(places + 1, dtype=np.int64)
    ok = stop > start
    np.add.at(full, start[ok], 1)
    np.add.at(full, stop[ok], -1)
    full = np.cumsum(full[:-1])
    # partial coverage: y in [lo - m + 1, lo - 1] (clipped above by hi - 1) and
    # y in [hi - m + 1, hi - 1] (clipped below by lo); disjoint, together all partial placements
    lo_b, hi_b = np.repeat(lo, m - 1), np.repeat(hi, m - 1)
    d = np.tile(np.arange(m - 1), len(lo))
    y1, y2 = lo_b - m + 1 + d, hi_b - m + 1 + d
    k1, k2 = y1 <= hi_b - 1, y2 >= lo_b
    ys = np.concatenate([y1[k1], y2[k2]])
    los = np.concatenate([lo_b[k1], lo_b[k2]])
    his = np.concatenate([hi_b[k1], hi_b[k2]])
    inside = (ys >= 0) & (ys < places)
    ys, los, his = ys[inside], los[inside], his[inside]
    key = np.maximum(los - ys, 0) * (m + 1) + np.minimum(his - ys, m)
    used = np.unique(np.concatenate([key, [m] if full.any() else []]).astype(np.int64))
    col = np.searchsorted(used, key)
    n = np.bincount(ys * len(used) + col, minlength=places * len(used)).reshape(places, -1)
    if full.any():
        n[:, np.searchsorted(used, m)] += full
    return n.astype(np.int64), [(int(k) // (m + 1), int(k) % (m + 1)) for k in used]


def _hit_table(mask: np.ndarray, row_keys, col_keys) -> np.ndarray:
    """``H[a, b] = any(mask[r0:r1, c0:c1])`` for row key ``a = (r0, r1)``, col key ``b``."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    r0, r1 = (np.array([k[j] for k in row_keys])[:, None] for j in (0, 1))
    c0, c1 = (np.array([k[j] for k in col_keys])[None, :] for j in (0, 1))
    return ((sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]) > 0).astype(np.int64)


@dataclass(frozen=True, eq=False)
class _ChoiceCounts:
    """``C_g(y, x) = Y[y] @ H @ X[x]`` origins of choice ``g`` hit the region; ``n`` origins."""

    Y: np.ndarray
    X: np.ndarray
    H: np.ndarray
    n: int

    def at(self, y, x) -> int:
        return int(self.Y[y] @ self.H @ self.X[x])


def _choice_counts(plans, interps, image_size, region: PrivateRegion) -> list[_ChoiceCounts]:
    mask = region.mask()
    (mh, mw), (h, w) = mask.shape, image_size
    if mh > h or mw > w:
        raise ValueError(f"private region {mh}x{mw} (height x width) does not fit in image "
                         f"{h}x{w}; use a smaller private region or check image_size")
    rectangle = isinstance(region, Rectangle)
    out = []
    for plan_y, plan_x in plans:
        ny, ky = _axis_profile(*origin_footprints(plan_y, interps), mh, h, rectangle)
        nx, kx = _axis_profile(*origin_footprints(plan_x, interps), mw, w, rectangle)
        table = np.ones((1, 1), np.int64) if rectangle else _hit_table(mask, ky, kx)
        out.append(_ChoiceCounts(ny, nx, table, plan_y.num_origins * plan_x.num_origins))
    return out


@dataclass(frozen=True)
class FootprintInclusion(InclusionProbability):
    """``p`` of a geometric transform: ``fraction`` is the joint worst case (exact),
    ``placement`` the region's top-left ``(y, x)`` in *stored-image* pixels where it is
    attained, ``average_of_maxima`` the looser bound ``E_g[max_rho P(hit | g)]``."""

    average_of_maxima: Fraction = Fraction(1)


def _worst(counts: list[_ChoiceCounts], image_size) -> FootprintInclusion:
    g = len(counts)
    _, iy = np.unique(np.concatenate([c.Y for c in counts], axis=1), axis=0, return_index=True)
    _, ix = np.unique(np.concatenate([c.X for c in counts], axis=1), axis=0, return_index=True)
    total = np.zeros((len(iy), len(ix)))
    loose = Fraction(0)
    for c in counts:
        hits = (c.Y[iy].astype(float) @ c.H.astype(float)) @ c.X[ix].astype(float).T  # exact ints
        total += hits / (g * c.n)
        loose += Fraction(int(round(hits.max())), g * c.n)
    candidates = np.argwhere(total >= total.max() * (1 - 1e-9))
    best, where = None, None
    for a, b in candidates:
        value = sum((Fraction(c.at(iy[a], ix[b]), g * c.n) for c in counts), Fraction(0))
        if best is None or value > best or (value == best and (iy[a], ix[b]) < where):
            best, where = value, (int(iy[a]), int(ix[b]))
    return FootprintInclusion(best, tuple(image_size), where, loose)


def inclusion_from_plans(plans_by_size: dict, interps: Sequence[Interpolation],
                         region) -> FootprintInclusion:
    """Worst-case ``p`` over image sizes; ``plans_by_size`` maps each ``(H, W)`` to its
    choices' ``(plan_y, plan_x)``, drawn uniformly.  Exact fractions."""
    region = as_region(region)
    worst = None
    for size, plans in sorted(plans_by_size.items()):
        cur = _worst(_choice_counts(plans, tuple(interps), size, region), size)
        if worst is None or cur.fraction > worst.fraction:
            worst = cur
    return worst


def placement_probabilities(plans, interps: Sequence[Interpolation], image_size,
                            region) -> np.ndarray:
    """Exact ``p(y, x)`` for *every* placement (object array of Fractions, shape
    ``(H - m_h + 1, W - m_w + 1)``, stored-image coordinates).  Quadratic in the image size:
    for tests and small images."""
    counts = _choice_counts(plans, tuple(interps), tuple(image_size), as_region(region))
    out = np.zeros((counts[0].Y.shape[0], counts[0].X.shape[0]), dtype=object)
    out[...] = Fraction(0)
    for c in counts:
        hits = np.rint((c.Y.astype(float) @ c.H.astype(float)) @ c.X.astype(float).T)
        out = out + hits.astype(np.int64).astype(object) * Fraction(1, len(counts) * c.n)
    return out


# --------------------------------------------------------------------------- drawing theta

def draw_moduli(plans_by_size: dict) -> tuple[int, int, int]:
    """``(M_g, M_y, M_x)``: ranges of the three uniform integer draws ``(u_g, u_y, u_x)`` from
    which :func:`theta_from_draws` takes ``theta``: ``M_g = G`` and ``M_y`` (``M_x``) the lcm of
    the origin counts of every choice and declared size, so that ``u mod n`` is exactly uniform
    whatever ``g`` and the size are.  Python ints, possibly ``> 2**62`` (a sampler that caps a
    modulus at ``M`` biases each origin by at most ``n / M`` in total variation)."""
    choices = {len(plans) for plans in plans_by_size.values()}
    if len(choices) != 1:  # pragma: no cover - every transform has a size-independent G
        raise ValueError("the number of choices must not depend on the image size")
    my = math.lcm(*(py.num_origins for plans in plans_by_size.values() for py, _ in plans))
    mx = math.lcm(*(px.num_origins for plans in plans_by_size.values() for _, px in plans))
    return choices.pop(), my, mx


def theta_from_draws(plans, draws) -> Theta:
    """``theta = (u_g mod G, u_y mod n_y(g), u_x mod n_x(g))`` for the draws
    ``(u_g, u_y, u_x)`` (uniform on ``[0, M)`` with the moduli of :func:`draw_moduli`)."""
    u_g, u_y, u_x = (int(u) for u in draws)
    if min(u_g, u_y, u_x) < 0:
        raise ValueError(f"draws must be non-negative integers, got {tuple(draws)}")
    g = u_g % len(plans)
    plan_y, plan_x = plans[g]
    return Theta(g, u_y % plan_y.num_origins, u_x % plan_x.num_origins)
