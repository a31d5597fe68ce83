"""Common interface of the classification datasets.

Every dataset returns *full-resolution* samples; cropping is the loader's job (the patch-level
privacy analysis depends on it). A sample is a tuple ``(image, label)``: ``image`` a
``torch.uint8`` tensor ``(C, H, W)`` in pixel units 0-255 (``C = 3`` for DTD, 1 for MNIST),
``label`` a Python ``int`` in ``[0, num_classes)``.

The accountant needs every image size, so each dataset also offers ``size_of(index) -> (H, W)``
and ``image_sizes`` (the set of sizes present), both known without decoding pixels, and
``class_names`` (indexed by label).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from patchdp_opacus.plugin.loader import file_record_key

__all__ = ["ClassificationDataset", "ImageTransform"]

#: An optional per-image transform ``image -> image`` applied after loading. It must not crop
#: (the loader crops) and must not read other pixels than the one it writes when the
#: patch-level analysis is relied on (flips and per-pixel photometric changes are fine).
ImageTransform = Callable[[torch.Tensor], torch.Tensor]


class ClassificationDataset(Dataset):
    """Base class: subclasses fill ``self._sizes`` and ``self._labels`` and implement
    ``_load_image(index)``.

    Attributes:
        class_names: class names, indexed by label.
        channels: image channels (3 = RGB, 1 = grey).
        transform: optional ``image -> image`` applied after loading.
    """

    class_names: Sequence[str] = ()
    channels: int = 3

    def __init__(self, transform: Optional[ImageTransform] = None) -> None:
        self.transform = transform
        self._sizes: list[tuple[int, int]] = []
        self._labels: list[int] = []

    @property
    def num_classes(self) -> int:
        """Number of classes (labels 0 .. num_classes-1)."""
        return len(self.class_names)

    @property
    def labels(self) -> list[int]:
        """Label of every sample, in index order (no pixels decoded)."""
        return list(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) in pixels of sample ``index``, without decoding it."""
        return self._sizes[index]

    @property
    def image_sizes(self) -> set[tuple[int, int]]:
        """Set of (height, width) sizes present in the dataset."""
        return set(self._sizes)

    def record_key(self, index: int) -> tuple:
        """What sample ``index`` is, for the loader's check that no image is two records: the
        real path of its image file when the subclass keeps them in ``self.paths``."""
        return file_record_key(self, getattr(self, "paths", None), index)

    def _load_image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        image = self._load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self._labels[index]
