"""The neighbour-pair audit: does the real pipeline keep what the accountant assumes?

Theorem 2 rests on one property of the data pipeline (the user's dataset transforms, the
loader's crop, the post-crop stage and the collate): *two images that differ only inside the
private region R, pushed through the pipeline with the same random draws, give identical
training samples unless the crop touches R* -- which happens with probability at most ``p``.
The transform inspection (:mod:`patchdp_opacus.plugin.transforms`) checks this property on
paper; this module checks it on the running code, including whatever ``__getitem__`` does that
no inspection can see.

The loader's geometry may be a fixed-size crop or a loader-owned resampling transform (random
scale + crop, RandomResizedCrop, resize: :mod:`patchdp_opacus.privacy.geometric`); the audit
treats both through the transform interface: parameters ``theta`` drawn as the loader draws
them, the *footprint* ``F(theta)`` (for a crop, its window) and ``p``, all from the functions the
accountant uses.

For ``trials`` draws of the loader's token (uniform, as the loader draws them: a crop origin,
or a transform's choice and origin) and of a seed, the audit builds a neighbour pair -- a random
image A of the dataset's raw shape and dtype, and B equal to A except inside R (every value
changed), R at the placement where ``p`` is attained -- injects each in turn as the raw image
of one record, runs the loader's cropping dataset (user transforms, crop or resampling,
post-crop stage) with every random generator reset to the trial's seed, and collates the sample
with a few other records.  It reports:

* ``differing``: trials whose outputs differ.  Its Clopper-Pearson interval must not lie above
  the claimed ``p`` (a lower confidence bound above ``p`` refutes the claim);
* ``outside``: trials whose footprint ``F(theta)`` misses R *and* its mirror images (flips are
  allowed before the crop) but whose outputs still differ -- each one is a definite violation
  (a transform that reads the whole image, moves R, or spreads it by interpolation, or a
  footprint smaller than what is read);
* ``footprint_errors``: trials where the loader's resampling refused to read outside the
  footprint window (:class:`~patchdp_opacus.plugin.resample.FootprintError`: the transform's
  footprint, hence its ``p``, is too small for its own kernels);
* ``leaks_to_other_samples``: trials where a change in one sample changed another row of the
  collated batch (a sample-mixing collate);
* ``origin_uniformity``: chi-square p-values of the parameters the loader's sampler draws
  (``choice`` when the transform has several, origins per axis pooled over choices).

With Gaussian-noise augmentation in the spec both neighbours of a trial get the same noise
seed (as they get the same draws): the noise is then identical and the pair still differs
only where the footprint meets R.  The audit checks the crop's claim ``p``; the noise's own
claim (``TV``) is a property of the noise's law, tested on the loader's samples directly.

The verdict passes when the rate is not refuted and all violation counts are zero.  The
random-generator reset covers Python's ``random``, numpy's and torch's global generators and
every albumentations ``Compose`` reachable from the dataset or the post-crop stage; a
transform with another private generator makes the pair differ by chance and fails the audit
(a false alarm, never a false pass).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from scipy import stats

from patchdp_opacus.plugin.crop import (
    CroppingDataset,
    choice_modulus,
    fixed_crop_of,
    image_size_of,
    make_token,
    sample_image,
    token_moduli,
    token_theta,
)
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.plugin.resample import FootprintError
from patchdp_opacus.plugin.sampler import FixedSizeBatchSampler, TransformToken
from patchdp_opacus.privacy.geometry import inclusion_probability

logger = logging.getLogger(__name__)

__all__ = ["AuditError", "AuditReport", "audit_loader", "audit_pipeline", "audit_training_steps",
           "clopper_pearson", "inject_raw_image"]


class AuditError(RuntimeError):
    """The audit cannot run on this pipeline (and says what to provide)."""


@dataclasses.dataclass
class AuditReport:
    """Outcome of :func:`audit_loader` (JSON-able through :meth:`as_dict`)."""

    trials: int
    differing: int
    claimed_p: float
    p_at_audited_size: float
    ci_low: float
    ci_high: float
    confidence: float
    outside: int
    leaks_to_other_samples: int
    origin_uniformity: dict
    image_size: tuple
    placement: tuple
    notes: list = dataclasses.field(default_factory=list)
    footprint_errors: int = 0

    @property
    def rate(self) -> float:
        return self.differing / self.trials if self.trials else math.nan

    @property
    def refuted(self) -> bool:
        """The lower confidence bound of the differing rate lies above the claimed ``p``."""
        return self.ci_low > self.claimed_p

    @property
    def uniform(self) -> bool:
        return all(v >= 1e-3 for v in self.origin_uniformity.values())

    @property
    def passed(self) -> bool:
        return not self.refuted and self.outside == 0 and self.leaks_to_other_samples == 0 \
            and self.footprint_errors == 0 and self.uniform

    def reasons(self) -> list[str]:
        out = []
        if self.outside:
            out.append(f"{self.outside} trial(s) whose crop missed the private region (and its "
                       f"mirror images) still changed the output: something before the crop "
                       f"reads or moves pixels beyond the region (whole-image statistics, "
                       f"warps, interpolation), or the footprint is smaller than what is read")
        if self.footprint_errors:
            out.append(f"{self.footprint_errors} trial(s) where the loader's resampling would "
                       f"have read outside the footprint the accountant's p is computed from: "
                       f"the transform's footprint is too small for its kernels")
        if self.leaks_to_other_samples:
            out.append(f"{self.leaks_to_other_samples} trial(s) where changing one sample changed "
                       f"other samples of the batch: the collate or a batch-level step mixes "
                       f"samples")
        if self.refuted:
            out.append(f"differing rate {self.rate:.4g} (CI {self.ci_low:.4g}-{self.ci_high:.4g}) "
                       f"lies above the claimed p = {self.claimed_p:.4g}")
        if not self.uniform:
            out.append(f"crop origins are not uniform (chi-square p-values "
                       f"{self.origin_uniformity})")
        return out

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(rate=self.rate, refuted=self.refuted, passed=self.passed,
                 verdict="pass" if self.passed else "fail", reasons=self.reasons())
        return d

    def table(self) -> str:
        """A plain-text verdict table."""
        rows = [
            ("trials", f"{self.trials}"),
            ("image size audited (H, W)", f"{tuple(self.image_size)}"),
            ("region placement (stored-image y, x)", f"{tuple(self.placement)}"),
            ("claimed p (worst case over sizes)", f"{self.claimed_p:.6g}"),
            ("p at the audited size", f"{self.p_at_audited_size:.6g}"),
            ("outputs differing", f"{self.differing} ({self.rate:.4g})"),
            (f"{self.confidence:.1%} Clopper-Pearson interval",
             f"[{self.ci_low:.4g}, {self.ci_high:.4g}]"),
            ("differing although the crop missed R", f"{self.outside}"),
            ("resampling outside the footprint", f"{self.footprint_errors}"),
            ("other samples of the batch changed", f"{self.leaks_to_other_samples}"),
            ("parameter uniformity (chi-square p)",
             ", ".join(f"{k} {v:.3g}" for k, v in self.origin_uniformity.items())),
            ("verdict", "PASS" if self.passed else "FAIL"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"  - {r}" for r in self.reasons()] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial rate ``k / n``."""
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


