"""Tiny generated classification data sets in the published layouts (shared by the tests):
MNIST's idx files and a DTD-like folder (``images/<class>/*.jpg``,
``labels/{train,val,test}1.txt``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """MNIST-like idx files (28x28 grey digits drawn as the label's brightness band and a bar
    whose row is the label, so a model can learn something) in ``root``; gzip for train."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, zipped in (("train", n_train, True), ("t10k", n_test, False)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label + 4:2 * label + 6, 4:24] = 200 + 5 * label
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = _idx(np.asarray(array))
            if zipped:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


DTD_CLASSES = ("banded", "dotted", "striped")


def write_dtd(root: Path, per_class: int = 6, sizes=((36, 40), (40, 36), (38, 38)),
              seed: int = 0) -> Path:
    """A DTD-like folder: ``per_class`` images per class, of the given (height, width) sizes in
    turn (JPEG, like the archive), and partition-1 label files split 4:1:1."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    entries = {"train": [], "val": [], "test": []}
    for c, name in enumerate(DTD_CLASSES):
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            image = rng.integers(0, 60, size=(h, w, 3))
            image[:, :, c] += 150  # the class is the dominant colour channel
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{name}_{i:04d}.jpg",
                                                         quality=95)
            split = "val" if i == per_class - 2 else "test" if i == per_class - 1 else "train"
            entries[split].append(f"{name}/{name}_{i:04d}.jpg")
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for split, lines in entries.items():
        (root / "labels" / f"{split}1.txt").write_text("".join(f"{e}\n" for e in lines))
    return root
