"""Augmentations described in configs: a list of torchvision (v2) or albumentations transforms.

Two places take such a list (see the README):

* ``dataset.transforms`` -- applied by the training data set to each full-resolution sample,
  *before* the loader's crop; the loader's inspection decides what may run there (flips and
  per-pixel transforms with image-independent parameters);
* ``privacy.post_crop_transforms`` -- applied by the loader to each crop, *after* it; anything
  that reads the whole crop (contrast, per-crop statistics, a rotation of the crop) belongs here.

Each item names one transform with its library prefix and its keyword arguments::

    dataset:
      transforms:
        - tv.RandomHorizontalFlip: {p: 0.5}
        - A.HueSaturationValue: {p: 0.3}
    privacy:
      post_crop_transforms:
        - tv.ColorJitter: {brightness: 0.3, contrast: 0.3}

``tv.`` is ``torchvision.transforms.v2``, ``A.`` is ``albumentations``.  Samples are the data
sets' ``(image uint8 (3, H, W), mask int64 (H, W))``; the image and the mask go through every
geometric step together (torchvision ``tv_tensors``, albumentations' ``mask`` target), and
photometric steps leave the mask alone.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np
import torch

#: Config prefix -> module the transform classes come from.
LIBRARIES = {"tv": "torchvision.transforms.v2", "A": "albumentations"}


def parse_item(item: Any) -> tuple[str, str, dict]:
    """``{"tv.ColorJitter": {...}}`` -> ``("tv", "ColorJitter", {...})``; raises ``ValueError``
    saying what an item looks like."""
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"each transform is a one-key mapping such as "
                         f"{{tv.RandomHorizontalFlip: {{p: 0.5}}}}, got {item!r}")
    (name, kwargs), = item.items()
    prefix, _, cls = str(name).partition(".")
    if prefix not in LIBRARIES or not cls:
        raise ValueError(f"{name!r}: name a transform with its library prefix, "
                         f"{' or '.join(p + '.' for p in LIBRARIES)} (e.g. tv.ColorJitter)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{name}: its arguments must be a mapping, got {kwargs!r}")
    return prefix, cls, dict(kwargs or {})


def build_step(item: Any):
    """One transform object from a config item."""
    prefix, cls, kwargs = parse_item(item)
    module = importlib.import_module(LIBRARIES[prefix])
    factory = getattr(module, cls, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{prefix}.{cls}: {LIBRARIES[prefix]} has no transform {cls!r}")
    try:
        step = factory(**kwargs)
    except Exception as exc:  # the library's own argument check
        raise ValueError(f"{prefix}.{cls}({kwargs}): {exc}") from None
    if prefix == "A":  # an albumentations Compose owns the random generator (seedable)
        step = module.Compose([step])
    return step


class Compose:
    """Applies config-built steps in order to ``(image, mask)`` samples.

    Callable as ``compose(image, mask)`` (the data sets' ``transform`` convention) and as
    ``compose(sample)`` with a ``(image, mask)`` tuple (the loader's post-crop convention).
    Steps are kept in :attr:`transforms`, so the loader's inspection sees every one of them."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, mask=None):
        if mask is None and isinstance(image, (tuple, list)):
            return tuple(self(*image))
        for step in self.transforms:
            image, mask = _apply(step, image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def _apply(step, image: torch.Tensor, mask):
    if type(step).__module__.startswith("albumentations"):
        data = {"image": image.permute(1, 2, 0).numpy()}
        if mask is not None:
            data["mask"] = mask.numpy()
        out = step(**data)
        image = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1)
        if mask is not None:
            mask = torch.from_numpy(np.ascontiguousarray(out["mask"])).to(mask.dtype)
        return image.contiguous(), mask
    from torchvision import tv_tensors

    if mask is None:
        return step(tv_tensors.Image(image)).as_subclass(torch.Tensor), None
    image, mask = step(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def build_transforms(items) -> Compose | None:
    """The :class:`Compose` of a config list (``None`` or ``[]`` -> ``None``)."""
    if not items:
        return None
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected a list of transforms, got {items!r}")
    return Compose([build_step(item) for item in items])
