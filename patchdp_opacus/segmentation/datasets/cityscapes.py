"""Cityscapes (fine annotations), mapped to the 19 training classes.

Layout expected under ``root`` (the official one)::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

``labelIds`` (0..33) are mapped to trainIds 0..18 with
:data:`LABEL_ID_TO_TRAIN_ID`; every other id becomes 255 (ignored).
Images are 1024x2048 (H x W) in the official release.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .base import CITYSCAPES_CLASSES, IGNORE_INDEX, SegmentationDataset, Transform, image_to_tensor, read_size

logger = logging.getLogger(__name__)

__all__ = ["Cityscapes", "LABEL_ID_TO_TRAIN_ID", "labelids_to_trainids"]

#: Cityscapes labelId -> trainId; ids not listed map to 255.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
MAX_LABEL_ID = 33

_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lid, _tid in LABEL_ID_TO_TRAIN_ID.items():
    _LUT[_lid] = _tid

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def labelids_to_trainids(label_ids: np.ndarray, path: Optional[Path] = None) -> np.ndarray:
    """Map an (H, W) array of labelIds to trainIds (uint8, 255 = ignore).

    Raises:
        ValueError: a value outside 0..33 (``path`` is named in the message).
    """
    label_ids = np.asarray(label_ids)
    if label_ids.size and (label_ids.min() < 0 or label_ids.max() > MAX_LABEL_ID):
        bad = np.unique(label_ids[(label_ids < 0) | (label_ids > MAX_LABEL_ID)])
        where = f" in {path}" if path is not None else ""
        raise ValueError(
            f"label values out of range{where}: {bad[:10].tolist()} (Cityscapes labelIds are 0..{MAX_LABEL_ID}); "
            "is this a labelIds file (not color/instanceIds)?"
        )
    return _LUT[label_ids.astype(np.intp)]


class Cityscapes(SegmentationDataset):
    """Cityscapes fine-annotation split with 19 trainId classes.

    Args:
        root: dataset root containing ``leftImg8bit/`` and ``gtFine/``.
        split: "train", "val" or "test" (any folder name under both).
        transform: optional ``(image, mask) -> (image, mask)``.

    Samples are ``(image uint8 (3, H, W), mask int64 (H, W))`` at full
    resolution. Image/label pairing and sizes are checked at construction
    (file headers only); label values are checked when a sample is loaded.

    Raises:
        FileNotFoundError: missing root or split folder, empty split, or an
            image without its label file (paths named).
        ValueError: label size differs from image size (paths named).
    """

    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train", transform: Optional[Transform] = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"Cityscapes root folder does not exist: {self.root}")
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"Cityscapes split folder does not exist: {d}")
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(f"Cityscapes split {split!r} is empty: no */*{IMAGE_SUFFIX} under {image_dir}")
        labels = [label_dir / im.parent.name / (im.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX) for im in images]
        missing = [(im, lb) for im, lb in zip(images, labels) if not lb.is_file()]
        if missing:
            listing = "\n".join(f"  {im} -> expected {lb}" for im, lb in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise FileNotFoundError(f"{len(missing)} Cityscapes images have no label file:\n{listing}{more}")
        self.images = images
        self.labels = labels
        for im, lb in zip(images, labels):
            size, lsize = read_size(im), read_size(lb)
            if size != lsize:
                raise ValueError(f"label size {lsize} (H, W) of {lb} differs from image size {size} of {im}")
            self._sizes.append(size)
        logger.info("Cityscapes %s: %d images, sizes %s", split, len(images), sorted(self.image_sizes))

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        im_path, lb_path = self.images[index], self.labels[index]
        with Image.open(im_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(lb_path) as lb:
            if lb.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"label file {lb_path} has mode {lb.mode!r}; expected a single-channel labelIds PNG")
            label = np.asarray(lb)
        if label.shape != image.shape[:2]:
            raise ValueError(f"label size {label.shape} of {lb_path} differs from image size {image.shape[:2]} of {im_path}")
        mask = labelids_to_trainids(label, lb_path)
        return image_to_tensor(image), torch.from_numpy(mask.astype(np.int64))
