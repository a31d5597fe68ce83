"""Applying a loader-owned geometric transform to one sample, from exactly its footprint.

For a parameter draw ``theta`` of a :class:`~patchdp_opacus.privacy.geometric.GeometricTransform`
(:class:`~patchdp_opacus.privacy.geometric.RandomScaleCrop`, ``RandomResizedCrop``, ``Resize``,
``FixedCrop``), :func:`resample`

1. asks the privacy layer for the footprint window ``((y0, y1), (x0, x1))`` of ``theta`` — the
   window the accountant's ``p`` is computed from — and cuts it out of the image.  This slice
   is the only read of the input: the output cannot depend on any pixel outside it;
2. resamples from the cut window only, with the taps of
   :func:`patchdp_opacus.privacy.interpolation.axis_taps` (the function the footprint is built
   from).  Every non-zero tap is checked to lie inside the window; a footprint that were too
   small would raise here instead of reading past it;
3. fills the outputs that fall into the padding with a constant: ``0`` for images (after the
   user's transforms, so after ``Normalize`` a zero is the mean colour), the ignore index
   (``255``) for masks, which are always resampled with nearest (labels are never blended).

Result = ``torchvision.transforms.v2.functional.resize`` of the whole image to the transform's
resized size, constant padding, crop (or ``resized_crop`` for RandomResizedCrop), up to float
rounding (tests compare them).  Images: tensors ``[..., H, W]`` (any leading dims), numpy
``H x W`` / ``H x W x C``, or PIL images.  Float images are resampled in their dtype (half
precision in float32); integer images in float32, then rounded and clamped to the dtype's
range, as torchvision does for uint8.

PIL images are converted explicitly, with one rule: ``np.asarray(image)`` is resampled with
*torch's* kernels (not PIL's own ``resize``, whose antialiased kernels differ slightly) and
turned back into an image of the same mode (palette ``P`` / ``PA`` images keep their palette).
Modes without a faithful array round trip (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) are
refused, and so are palette images resampled with a blending kernel (a blend of palette
indices is not a colour): convert them in the dataset's transform.  Masks are nearest, so any
mask mode works.

Drawing ``theta``: :meth:`~patchdp_opacus.privacy.geometric.GeometricTransform.draw_moduli`
gives the ranges ``(M_g, M_y, M_x)`` of three uniform integers ``(u_g, u_y, u_x)``;
``theta_from_draws`` reduces them modulo the number of choices and of origins.  Because each
``M`` is a multiple of every count it is reduced by (their lcm over the declared image sizes
and choices), ``theta`` is *exactly* uniform over the declared grid.  :func:`draw_uniforms`
draws such integers from a ``torch.Generator`` (exact rejection sampling, also for moduli above
``2**62``) or from the OS CSPRNG.
"""

from __future__ import annotations


import numpy as np
import torch

from patchdp_opacus.plugin.sampler import draw_uniforms
from patchdp_opacus.privacy.footprint import Theta, output_taps
from patchdp_opacus.privacy.geometric import GeometricTransform, as_transform
from patchdp_opacus.privacy.interpolation import NEAREST, Taps

try:  # PIL is a torchvision dependency; keep the module importable without it
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

DEFAULT_IGNORE_INDEX = 255
__all__ = ["FootprintError", "resample", "resample_sample", "draw_uniforms", "draw_theta"]


class FootprintError(RuntimeError):
    """Resampling would read a source pixel outside the footprint window the accountant's
    ``p`` is computed from (the transform's footprint and its kernels disagree)."""


def _is_pil(x) -> bool:
    return _PILImage is not None and isinstance(x, _PILImage.Image)


def _spatial_size(x) -> tuple[int, int]:
    if isinstance(x, torch.Tensor):
        if x.ndim < 2:
            raise ValueError(f"expected a tensor [..., H, W], got shape {tuple(x.shape)}")
        return int(x.shape[-2]), int(x.shape[-1])
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3):
            raise ValueError(f"expected an array H x W or H x W x C, got shape {x.shape}")
        return int(x.shape[0]), int(x.shape[1])
    if _is_pil(x):
        return int(x.size[1]), int(x.size[0])
    raise TypeError(f"cannot resample a {type(x).__name__}: expected a torch tensor [..., H, W], "
                    f"a numpy array H x W (x C) or a PIL image")


def _local(taps: Taps, lo: int, hi: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tap indices relative to the window ``[lo, hi)`` (zero-weight padding columns point
    inside it) and their weights; raises if a tap lies outside the window."""
    if len(taps) and (taps.first.min() < lo or taps.last.max() >= hi):
        raise FootprintError(
            f"resampling taps read source samples {taps.first.min()}..{taps.last.max()} outside "
            f"the footprint window [{lo}, {hi}): the footprint and the resampling disagree")
    width = taps.weights.shape[1]
    idx = np.minimum(taps.first[:, None] - lo + np.arange(width), hi - lo - 1)
    return (torch.as_tensor(idx, dtype=torch.long, device=device),
            torch.as_tensor(taps.weights, dtype=torch.float64, device=device))


def _is_gather(weights: torch.Tensor) -> bool:
    return weights.shape[1] == 1 and bool((weights == 1).all())


def _axis(t: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    if _is_gather(w):
        return t.index_select(dim, idx[:, 0])
    w = w.to(t.dtype)
    out = None
    for k in range(idx.shape[1]):
        weight = w[:, k].view(-1, 1) if dim == -2 else w[:, k]
        term = t.index_select(dim, idx[:, k]) * weight
        out = term if out is None else out + term
    return out


def _resample_window(cut: torch.Tensor, iy, wy, ix, wx) -> torch.Tensor:
    if _is_gather(wy) and _is_gather(wx):
        return _axis(_axis(cut, iy, wy, -2), ix, wx, -1)   # pure copy: any dtype, exact
    dtype = cut.dtype
    work = cut if dtype in (torch.float32, torch.float64) else cut.to(torch.float32)
    out = _axis(_axis(work, iy, wy, -2), ix, wx, -1)
    if dtype.is_floating_point:
        return out.to(dtype)
    if dtype == torch.bool:
        raise TypeError("cannot interpolate a bool image; use nearest or a numeric dtype")
    info = torch.iinfo(dtype)
    return out.round_().clamp_(info.min, info.max).to(dtype)


def resample(x, transform, theta, *, is_mask: bool = False, fill=None):
    """Apply ``transform`` with parameters ``theta`` to one image or mask.

    ``x``: tensor ``[..., H, W]`` or numpy ``H x W`` / ``H x W x C`` (the type is kept);
    ``transform``: a :class:`GeometricTransform` or a :class:`CropGeometry`; ``theta``: a
    :class:`~patchdp_opacus.privacy.footprint.Theta` or ``(choice, origin_y, origin_x)``;
    ``is_mask``: nearest kernel and ``fill`` default 255 (else the transform's kernel, fill 0).
    """
    transform: GeometricTransform = as_transform(transform)
    if _is_pil(x):
        return _resample_pil(x, transform, theta, is_mask=is_mask, fill=fill)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.permute(2, 0, 1) if x.ndim == 3 else t
        out = resample(t, transform, theta, is_mask=is_mask, fill=fill)
        return (out.permute(1, 2, 0) if x.ndim == 3 else out).numpy()
    size = _spatial_size(x)
    theta = Theta(*theta)
    interp = NEAREST if is_mask else transform.interpolation
    if interp not in transform.interpolations:
        raise FootprintError(
            f"{interp.describe()} is not among the kernels "
            f"{[k.describe() for k in transform.interpolations]} whose footprints p is computed "
            f"from: resampling would read outside the footprint window")
    fill = (DEFAULT_IGNORE_INDEX if is_mask else 0) if fill is None else fill
    plan_y, plan_x = transform.plans(size)[theta.choice]
    _check_fill(x.dtype, fill, is_mask, plan_y, plan_x)
    out = torch.full((*x.shape[:-2], plan_y.out, plan_x.out), fill, dtype=x.dtype,
                     device=x.device)
    window = transform.footprint(size, theta)
    if window is not None:
        (y0, y1), (x0, x1) = window
        cut = x[..., y0:y1, x0:x1]   # the only read of x
        ys, ye, taps_y = output_taps(plan_y, theta.origin_y, interp)
        xs, xe, taps_x = output_taps(plan_x, theta.origin_x, interp)
        iy, wy = _local(taps_y, y0, y1, x.device)
        ix, wx = _local(taps_x, x0, x1, x.device)
        out[..., ys:ye, xs:xe] = _resample_window(cut, iy, wy, ix, wx)
    if type(x) is not torch.Tensor:  # keep tensor subclasses (torchvision tv_tensors)
        out = out.as_subclass(type(x))
    return out


def _check_fill(dtype: torch.dtype, fill, is_mask: bool, plan_y, plan_x) -> None:
    """The padding value must fit the dtype whenever this choice can pad (checked on every
    sample, not only on those whose output reaches the padding)."""
    if not any((plan_y.before, plan_y.after, plan_x.before, plan_x.after)):
        return
    if dtype == torch.bool or (not dtype.is_floating_point and not dtype.is_complex
                               and not torch.iinfo(dtype).min <= fill <= torch.iinfo(dtype).max):
        what = "mask" if is_mask else "image"
        raise TypeError(f"{what} of dtype {dtype} cannot hold the padding value {fill}; use a "
                        f"dtype that can, e.g. uint8 or int64 for masks")


#: PIL modes whose ``np.asarray`` / ``Image.fromarray`` round trip is faithful.
_PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I", "I;16", "F")


def _resample_pil(x, transform, theta, *, is_mask: bool, fill):
    """PIL image -> array -> :func:`resample` -> PIL image of the same mode (see the module
    docstring for the rule)."""
    if x.mode not in _PIL_MODES:
        raise TypeError(f"cannot resample a PIL image of mode {x.mode!r} faithfully; convert it "
                        f"(e.g. image.convert('RGB')) or to a tensor in the dataset's transform")
    if x.mode in ("P", "PA") and not is_mask and not transform.interpolation.is_nearest:
        raise TypeError(f"a palette ('{x.mode}') image cannot be resampled with "
                        f"{transform.interpolation.describe()}: a blend of palette indices is "
                        f"not a colour; convert it to 'RGB' in the dataset's transform, or use "
                        f"interpolation='nearest'")
    out = resample(np.array(x), transform, theta, is_mask=is_mask, fill=fill)
    image = _PILImage.fromarray(out)
    if x.mode in ("P", "PA"):
        image.putpalette(x.getpalette())
    if image.mode != x.mode:  # pragma: no cover - guarded by _PIL_MODES
        raise TypeError(f"PIL mode {x.mode!r} did not survive resampling (got {image.mode!r})")
    return image


def resample_sample(sample, transform, theta, *, image_fill=0,
                    ignore_index=DEFAULT_IGNORE_INDEX):
    """``resample`` a bare image, an ``(image, mask, ...)`` tuple/list/namedtuple (spatial
    elements after the first -- tensors/arrays with >= 2 dims, PIL images -- are masks of the
    image's size; others, e.g. class labels, pass through) or a dict with an ``"image"`` key,
    all with the same ``theta``.  Types are kept."""
    if isinstance(sample, dict):
        if "image" not in sample:
            raise ValueError(f"dict samples need an 'image' key, got keys {sorted(sample)}")
        keys = ["image"] + [k for k in sample if k != "image"]
        done = resample_sample([sample[k] for k in keys], transform, theta,
                               image_fill=image_fill, ignore_index=ignore_index)
        return {k: done[keys.index(k)] for k in sample}
    if not isinstance(sample, (tuple, list)):
        return resample(sample, transform, theta, fill=image_fill)
    image, *rest = sample
    size = _spatial_size(image)
    out = [resample(image, transform, theta, fill=image_fill)]
    for pos, item in enumerate(rest, start=1):
        spatial = (isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim >= 2) \
            or _is_pil(item)
        if not spatial:
            out.append(item)
            continue
        if _spatial_size(item) != size:
            raise ValueError(f"sample element {pos} has spatial size {_spatial_size(item)}, "
                             f"not the image's {size} (height, width)")
        out.append(resample(item, transform, theta, is_mask=True, fill=ignore_index))
    if isinstance(sample, tuple):
        return type(sample)(*out) if hasattr(sample, "_fields") else type(sample)(out)
    return out


# --------------------------------------------------------------------------- drawing theta

def draw_theta(transform, image_size, generator: torch.Generator | None = None, *,
               image_sizes=None, secure: bool = False) -> Theta:
    """One exactly uniform ``theta`` for an image of ``image_size``; the moduli cover
    ``image_sizes`` (default: that size alone), as a sampler that does not yet know the
    image's size would draw them."""
    transform = as_transform(transform)
    moduli = transform.draw_moduli(image_sizes if image_sizes is not None else [image_size])
    return transform.theta_from_draws(image_size, draw_uniforms(moduli, generator,
                                                                 secure=secure))
