"""DTD (Describable Textures Dataset) in torchvision's folder layout, as the paper uses it.

Layout (the official archive; torchvision keeps it under ``<root>/dtd/dtd``)::

    images/<class>/<class>_<id>.jpg          47 classes, 5640 images of various sizes
    labels/{train,val,test}{1..10}.txt       one "<class>/<file>" per line, 10 partitions

The paper drops every image with a side shorter than 300 pixels and resizes the rest to
300x300 (1880/1880/1880 -> 1879/1878/1880 in partition 1). The default path here reads images
that :func:`preprocess_dtd` (command: ``python scripts/preprocess_dtd.py SRC DST``) has resized
*offline*; the loader then crops 300x300 images, and the private region (5x5 in the paper) is
measured in pixels of the *resized* image: the guarantee is about the preprocessed data set.
A region of the original photograph maps to a larger, image-dependent footprint after the
resize; declaring the region in stored-image pixels with the resize inside the loader is the
footprint work of issue 12. ``image_size=None`` reads the raw images instead (every size that
survives ``min_side`` then enters the privacy analysis through ``image_sizes``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .base import ClassificationDataset, ImageTransform

logger = logging.getLogger(__name__)

__all__ = ["DTD", "DTD_SPLITS", "PREPROCESS_COMMAND", "find_dtd_folder", "preprocess_dtd"]

DTD_SPLITS = ("train", "val", "test")
#: The command that writes the 300x300 copy the default path expects.
PREPROCESS_COMMAND = "python scripts/preprocess_dtd.py <raw DTD root> <output folder>"
#: Resampling filter of the offline resize (PIL's bilinear, antialiased when downscaling).
RESAMPLE = "bilinear"
MANIFEST = "preprocessing.json"
_LABEL_FILE = re.compile(r"^(train|val|test)(\d+)\.txt$")


def read_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (no pixel decoding)."""
    with Image.open(path) as im:
        w, h = im.size
    return (h, w)


def find_dtd_folder(root: str | Path) -> Path:
    """The folder holding ``images/`` and ``labels/``: ``root`` itself, ``root/dtd`` or
    ``root/dtd/dtd`` (torchvision's download layout).

    Raises:
        FileNotFoundError: none of them has both sub-folders (all three are named).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DTD root folder does not exist: {root}")
    candidates = [root, root / "dtd", root / "dtd" / "dtd"]
    for folder in candidates:
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no DTD folder found: expected images/<class>/*.jpg and labels/{{train,val,test}}1.txt "
        f"in one of {tried}; unpack the official dtd-r1.0.1 archive there (or point root at the "
        f"folder that holds images/ and labels/)")


def _read_label_file(path: Path, class_names: list[str]) -> list[tuple[str, int]]:
    """``[(relative image path, label)]`` from one ``labels/<split><k>.txt``."""
    index = {name: i for i, name in enumerate(class_names)}
    entries, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        rel = line.strip()
        if not rel:
            continue
        parts = rel.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}:{lineno}: expected '<class>/<file>', got {rel!r}; is this a "
                             f"DTD label file (labels/{{train,val,test}}<k>.txt)?")
        if parts[0] not in index:
            raise ValueError(
                f"{path}:{lineno}: class {parts[0]!r} has no folder images/{parts[0]}; the label "
                f"file does not belong to this images/ folder (mixed DTD copies?)")
        if rel in seen:
            raise ValueError(f"{path}:{lineno}: {rel!r} is listed twice")
        seen.add(rel)
        entries.append((rel, index[parts[0]]))
    if not entries:
        raise ValueError(f"label file {path} lists no images")
    return entries


class DTD(ClassificationDataset):
    """One split of one DTD partition.

    Args:
        root: folder with ``images/`` and ``labels/`` (or ``root/dtd[/dtd]``).
        split: "train", "val" or "test".
        partition: DTD's partition number, 1-10 (the paper uses 1).
        image_size: ``(height, width)`` every image must have, default ``(300, 300)``: the
            output of :func:`preprocess_dtd`. ``None`` reads images at their own sizes.
        min_side: images whose shorter side is below this many pixels are dropped (paper:
            300); with the preprocessed copy nothing is left to drop.
        transform: optional ``image -> image`` (no crops: the loader crops).

    Samples are ``(image uint8 (3, H, W), label int)``; ``class_names`` are the 47 folder
    names, sorted (label = position).

    Raises:
        FileNotFoundError: missing folders or label file, images listed but absent (named).
        ValueError: a malformed or foreign label file; an image of the wrong size (the message
            names the preprocessing command).
    """

    def __init__(self, root: str | Path, split: str = "train", partition: int = 1, *,
                 image_size: Optional[tuple[int, int]] = (300, 300), min_side: int = 300,
                 transform: Optional[ImageTransform] = None) -> None:
        super().__init__(transform)
        if split not in DTD_SPLITS:
            raise ValueError(f"DTD split must be one of {DTD_SPLITS}, got {split!r}")
        if not 1 <= int(partition) <= 10:
            raise ValueError(f"DTD partition must be 1..10, got {partition}")
        self.folder = find_dtd_folder(root)
        self.split, self.partition = split, int(partition)
        self.class_names = tuple(sorted(p.name for p in (self.folder / "images").iterdir()
                                        if p.is_dir()))
        if not self.class_names:
            raise FileNotFoundError(f"DTD images folder {self.folder / 'images'} has no class "
                                    f"folders")
        label_file = self.folder / "labels" / f"{split}{self.partition}.txt"
        if not label_file.is_file():
            raise FileNotFoundError(
                f"DTD label file {label_file} does not exist; DTD ships labels/"
                f"{{train,val,test}}{{1..10}}.txt next to images/")
        entries = _read_label_file(label_file, list(self.class_names))
        missing = [rel for rel, _ in entries if not (self.folder / "images" / rel).is_file()]
        if missing:
            listing = "\n".join(f"  {self.folder / 'images' / rel}" for rel in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            hint = (" (the label file names .jpg files: is root the raw archive rather than the "
                    f"preprocessed copy? run {PREPROCESS_COMMAND})"
                    if any(rel.endswith(".jpg") for rel in missing) and image_size else "")
            raise FileNotFoundError(f"{len(missing)} images listed in {label_file} do not exist"
                                    f"{hint}:\n{listing}{more}")
        self.image_size = None if image_size is None else (int(image_size[0]),
                                                           int(image_size[1]))
        self.min_side = int(min_side)
        self.paths: list[Path] = []
        self.dropped: list[str] = []
        for rel, label in entries:
            path = self.folder / "images" / rel
            size = read_size(path)
            if self.image_size is not None and size != self.image_size:
                raise ValueError(
                    f"{path} is {size[0]}x{size[1]} (height x width), expected "
                    f"{self.image_size[0]}x{self.image_size[1]}: run {PREPROCESS_COMMAND} and "
                    f"point root at its output, or pass image_size=None to read the raw images "
                    f"at their own sizes")
            if min(size) < self.min_side:
                self.dropped.append(rel)
                continue
            self.paths.append(path)
            self._sizes.append(size)
            self._labels.append(label)
        if not self.paths:
            raise ValueError(f"every image of {label_file} has a side below min_side="
                             f"{self.min_side}")
        logger.info("DTD %s%d: %d images (%d dropped with a side < %d), sizes %s", split,
                    self.partition, len(self.paths), len(self.dropped), self.min_side,
                    sorted(self.image_sizes)[:5])

    def _load_image(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as im:
            array = np.asarray(im.convert("RGB"))
        if array.shape[:2] != self._sizes[index]:
            raise ValueError(f"{self.paths[index]} decoded as {array.shape[:2]}, its header said "
                             f"{self._sizes[index]}")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def preprocess_dtd(source: str | Path, destination: str | Path, *,
                   size: tuple[int, int] = (300, 300), min_side: int = 300,
                   overwrite: bool = False) -> dict:
    """Write the paper's DTD copy: images with a side < ``min_side`` dropped, the rest resized
    to ``size = (height, width)`` (PIL bilinear, antialiased when shrinking) and stored as
    lossless PNG; every ``labels/{train,val,test}<k>.txt`` rewritten without the dropped images
    (and with ``.png`` names); a ``preprocessing.json`` manifest records what was done.

    Returns the manifest (``kept``, ``dropped`` with their sizes, per-label-file counts).

    Raises:
        FileNotFoundError: no DTD layout under ``source``.
        FileExistsError: ``destination`` is not empty and ``overwrite`` is False.
    """
    src = find_dtd_folder(source)
    dst = Path(destination)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} is not empty; choose an empty folder or pass overwrite")
    height, width = int(size[0]), int(size[1])
    renamed, dropped = {}, {}
    for path in sorted((src / "images").glob("*/*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = f"{path.parent.name}/{path.name}"
        with Image.open(path) as im:
            w, h = im.size
            if min(h, w) < min_side:
                dropped[rel] = [h, w]
                continue
            out = dst / "images" / path.parent.name / (path.stem + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR).save(out)
        renamed[rel] = f"{path.parent.name}/{path.stem}.png"
    counts = {}
    (dst / "labels").mkdir(parents=True, exist_ok=True)
    for label_file in sorted((src / "labels").iterdir()):
        if not _LABEL_FILE.match(label_file.name):
            continue
        lines = [ln.strip() for ln in label_file.read_text().splitlines() if ln.strip()]
        kept = [renamed[ln] for ln in lines if ln in renamed]
        unknown = [ln for ln in lines if ln not in renamed and ln not in dropped]
        if unknown:
            raise FileNotFoundError(f"{label_file} lists {len(unknown)} images that are not in "
                                    f"{src / 'images'}, e.g. {unknown[0]!r}")
        (dst / "labels" / label_file.name).write_text("".join(f"{ln}\n" for ln in kept))
        counts[label_file.name] = {"listed": len(lines), "kept": len(kept)}
    manifest = {"source": str(src), "size": [height, width], "min_side": min_side,
                "resample": RESAMPLE, "format": "png", "kept": len(renamed),
                "dropped": dropped, "label_files": counts}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("DTD preprocessing: %d images kept, %d dropped, written to %s", len(renamed),
                len(dropped), dst)
    return manifest
