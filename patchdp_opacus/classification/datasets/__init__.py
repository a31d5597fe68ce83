"""Classification datasets returning full-resolution ``(image, label)`` samples.

``image``: ``torch.uint8`` (C, H, W); ``label``: int. Every dataset has ``size_of(index)``,
``image_sizes`` and ``class_names`` for the crop-aware loader and the accountant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import ClassificationDataset, ImageTransform
from .dtd import DTD, DTD_SPLITS, PREPROCESS_COMMAND, find_dtd_folder, preprocess_dtd
from .mnist import MNIST, MNIST_SPLITS, read_idx

__all__ = [
    "DATASETS", "DTD", "DTD_SPLITS", "MNIST", "MNIST_SPLITS", "PREPROCESS_COMMAND",
    "ClassificationDataset", "ImageTransform", "build_dataset", "find_dtd_folder",
    "preprocess_dtd", "read_idx",
]

#: name -> factory(root, split, **kwargs) -> ClassificationDataset (the config's dataset.name)
DATASETS: dict[str, Callable[..., ClassificationDataset]] = {"dtd": DTD, "mnist": MNIST}


def build_dataset(name: str, root: str | Path | None = None, split: str = "train",
                  **kwargs: Any) -> ClassificationDataset:
    """Build a registered dataset: ``DATASETS[name](root, split, **kwargs)``."""
    key = name.lower()
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (dataset.root or --data-root)")
    return DATASETS[key](root, split, **kwargs)