# --- injecting the neighbour images ----------------------------------------------------------
def _base_dataset(dataset, index: int):
    """Follow ``Subset``/wrappers down to the dataset that decodes images; the index there."""
    while True:
        if type(dataset).__name__ == "Subset" and hasattr(dataset, "indices"):
            index, dataset = int(dataset.indices[index]), dataset.dataset
            continue
        if _can_inject(dataset):
            return dataset, index
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return dataset, index
        dataset = inner


#: Methods that decode one record without its transform, by the package's data sets:
#: segmentation ``_load(index) -> (image, mask)``, classification ``_load_image(index) ->
#: image``.
RAW_LOADERS = ("_load", "_load_image")


def _raw_loader(dataset) -> str | None:
    return next((name for name in RAW_LOADERS if callable(getattr(dataset, name, None))), None)


def _can_inject(dataset) -> bool:
    return _raw_loader(dataset) is not None or callable(getattr(dataset, "loader", None))


@contextlib.contextmanager
def inject_raw_image(dataset, index: int, image) -> Iterator[None]:
    """While active, record ``index`` of ``dataset`` decodes to ``image`` (its label/mask is
    kept).  Supported: the package's datasets (:data:`RAW_LOADERS`) and torchvision folder
    datasets (``loader(path) -> image``); the override is an instance attribute, removed on
    exit."""
    base, i = _base_dataset(dataset, index)
    name = _raw_loader(base)
    if name is not None:
        original, own = getattr(base, name), name in vars(base)

        def load(j):
            raw = original(j)
            if j != i:
                return raw
            return (image, *raw[1:]) if isinstance(raw, tuple) else image

        setattr(base, name, load)
        try:
            yield
        finally:
            if own:
                setattr(base, name, original)
            else:
                delattr(base, name)
        return
    if callable(getattr(base, "loader", None)):
        original = base.loader
        path = base.samples[i][0] if hasattr(base, "samples") else None

        def loader(p):
            return image if p == path else original(p)

        base.loader = loader
        try:
            yield
        finally:
            base.loader = original
        return
    raise AuditError(
        f"cannot inject neighbour images into {type(base).__name__}: the audit needs a "
        f"`_load(index) -> (image, mask)` or `_load_image(index) -> image` method (as the "
        f"package's datasets have) or a torchvision-style `loader(path)` attribute; give your "
        f"dataset one of them")


