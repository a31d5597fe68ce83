"""Common interface of the segmentation datasets.

Every dataset returns *full-resolution* samples; cropping is the loader's job
(the patch-level privacy analysis depends on it). A sample is a tuple

``(image, mask)``: ``image`` a ``torch.uint8`` tensor ``(3, H, W)`` (RGB, pixel
units 0–255), ``mask`` a ``torch.int64`` tensor ``(H, W)`` of class ids in
``[0, num_classes)`` or :data:`IGNORE_INDEX` (255).

The accountant needs every image size, so each dataset also offers
``size_of(index) -> (H, W)`` and ``image_sizes`` (the set of sizes present),
both computed without decoding pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from patchdp_opacus.plugin.loader import file_record_key

logger = logging.getLogger(__name__)

__all__ = [
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "SegmentationDataset",
    "Transform",
    "image_to_tensor",
    "read_size",
]

IGNORE_INDEX = 255

#: The 19 Cityscapes training classes, indexed by trainId.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def read_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (no pixel decoding)."""
    with Image.open(path) as im:
        w, h = im.size
    return (h, w)


def image_to_tensor(array: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array -> contiguous torch.uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class SegmentationDataset(Dataset):
    """Base class: subclasses fill ``self._sizes`` and implement ``_load(index)``.

    Attributes:
        class_names: names of the classes, indexed by class id.
        ignore_index: label value of pixels excluded from loss and metrics (255).
        transform: optional callable ``(image, mask) -> (image, mask)`` applied
            after loading (must not crop if the privacy analysis relies on the
            loader's crop).
    """

    class_names: Sequence[str] = ()
    ignore_index: int = IGNORE_INDEX

    def __init__(self, transform: Optional[Transform] = None) -> None:
        self.transform = transform
        self._sizes: list[tuple[int, int]] = []

    @property
    def num_classes(self) -> int:
        """Number of classes (ids 0 .. num_classes-1)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._sizes)

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) in pixels of sample ``index``, without decoding it."""
        return self._sizes[index]

    @property
    def image_sizes(self) -> set[tuple[int, int]]:
        """Set of (height, width) sizes present in the dataset."""
        return set(self._sizes)

    def record_key(self, index: int) -> tuple:
        """What sample ``index`` is, for the loader's check that no image is two records: the
        real path of its image file when the subclass keeps them in ``self.images``."""
        return file_record_key(self, getattr(self, "images", None), index)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        image, mask = self._load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask
