"""MNIST from its idx files (plain or gzip-compressed), as published.

Files looked for in ``root``, ``root/MNIST/raw`` (torchvision's layout) and ``root/raw``::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]     60000 images
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]      10000 images

idx format: a big-endian header (two zero bytes, the type code 0x08 = unsigned byte, the number
of dimensions ``d``), ``d`` big-endian uint32 sizes, then the data in C order. Images are 28x28
grey (one channel). Splits: "train" = the first ``60000 - val_size`` images of the training
file, "val" = its last ``val_size`` (default 5000; the paper's numbers were lost in its text
export, this is the common choice), "test" = the t10k file.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from patchdp_opacus.plugin.loader import file_record_key

from .base import ClassificationDataset, ImageTransform

logger = logging.getLogger(__name__)

__all__ = ["MNIST", "MNIST_SPLITS", "read_idx"]

MNIST_SPLITS = ("train", "val", "test")
DEFAULT_VAL_SIZE = 5000
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes with ``ndim`` dimensions as a uint8 array.

    Raises:
        ValueError: wrong magic number, type code or dimension count, or a data size that
            disagrees with the header (a truncated download); the path is named.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path}: {exc} (corrupt or truncated download?)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (its first two bytes must be zero)")
    if raw[2] != _UBYTE or raw[3] != ndim:
        kind = "images (idx3)" if ndim == 3 else "labels (idx1)"
        raise ValueError(f"{path}: header says type 0x{raw[2]:02x} with {raw[3]} dimensions; "
                         f"expected unsigned bytes (0x08) with {ndim} dimensions for {kind} — "
                         f"are the image and label files swapped?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header announces {shape} = {expected} bytes of data, the file "
                         f"holds {len(raw) - header} (truncated or corrupt; download it again)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, name: str) -> Path:
    folders = [root, root / "MNIST" / "raw", root / "raw"]
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"MNIST file {name} (or {name}.gz) not found in {', '.join(str(f) for f in folders)}; "
        f"put the four idx files of the MNIST release in one of these folders")


class MNIST(ClassificationDataset):
    """MNIST split with 10 digit classes.

    Args:
        root: folder with the idx files (or ``root/MNIST/raw``, ``root/raw``).
        split: "train", "val" (the last ``val_size`` training images) or "test" (t10k).
        val_size: images of the training file held out as "val".
        transform: optional ``image -> image`` (no crops: the loader crops).

    Samples are ``(image uint8 (1, 28, 28), label int)``.

    Raises:
        FileNotFoundError: a missing idx file (the folders searched are named).
        ValueError: a corrupt idx file, image and label counts that disagree, labels outside
            0..9, or a ``val_size`` the training file cannot hold.
    """

    class_names = tuple(str(d) for d in range(10))
    channels = 1

    def __init__(self, root: str | Path, split: str = "train", *,
                 val_size: int = DEFAULT_VAL_SIZE,
                 transform: Optional[ImageTransform] = None) -> None:
        super().__init__(transform)
        if split not in MNIST_SPLITS:
            raise ValueError(f"MNIST split must be one of {MNIST_SPLITS}, got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"MNIST root folder does not exist: {self.root}")
        image_name, label_name = _FILES["test" if split == "test" else "train"]
        image_path, label_path = _find(self.root, image_name), _find(self.root, label_name)
        images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
        if len(images) != len(labels):
            raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds "
                             f"{len(labels)} labels: the files do not belong together (mixed "
                             f"releases, or train and t10k files swapped)")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{label_path}: labels must be digits 0..9, found {int(labels.max())}")
        first = 0  # row in the idx file of this split's first image
        if split != "test":
            if not 0 <= val_size < len(images):
                raise ValueError(f"val_size must be in [0, {len(images)}), got {val_size}")
            cut = len(images) - val_size
            first = cut if split == "val" else 0
            images, labels = (images[:cut], labels[:cut]) if split == "train" else \
                (images[cut:], labels[cut:])
        self.split = split
        self._file = file_record_key(self, [image_path], 0)
        self._first = first
        self._images = images
        self._labels = [int(v) for v in labels]
        self._sizes = [tuple(images.shape[1:])] * len(images)
        logger.info("MNIST %s: %d images from %s", split, len(images), image_path)

    def record_key(self, index: int) -> tuple:
        """The image's row in its idx file (train and val are two ranges of one file)."""
        return (*self._file, self._first + int(index))

    def _load_image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._images[index], copy=True)).unsqueeze(0)