def _raw_image(dataset, index: int):
    base, i = _base_dataset(dataset, index)
    name = _raw_loader(base)
    if name is not None:
        raw = getattr(base, name)(i)
        return raw[0] if isinstance(raw, tuple) else raw
    if callable(getattr(base, "loader", None)) and hasattr(base, "samples"):
        return base.loader(base.samples[i][0])
    raise AuditError(f"cannot read the raw image of {type(base).__name__} (see "
                     f"inject_raw_image)")


def _neighbours(raw, region_box: np.ndarray, rng: np.random.Generator):
    """A random image shaped like ``raw`` and its neighbour, different exactly on ``region_box``
    (boolean H x W in raw pixels)."""
    from PIL import Image

    if isinstance(raw, Image.Image):
        arr = np.asarray(raw)
        a, b = _neighbour_arrays(arr, region_box, rng, channels_last=True)
        return Image.fromarray(a, mode=raw.mode), Image.fromarray(b, mode=raw.mode)
    if isinstance(raw, torch.Tensor):
        a, b = _neighbour_arrays(raw.numpy(), region_box, rng, channels_last=False)
        return torch.from_numpy(a), torch.from_numpy(b)
    if isinstance(raw, np.ndarray):
        return _neighbour_arrays(raw, region_box, rng, channels_last=True)
    raise AuditError(f"cannot build neighbour images like a raw {type(raw).__name__}")


def _neighbour_arrays(arr: np.ndarray, region: np.ndarray, rng, *, channels_last: bool):
    """A random like ``arr``; inside the region A takes the lower half of the value range and B
    = A + half: every value differs, all in the same direction, so that statistics of the whole
    image (a mean, a histogram) move as much as a region of this size can move them."""
    sel = _spatial_index(region, arr.ndim, channels_last)
    if np.issubdtype(arr.dtype, np.integer):
        half = (min(int(np.iinfo(arr.dtype).max), 255) + 1) // 2
        a = rng.integers(0, 2 * half, arr.shape).astype(arr.dtype)
        a[sel] = a[sel] % half
        b = a.copy()
        b[sel] = a[sel] + half
    else:
        a = rng.random(arr.shape).astype(arr.dtype)
        a[sel] = a[sel] / 2
        b = a.copy()
        b[sel] = a[sel] + 0.5
    return a, b


def _spatial_index(region: np.ndarray, ndim: int, channels_last: bool):
    if ndim == 2 or channels_last:
        return region
    return (slice(None), *np.nonzero(region))  # (C, H, W) tensors


# --- resetting every random generator ------------------------------------------------------
def _albumentations_composes(*roots) -> list:
    found, seen = [], set()

    def visit(obj, depth=0):
        if id(obj) in seen or depth > 6 or obj is None:
            return
        seen.add(id(obj))
        if type(obj).__module__.startswith("albumentations") and hasattr(obj, "set_random_seed"):
            found.append(obj)
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(
            obj, (list, tuple)) else getattr(obj, "__dict__", {}).values()
        for v in values:
            if isinstance(v, (dict, list, tuple)) or hasattr(v, "__dict__"):
                visit(v, depth + 1)

    for root in roots:
        visit(root)
    return found


def _reset_rngs(seed: int, composes) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    for compose in composes:
        compose.set_random_seed(seed)


# --- comparing outputs -----------------------------------------------------------------------
def _leaves(x) -> list:
    from PIL import Image

    if isinstance(x, dict):
        return [leaf for k in sorted(x, key=str) for leaf in _leaves(x[k])]
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    if isinstance(x, Image.Image):
        return [np.asarray(x)]
    if isinstance(x, torch.Tensor):
        return [x.detach().cpu()]
    return [x]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    for u, v in zip(la, lb):
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if not (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)
                    and u.shape == v.shape and torch.equal(u, v)):
                return False
        elif isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
            if not np.array_equal(u, v):
                return False
        elif u != v:
            return False
    return True


def _rows_changed(a, b, skip_row: int) -> bool:
    """Does any row other than ``skip_row`` of the collated batches differ?"""
    for u, v in zip(_leaves(a), _leaves(b)):
        if isinstance(u, np.ndarray):
            u, v = torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(
                np.ascontiguousarray(v))
        if not isinstance(u, torch.Tensor) or u.ndim == 0:
            if not _same(u, v):
                return True
            continue
        if u.shape != v.shape:
            return True
        keep = [r for r in range(u.shape[0]) if r != skip_row]
        if keep and not torch.equal(u[keep], v[keep]):
            return True
    return False


# --- the audit --------------------------------------------------------------------------------
def _region_and_mirrors(mask: np.ndarray, size, placement, mirrors: bool) -> np.ndarray:
    """The region (stored-image coordinates) and, with ``mirrors``, its mirror images, as a
    boolean H x W."""
    h, w = size
    out = np.zeros((h, w), dtype=bool)
    y, x = placement
    out[y:y + mask.shape[0], x:x + mask.shape[1]] |= mask
    return _mirrored(out) if mirrors else out


def _mirrored(region: np.ndarray) -> np.ndarray:
    return region | region[::-1, :] | region[:, ::-1] | region[::-1, ::-1]


def _p_at(spec, size):
    """``(p, placement)`` at one image size, placement in stored-image pixels: Lemma 1 for a
    crop (the accountant's formula), the footprint analysis for a transform."""
    geometry = fixed_crop_of(spec.crop)
    if geometry is not None:
        inc = inclusion_probability(geometry, size, spec.region)
        top, _, left, _ = geometry.pad_offsets(size)
        return inc.value, (inc.placement[0] - top, inc.placement[1] - left)
    inc = spec.transform.inclusion_probability([size], spec.region)
    return inc.value, tuple(inc.placement)


def _inner_preimage(start: int, length: int, scale: float) -> slice:
    """Raw pixels ``r`` whose extent ``[r / scale, (r + 1) / scale)`` in resized pixels lies in
    ``[start, start + length)`` (``scale`` = raw / resized size)."""
    return slice(math.ceil(start * scale - 1e-9), math.floor((start + length) * scale + 1e-9))


def _binned_chisquare(groups) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of several uniform histograms (``(counts
    over n values)`` per group), each binned into at most 32 contiguous bins with exact expected
    counts; independent groups add up."""
    stat, dof = 0.0, 0
    for counts in groups:
        n, total = len(counts), counts.sum()
        if n < 2 or total == 0:
            continue
        edges = np.floor(np.arange(min(n, 32) + 1) * n / min(n, 32)).astype(int)
        observed = np.add.reduceat(counts, edges[:-1])
        expected = total * np.diff(edges) / n
        stat += float(((observed - expected) ** 2 / expected).sum())
        dof += len(observed) - 1
    return stat, dof


def _origin_uniformity(sampler, spec, size, draws: int) -> dict:
    """Chi-square p-values of the parameters the loader's own sampler draws (a copy of it, its
    state untouched): ``choice`` over the transform's choices (when there are several), ``y``
    and ``x`` the origins per axis, pooled over choices."""
    probe = copy.copy(sampler)  # the loader's own sampler class and moduli, its state untouched
    if sampler.generator is not None:
        probe.generator = torch.Generator()
        probe.generator.set_state(sampler.generator.get_state())
    plans = spec.transform.plans(size)
    choices = np.zeros(len(plans), dtype=np.int64)
    axes = [[np.zeros(p[a].num_origins, dtype=np.int64) for p in plans] for a in (0, 1)]
    for _ in range(max(1, draws // sampler.global_batch_size)):
        for token in probe.draw_global_batch():
            draws_ = token.draws if isinstance(token, TransformToken) else tuple(token)[1:]
            g, i, j = token_theta(spec.crop, size, draws_)
            choices[g] += 1
            axes[0][g][i] += 1
            axes[1][g][j] += 1
    out = {}
    if len(plans) > 1:
        out["choice"] = float(stats.chisquare(choices).pvalue)
    for name, groups in zip(("y", "x"), axes):
        stat, dof = _binned_chisquare(groups)
        out[name] = 1.0 if dof == 0 else float(stats.chi2.sf(stat, dof))
    return out


def audit_loader(loader: CropDPDataLoader, *, trials: int = 2000, confidence: float = 0.999,
                 index: int = 0, batch: int = 4, seed: int = 0,
                 inject: Optional[Callable[[Any, int, Any], Any]] = None,
                 origin_draws: int = 5000, mirrors: bool = True) -> AuditReport:
    """Run the neighbour-pair audit on ``loader`` (see the module docstring).

    Args:
        loader: the :class:`CropDPDataLoader` to audit (its dataset, crop or transform,
            post-crop stage and collate are used as they are; its own random state is not
            touched).
        trials: neighbour pairs (parameter draws); the test's power grows with
            ``sqrt(trials)``.
        confidence: of the Clopper-Pearson interval.
        index: the record whose raw image is replaced by the neighbours.
        batch: samples per collated batch (the record plus ``batch - 1`` others).
        seed: seeds the audit's own draws (origins, images, per-trial generator seeds).
        inject: ``inject(dataset, index, image)`` returning a context manager that makes
            ``dataset[index]`` decode to ``image``; default :func:`inject_raw_image`.
        origin_draws: parameter draws of the loader's sampler for the uniformity test.
        mirrors: count a footprint that meets the region's mirror images as a hit (flips
            before the loader's crop are allowed).  ``False`` for a pipeline that does not
            flip: the definite-violation test is then exact to the pixel (with mirrors, a
            region near the image centre lies within about a pixel of its own mirror images,
            so a leak of one pixel can hide there -- the rate test still sees it).
    """
    if not isinstance(loader, CropDPDataLoader):
        raise AuditError(f"audit_loader needs a CropDPDataLoader, got {type(loader).__name__}")
    return _audit(loader.dataset, loader.collate_fn, loader.batch_sampler, trials=trials,
                  confidence=confidence, index=index, batch=batch, seed=seed, inject=inject,
                  origin_draws=origin_draws, mirrors=mirrors)


def audit_pipeline(dataset, spec, *, post_crop_transform=None, collate_fn=None,
                   batch_size: int = 4, **kwargs) -> AuditReport:
    """The audit of :func:`audit_loader` for a pipeline that no loader was (or could be) built
    from -- e.g. one the transform inspection refuses, to see what the refusal is about.  The
    dataset is cropped by the loader's own cropping code and origins are drawn by a fresh
    OS-seeded sampler of the loader's class; nothing is inspected, and a loader built from the
    same pipeline would still be refused.  ``kwargs`` as :func:`audit_loader`."""
    from torch.utils.data import default_collate

    cropping = CroppingDataset(dataset, spec, post_crop_transform=post_crop_transform)
    sampler = FixedSizeBatchSampler(len(dataset), min(batch_size, len(dataset)),
                                    origin_moduli=token_moduli(spec.crop, spec.image_sizes),
                                    choice_modulus=choice_modulus(spec.crop, spec.image_sizes))
    return _audit(cropping, collate_fn or default_collate, sampler, **kwargs)


def _audit(cropping, collate, sampler, *, trials: int = 2000, confidence: float = 0.999,
           index: int = 0, batch: int = 4, seed: int = 0, inject=None,
           origin_draws: int = 5000, mirrors: bool = True) -> AuditReport:
    dataset, spec = cropping.dataset, cropping.spec
    transform = spec.transform
    inject = inject or inject_raw_image
    rng = np.random.default_rng(seed)
    draw_rng = random.Random(seed)  # exact draws of any size (moduli may exceed 2**63)
    size = image_size_of(sample_image(dataset[index]))
    raw = _raw_image(dataset, index)
    raw_size = image_size_of(raw)
    mask = spec.region.mask()
    p_at_size, placement = _p_at(spec, size)
    notes = []
    region_raw = np.zeros(raw_size, dtype=bool)
    y0, x0 = placement
    if raw_size == size:
        region_raw[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
        region = _region_and_mirrors(mask, size, placement, mirrors)
    else:  # a resize before the crop: change the raw pixels whose extent lies in the region
        rows = _inner_preimage(y0, mask.shape[0], raw_size[0] / size[0])
        cols = _inner_preimage(x0, mask.shape[1], raw_size[1] / size[1])
        if rows.start >= rows.stop or cols.start >= cols.stop:
            raise AuditError(f"the private region {mask.shape} (in the {size} pixels the crop "
                             f"sees) covers no whole raw pixel of the {raw_size} raw images")
        region_raw[rows, cols] = True
        notes.append(f"raw images are {raw_size}, the crop sees {size}: the raw pixels inside "
                     f"the region's box were changed, and the 'missed' test allows one pixel "
                     f"of resampling slack around it")
        region = np.zeros(size, dtype=bool)
        region[max(y0 - 1, 0):y0 + mask.shape[0] + 1,
               max(x0 - 1, 0):x0 + mask.shape[1] + 1] = True
        region = _mirrored(region) if mirrors else region
    composes = _albumentations_composes(dataset, cropping.post_crop_transform)
    choices = choice_modulus(spec.crop, spec.image_sizes)
    moduli = ((choices,) if choices is not None else ()) + \
        tuple(token_moduli(spec.crop, spec.image_sizes))

    def draw():
        return tuple(draw_rng.randrange(m) for m in moduli)

    def noise_seed():  # Gaussian augmentation: the same seed for both neighbours of a trial
        return None if spec.augmentation is None else draw_rng.randrange(2**62)

    others = [i for i in range(len(dataset)) if i != index][:max(batch - 1, 0)]
    differing = outside = leaks = footprint_errors = 0
    img_a, img_b = _neighbours(raw, region_raw, rng)
    for t in range(trials):
        draws = draw()
        trial_seed = int(rng.integers(2**31))
        other_tokens = [make_token(spec.crop, o, draw(), noise_seed()) for o in others]
        token = make_token(spec.crop, index, draws, noise_seed())
        outputs = []
        try:
            for image in (img_a, img_b):
                with inject(dataset, index, image):
                    _reset_rngs(trial_seed, composes)
                    sample = cropping[token]
                    rest = [cropping[tok] for tok in other_tokens]
                outputs.append((sample, collate([sample, *rest]) if others else None))
        except FootprintError:
            footprint_errors += 1
            continue
        (sa, ba), (sb, bb) = outputs
        # the footprint of the theta this sample was resampled with, by the accountant's function
        window = transform.footprint(size, token_theta(spec.crop, size, draws))
        hit = window is not None and bool(
            region[window[0][0]:window[0][1], window[1][0]:window[1][1]].any())
        if not _same(sa, sb):
            differing += 1
            if not hit:
                outside += 1
        if ba is not None and _rows_changed(ba, bb, 0):
            leaks += 1
    low, high = clopper_pearson(differing, trials, confidence)
    report = AuditReport(
        trials=trials, differing=differing, claimed_p=spec.inclusion_probability,
        p_at_audited_size=p_at_size, ci_low=low, ci_high=high, confidence=confidence,
        outside=outside, leaks_to_other_samples=leaks,
        origin_uniformity=_origin_uniformity(sampler, spec, size, origin_draws), image_size=size,
        placement=tuple(placement), notes=notes, footprint_errors=footprint_errors)
    logger.info("audit: %s", report.as_dict())
    return report


def audit_training_steps(engine, model, optimizer, loader, loss_fn: Callable, *,
                         steps: int = 3, max_physical_batch_size: Optional[int] = None) -> dict:
    """Train ``steps`` logical steps the way the README's loop does (``BatchMemoryManager``
    when ``max_physical_batch_size`` is given) and compare what the loader drew with what the
    accountant charged: ``logical_batches`` drawn by the sampler, ``noisy_steps`` (optimizer
    steps that were not skipped), ``accountant_steps``.  ``loss_fn(model, batch)`` returns the
    loss of one physical batch.  ``passed`` when all three agree."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    sampler = loader.batch_sampler
    first_id, before = sampler.last_batch_id, len(engine.accountant)
    noisy = 0
    model.train()
    for _ in range(steps):  # passes over the loader (an epoch may be shorter than `steps`)
        context = (BatchMemoryManager(data_loader=loader, optimizer=optimizer,
                                      max_physical_batch_size=max_physical_batch_size)
                   if max_physical_batch_size else contextlib.nullcontext(loader))
        with context as batches:
            for batch in batches:
                optimizer.zero_grad()
                loss_fn(model, batch).backward()
                optimizer.step()
                noisy += not optimizer._is_last_step_skipped
                if noisy >= steps:
                    break
        if noisy >= steps:
            break
    drawn = sampler.last_batch_id - first_id
    result = {"logical_batches": drawn, "noisy_steps": noisy,
              "accountant_steps": len(engine.accountant) - before}
    result["passed"] = drawn >= noisy == result["accountant_steps"] == steps
    return result

