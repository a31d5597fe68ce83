"""The loader's crop (or loader-owned transform), applied to one sample from a token.

Geometry (sizes are ``(height, width)`` in pixels; see
:class:`~patchdp_opacus.privacy.geometry.CropGeometry`): an ``H x W`` image is padded with
``(top, bottom, left, right) = CropGeometry.pad_offsets((H, W))`` constant pixels, giving
``H' x W'``; the crop of ``c_h x c_w`` pixels has its top-left corner at the padded origin
``(i, j)`` with ``0 <= i <= S_y = H' - c_h`` and ``0 <= j <= S_x = W' - c_w``.  From a token
``(index, u_y, u_x)`` the origin is ``i = u_y mod (S_y + 1)``, ``j = u_x mod (S_x + 1)``
(uniform when ``u`` is uniform over a multiple of ``S + 1``, see :func:`token_moduli`).

Padding is constant: images get ``0`` (after the user's transforms, so after ``Normalize``
a zero is the mean colour), masks get the ignore index (``255`` by default, never ``0``, which
is a real class in most label sets).  The padded image is never materialised: the crop window
is intersected with the image and the rest is filled.

Every image's size must be one of the declared ``image_sizes`` (``p`` is the worst case over
exactly those sizes); any other size raises.

Loader-owned transforms (:mod:`patchdp_opacus.privacy.geometric`: random scale + crop,
RandomResizedCrop, resize) come with a :class:`~patchdp_opacus.plugin.sampler.TransformToken`
``(index, u_g, u_y, u_x)``; :func:`token_theta` turns its draws into ``theta`` and
:func:`~patchdp_opacus.plugin.resample.resample_sample` resamples the sample from exactly the
footprint window of ``theta`` that the accountant's ``p`` is computed from.  A fixed-size crop
(a :class:`~patchdp_opacus.privacy.geometry.CropGeometry`, or a
:class:`~patchdp_opacus.privacy.geometric.FixedCrop` holding one) keeps the crop path below
and its three-field tokens.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from patchdp_opacus.plugin.resample import resample_sample
from patchdp_opacus.plugin.augmentation import check_pixel_units, noisy_sample
from patchdp_opacus.plugin.sampler import WORD, CropToken, TransformToken, with_noise_seed
from patchdp_opacus.plugin.transforms import check_post_crop_state, post_crop_state
from patchdp_opacus.privacy.footprint import Theta
from patchdp_opacus.privacy.geometric import FixedCrop, GeometricTransform, as_transform
from patchdp_opacus.privacy.geometry import CropGeometry
from patchdp_opacus.privacy.spec import PatchPrivacySpec

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_INDEX = 255

try:  # PIL is a torchvision dependency; keep the module importable without it
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None


def _is_pil(x) -> bool:
    return _PILImage is not None and isinstance(x, _PILImage.Image)


def image_size_of(image) -> tuple[int, int]:
    """``(H, W)`` of an image: tensor ``[..., H, W]`` (``[H, W]`` or ``[C, H, W]``), numpy
    ``H x W`` or ``H x W x C``, or a PIL image."""
    if isinstance(image, torch.Tensor):
        if image.ndim < 2:
            raise ValueError(f"image tensor must have shape [H, W] or [C, H, W], got "
                             f"{tuple(image.shape)}")
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"image array must have shape H x W or H x W x C, got {image.shape}")
        return int(image.shape[0]), int(image.shape[1])
    if _is_pil(image):
        return int(image.size[1]), int(image.size[0])
    raise TypeError(f"cannot crop a {type(image).__name__}: expected a torch tensor [C, H, W], "
                    f"a numpy array H x W x C or a PIL image")


def _is_spatial(x) -> bool:
    return (isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim >= 2) or _is_pil(x)


def _target_size(x) -> tuple[int, int]:
    if isinstance(x, torch.Tensor):
        return int(x.shape[-2]), int(x.shape[-1])
    if isinstance(x, np.ndarray):
        return int(x.shape[0]), int(x.shape[1])
    return int(x.size[1]), int(x.size[0])


def fixed_crop_of(crop) -> CropGeometry | None:
    """The :class:`CropGeometry` when ``crop`` is a fixed-size crop (itself, or held by a
    :class:`FixedCrop`), else ``None`` (a resampling transform)."""
    if isinstance(crop, CropGeometry):
        return crop
    if isinstance(crop, FixedCrop):
        return crop.crop
    if isinstance(crop, GeometricTransform):
        return None
    raise TypeError(f"expected a CropGeometry or a geometric transform, got "
                    f"{type(crop).__name__}")


def choice_modulus(crop, image_sizes: Iterable) -> int | None:
    """``M_g`` of a loader-owned transform's choice draw (its number of choices ``G``), or
    ``None`` for a fixed crop (three-field :class:`CropToken` s)."""
    if fixed_crop_of(crop) is not None:
        return None
    return crop.draw_moduli(image_sizes)[0]


def token_moduli(crop, image_sizes: Iterable) -> tuple[int, int]:
    """Per-axis ranges ``(M_y, M_x)`` of the origin draws ``u_y``, ``u_x``.

    Fixed crop: ``M`` = lcm of the origin counts ``S + 1`` over the declared sizes, so that
    ``u mod (S + 1)`` is exactly uniform for each; it falls back to ``2**62`` on an axis whose
    lcm exceeds it (bias ``<= (S + 1) / 2**62``).  Loader-owned transform: the exact lcm over
    sizes *and* choices (:meth:`~patchdp_opacus.privacy.geometric.GeometricTransform.
    draw_moduli`), of any size (the sampler draws it exactly from several words)."""
    geometry = fixed_crop_of(crop)
    if geometry is None:
        _, my, mx = crop.draw_moduli(image_sizes)
        return my, mx
    crop = geometry
    spec_sizes = [tuple(s) for s in image_sizes]
    moduli = []
    for axis in (0, 1):
        m = math.lcm(*(crop.axes(s)[axis].num_origins for s in spec_sizes))
        if m > WORD:
            logger.info("origin-count lcm on axis %d exceeds 2**62; crop origins use u mod (S+1) "
                        "with u < 2**62 (bias <= (S+1)/2**62)", axis)
            m = WORD
        moduli.append(m)
    return moduli[0], moduli[1]


def crop_origin(crop: CropGeometry, image_size, u_y: int, u_x: int) -> tuple[int, int]:
    """Padded top-left ``(i, j) = (u_y mod (S_y + 1), u_x mod (S_x + 1))``."""
    ay, ax = crop.axes(image_size)
    return int(u_y) % ay.num_origins, int(u_x) % ax.num_origins


def token_theta(crop, image_size, draws) -> Theta:
    """``theta`` of one sample from its token's draws: ``(u_y, u_x)`` for a fixed crop
    (choice 0, origin = :func:`crop_origin`), ``(u_g, u_y, u_x)`` for a transform
    (:meth:`~patchdp_opacus.privacy.geometric.GeometricTransform.theta_from_draws`).  The
    cropping dataset applies this ``theta``; the audit tests the footprint of the same one."""
    geometry = fixed_crop_of(crop)
    if geometry is not None:
        return Theta(0, *crop_origin(geometry, image_size, *draws))
    return crop.theta_from_draws(image_size, draws)


def make_token(crop, index: int, draws, noise_seed: int | None = None):
    """The token the loader's sampler would yield for ``index`` and ``draws`` (and, with
    Gaussian augmentation, ``noise_seed``)."""
    if fixed_crop_of(crop) is not None:
        token = CropToken(int(index), *(int(u) for u in draws))
    else:
        token = TransformToken(int(index), *(int(u) for u in draws))
    return token if noise_seed is None else with_noise_seed(token, noise_seed)


class _Window:
    """Crop window in image coordinates: output ``[dy0:dy1, dx0:dx1]`` takes image
    ``[y0:y1, x0:x1]``; everything else is fill."""

    def __init__(self, crop: CropGeometry, image_size, origin):
        h, w = image_size
        ch, cw = crop.crop_size
        top, _, left, _ = crop.pad_offsets(image_size)
        ys, xs = origin[0] - top, origin[1] - left  # crop top-left in image coordinates
        self.size = (ch, cw)
        self.y0, self.y1 = min(max(ys, 0), h), min(max(ys + ch, 0), h)
        self.x0, self.x1 = min(max(xs, 0), w), min(max(xs + cw, 0), w)
        self.dy0, self.dx0 = self.y0 - ys, self.x0 - xs
        self.dy1, self.dx1 = self.dy0 + (self.y1 - self.y0), self.dx0 + (self.x1 - self.x0)
        self.inside = (self.y1 - self.y0, self.x1 - self.x0) == self.size
        # padding is possible for this geometry: check the fill value on every crop, not only
        # on the crops that happen to reach the border
        self.may_pad = any(crop.pad_offsets(image_size))


def _fill_error(dtype_name: str, fill, is_mask: bool) -> TypeError:
    what = "mask" if is_mask else "image"
    return TypeError(f"{what} of dtype {dtype_name} cannot hold the padding value {fill}; use a "
                     f"dtype that can, e.g. uint8 or int64 for masks")


def _crop_tensor(x: torch.Tensor, win: _Window, fill, is_mask: bool) -> torch.Tensor:
    if win.may_pad and (x.dtype == torch.bool or (
            not x.dtype.is_floating_point and not x.dtype.is_complex
            and not torch.iinfo(x.dtype).min <= fill <= torch.iinfo(x.dtype).max)):
        raise _fill_error(str(x.dtype), fill, is_mask)
    if win.inside:
        out = x[..., win.y0:win.y1, win.x0:win.x1].contiguous()
    else:
        out = torch.full((*x.shape[:-2], *win.size), fill, dtype=x.dtype, device=x.device)
        out[..., win.dy0:win.dy1, win.dx0:win.dx1] = x[..., win.y0:win.y1, win.x0:win.x1]
    if type(x) is not torch.Tensor:  # keep tensor subclasses (torchvision tv_tensors)
        out = out.as_subclass(type(x))
    return out


def _crop_array(x: np.ndarray, win: _Window, fill, is_mask: bool) -> np.ndarray:
    if win.may_pad and (x.dtype == bool or (
            np.issubdtype(x.dtype, np.integer)
            and not np.iinfo(x.dtype).min <= fill <= np.iinfo(x.dtype).max)):
        raise _fill_error(str(x.dtype), fill, is_mask)
    if win.inside:
        return np.ascontiguousarray(x[win.y0:win.y1, win.x0:win.x1])
    out = np.full(win.size + x.shape[2:], fill, dtype=x.dtype)
    out[win.dy0:win.dy1, win.dx0:win.dx1] = x[win.y0:win.y1, win.x0:win.x1]
    return out


def _crop_pil(x, win: _Window, fill, is_mask: bool):
    box = (win.x0, win.y0, win.x1, win.y1)
    if win.may_pad and x.mode == "1" and fill not in (0, 1):
        raise _fill_error("PIL mode '1'", fill, is_mask)
    if win.inside:
        return x.crop(box)
    out = _PILImage.new(x.mode, (win.size[1], win.size[0]),
                        fill if len(x.getbands()) == 1 else (fill,) * len(x.getbands()))
    if x.mode in ("P", "PA"):
        out.putpalette(x.getpalette())
    if win.y1 > win.y0 and win.x1 > win.x0:
        out.paste(x.crop(box), (win.dx0, win.dy0))
    return out


def crop_array_like(x, crop: CropGeometry, image_size, origin, fill, *, is_mask: bool = False):
    """Cut the ``crop_size`` window at padded ``origin`` from ``x`` (tensor / numpy / PIL) of
    spatial size ``image_size``, filling the padding with ``fill``; the type is kept."""
    win = _Window(crop, image_size, origin)
    if isinstance(x, torch.Tensor):
        return _crop_tensor(x, win, fill, is_mask)
    if isinstance(x, np.ndarray):
        return _crop_array(x, win, fill, is_mask)
    if _is_pil(x):
        return _crop_pil(x, win, fill, is_mask)
    raise TypeError(f"cannot crop a {type(x).__name__}")


def undeclared_size_error(size, declared) -> ValueError:
    h, w = size
    listed = ", ".join(f"({a}, {b})" for a, b in declared)
    return ValueError(
        f"image of size (height={h}, width={w}) is not one of the declared image sizes "
        f"[{listed}] (height, width): the inclusion probability p, and so the privacy "
        f"accounting, covers only those. Declare it (image_sizes=[..., ({h}, {w})]) or resize "
        f"every image to a declared size with a deterministic Resize in the dataset's transform")


def crop_sample(sample: Any, crop: CropGeometry, u_y: int, u_x: int, *,
                image_sizes: Sequence | None = None, image_fill=0,
                ignore_index=DEFAULT_IGNORE_INDEX):
    """Crop one sample with the origin derived from ``(u_y, u_x)``.

    Sample formats: a bare image; ``(image, target, ...)`` tuples/lists, where every further
    element that is spatial (a tensor/array with >= 2 dims, or a PIL image) is a mask of the
    image's size and is cropped at the same origin with ``ignore_index`` padding, while
    non-spatial elements (int / 0-d or 1-d tensors: class labels) are left alone; dicts with an
    ``"image"`` key, other spatial values treated as masks.  Types are kept.

    Raises ``ValueError`` if the image size is not in ``image_sizes`` (when given), if a
    spatial target's size differs from the image's, or if the crop does not fit.
    """
    if isinstance(sample, dict):
        if "image" not in sample:
            raise ValueError(f"dict samples need an 'image' key, got keys {sorted(sample)}")
        keys = ["image"] + [k for k in sample if k != "image"]
        items = [sample[k] for k in keys]
    elif isinstance(sample, (tuple, list)):
        if not sample:
            raise ValueError("empty sample")
        items = list(sample)
    else:
        items = [sample]
    size = image_size_of(items[0])
    if image_sizes is not None and size not in {tuple(s) for s in image_sizes}:
        raise undeclared_size_error(size, image_sizes)
    origin = crop_origin(crop, size, u_y, u_x)
    out = [crop_array_like(items[0], crop, size, origin, image_fill)]
    for pos, item in enumerate(items[1:], start=1):
        if not _is_spatial(item):
            out.append(item)
            continue
        if _target_size(item) != size:
            raise ValueError(
                f"sample element {pos} looks spatial (shape/size {_target_size(item)}) but does "
                f"not match the image size {size} (height, width); masks must have the image's "
                f"size, labels must be scalars or 1-D")
        out.append(crop_array_like(item, crop, size, origin, ignore_index, is_mask=True))
    if isinstance(sample, dict):
        cropped = dict(zip(keys, out))
        return {k: cropped[k] for k in sample}
    if isinstance(sample, tuple):
        return type(sample)(*out) if hasattr(sample, "_fields") else tuple(out)
    if isinstance(sample, list):
        return out
    return out[0]


def sample_image(sample):
    """The image of a sample: a bare image, ``sample[0]`` or ``sample["image"]``."""
    if isinstance(sample, dict):
        if "image" not in sample:
            raise ValueError(f"dict samples need an 'image' key, got keys {sorted(sample)}")
        return sample["image"]
    if isinstance(sample, (tuple, list)):
        if not sample:
            raise ValueError("empty sample")
        return sample[0]
    return sample


def transform_sample(sample: Any, transform: GeometricTransform, draws, *,
                     image_sizes: Sequence | None = None, image_fill=0,
                     ignore_index=DEFAULT_IGNORE_INDEX):
    """Apply a loader-owned transform to one sample with ``theta`` from ``draws = (u_g, u_y,
    u_x)``: the sample formats of :func:`crop_sample` (PIL images too); the image size is
    checked against ``image_sizes`` (when given) before anything is read."""
    size = image_size_of(sample_image(sample))
    if image_sizes is not None and size not in {tuple(s) for s in image_sizes}:
        raise undeclared_size_error(size, image_sizes)
    theta = token_theta(transform, size, draws)
    return resample_sample(sample, transform, theta, image_fill=image_fill,
                           ignore_index=ignore_index)


def _is_integer(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, torch.Tensor) and value.ndim == 0 and not (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)


def token_fields(token) -> tuple[int, ...]:
    """``(index, u_y, u_x)`` or ``(index, u_g, u_y, u_x)`` of a token, tuple or list, as
    Python ints, followed by the ``noise_seed`` when the token carries one (Gaussian
    augmentation).  Plain indices (Poisson sampling, a replaced sampler) and non-integer fields
    (e.g. draws that went through a float array and lost their exactness) are refused."""
    if isinstance(token, TransformToken):
        seed = () if token.noise_seed is None else (token.noise_seed,)
        return token.index, *token.draws, *seed
    if _is_integer(token):
        raise TypeError(
            "CroppingDataset expects crop tokens (index, u_y, u_x) from the loader's "
            "fixed-size batch sampler, got a plain index: Poisson sampling or a replaced "
            "sampler is not supported (use poisson_sampling=False)")
    try:
        fields = tuple(token)
    except TypeError:
        raise TypeError(f"expected a crop token (index, u_y, u_x), got {token!r}") from None
    if len(fields) not in (3, 4, 5) or not all(_is_integer(f) for f in fields):
        raise TypeError(
            f"expected a token (index, u_y, u_x) or (index, u_g, u_y, u_x) of integers (and a "
            f"noise seed with Gaussian augmentation) from "
            f"the loader's sampler, got {token!r}" + (
                "; a float draw has lost its exactness (parameters would not be uniform)"
                if any(isinstance(f, (float, np.floating)) for f in fields) else ""))
    return tuple(int(f) for f in fields)


class CroppingDataset(Dataset):
    """Wraps a map-style dataset; ``__getitem__`` takes a token from the loader's sampler,
    loads ``dataset[index]`` (with the user's transforms), checks the image size against
    ``spec.image_sizes`` and applies the spec's geometry:

    * fixed-size crop (``spec.crop`` a :class:`CropGeometry` or :class:`FixedCrop`): a
      :class:`~patchdp_opacus.plugin.sampler.CropToken` ``(index, u_y, u_x)`` (tuple or list),
      cropped by :func:`crop_sample`;
    * loader-owned transform (random scale + crop, RandomResizedCrop, resize): a
      :class:`~patchdp_opacus.plugin.sampler.TransformToken` ``(index, u_g, u_y, u_x)`` (or a
      list of its fields), resampled from the footprint window of ``theta`` by
      :func:`transform_sample`;

    then ``post_crop_transform`` (if any).  ``len()`` is the wrapped dataset's length.

    With ``spec.augmentation`` (Gaussian-noise augmentation) every token must end with its
    ``noise_seed`` and the sample's image gets ``N(0, sigma_aug^2)`` noise in stored-image pixel
    units: after a fixed crop, before a resampling transform, always before
    ``post_crop_transform`` (:mod:`patchdp_opacus.plugin.augmentation`).  A token without a
    noise seed is refused then (the accountant's TV would be claimed for noise never added),
    and so is a noise seed without the augmentation."""

    def __init__(self, dataset, spec: PatchPrivacySpec, *, image_fill=0,
                 ignore_index=DEFAULT_IGNORE_INDEX, post_crop_transform=None):
        if post_crop_transform is not None and not callable(post_crop_transform):
            raise TypeError(f"post_crop_transform must be callable, got "
                            f"{type(post_crop_transform).__name__}")
        self.dataset = dataset
        self.spec = spec
        self.image_fill = image_fill
        self.ignore_index = ignore_index
        self.post_crop_transform = post_crop_transform
        self._geometry = fixed_crop_of(spec.crop)  # None: a resampling transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, token):
        fields = token_fields(token)
        augmentation = self.spec.augmentation
        expected = (3 if self._geometry is not None else 4) + (augmentation is not None)
        if len(fields) != expected:
            what = ("a fixed-size crop takes (index, u_y, u_x" if self._geometry is not None
                    else f"{as_transform(self.spec.crop).describe()} takes (index, u_g, u_y, u_x")
            what += (", noise_seed): the spec adds Gaussian augmentation noise, whose seed the "
                     "loader's sampler draws (noise_seeds=True)") if augmentation is not None \
                else ")"
            raise TypeError(f"token {token!r} does not fit the spec: {what}")
        index, *draws = fields
        noise_seed = draws.pop() if augmentation is not None else None
        sample = self.dataset[index]
        if augmentation is not None:
            check_pixel_units(sample_image(sample), augmentation)  # the dataset's own pixels
        if self._geometry is not None:
            cropped = crop_sample(sample, self._geometry, *draws,
                                  image_sizes=self.spec.image_sizes, image_fill=self.image_fill,
                                  ignore_index=self.ignore_index)
            if augmentation is not None:  # on the window: the same law as on the whole image
                cropped = noisy_sample(cropped, sample_image(cropped), augmentation, noise_seed)
        else:
            if augmentation is not None:  # stored-image units: before any resampling
                sample = noisy_sample(sample, sample_image(sample), augmentation, noise_seed)
            cropped = transform_sample(sample, self.spec.crop, draws,
                                       image_sizes=self.spec.image_sizes,
                                       image_fill=self.image_fill,
                                       ignore_index=self.ignore_index)
        if self.post_crop_transform is None:
            return cropped
        before = post_crop_state(self.post_crop_transform)
        out = self.post_crop_transform(cropped)
        check_post_crop_state(self.post_crop_transform, before)
        return out
