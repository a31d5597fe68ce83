"""Classification datasets returning full-resolution ``(image, label)`` samples.

``image``: ``torch.uint8`` (C, H, W); ``label``: int. Every dataset has ``size_of(index)``,
``image_sizes`` and ``class_names`` for the crop-aware loader and the accountant.
"""

from __future__ import annotations

from .base import ClassificationDataset, ImageTransform
from .dtd import DTD, DTD_SPLITS, PREPROCESS_COMMAND, find_dtd_folder, preprocess_dtd
from .mnist import MNIST, MNIST_SPLITS, read_idx

__all__ = [
    "DTD", "DTD_SPLITS", "MNIST", "MNIST_SPLITS", "PREPROCESS_COMMAND", "ClassificationDataset",
    "ImageTransform", "find_dtd_folder", "preprocess_dtd", "read_idx",
]
