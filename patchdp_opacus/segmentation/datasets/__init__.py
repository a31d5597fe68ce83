"""Segmentation datasets returning full-resolution ``(image, mask)`` samples.

``image``: ``torch.uint8`` (3, H, W) RGB; ``mask``: ``torch.int64`` (H, W),
class ids or 255 (ignored). Every dataset has ``size_of(index) -> (H, W)``
and ``image_sizes`` (set of (H, W)) for the privacy accountant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .a2d2 import A2D2, A2D2_SPLITS
from .base import CITYSCAPES_CLASSES, IGNORE_INDEX, SegmentationDataset
from .cityscapes import Cityscapes, LABEL_ID_TO_TRAIN_ID
from .synthetic import SyntheticStreetScenes

__all__ = [
    "A2D2",
    "A2D2_SPLITS",
    "CITYSCAPES_CLASSES",
    "Cityscapes",
    "DATASETS",
    "IGNORE_INDEX",
    "LABEL_ID_TO_TRAIN_ID",
    "SegmentationDataset",
    "SyntheticStreetScenes",
    "build_dataset",
    "register_dataset",
]

#: name -> factory(root, split, **kwargs) -> SegmentationDataset
DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "cityscapes": Cityscapes,
    "a2d2": A2D2,
    "synthetic": SyntheticStreetScenes,
}


def register_dataset(name: str, factory: Callable[..., SegmentationDataset]) -> None:
    """Register ``factory(root, split, **kwargs)`` under ``name``."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = factory


def build_dataset(name: str, root: str | Path | None = None, split: str = "train", **kwargs: Any) -> SegmentationDataset:
    """Build a registered dataset: ``DATASETS[name](root, split, **kwargs)``.

    ``root`` may be None for "synthetic".
    """
    key = name.lower()
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    if root is None and key != "synthetic":
        raise ValueError(f"dataset {name!r} needs a root folder")
    return DATASETS[key](root, split, **kwargs)
