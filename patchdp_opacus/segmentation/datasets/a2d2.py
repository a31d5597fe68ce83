"""A2D2 (Audi Autonomous Driving Dataset), camera_lidar_semantic, front camera.

Layout expected under ``root`` (the official ``camera_lidar_semantic`` folder)::

    class_list.json                      # {"#rrggbb": "Car 1", ...} (55 classes)
    {session}/camera/cam_front_center/{ts}_camera_frontcenter_{id}.png
    {session}/label/cam_front_center/{ts}_label_frontcenter_{id}.png   # RGB colour-coded

Labels are colour-coded; each colour is mapped to its class name through
``class_list.json`` and each class name to one of 18 Cityscapes-like groups
through ``a2d2_groups.json`` (shipped with the package; see its "description"
for the choices). Colours not in ``class_list.json``, classes listed as ignored
("Blurred area" = anonymisation, "Ego car", "Rain dirt") and unknown class
names map to 255. Images are 1208x1920 (H x W) in the official release.

The paper's session split is :data:`A2D2_SPLITS`.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .base import IGNORE_INDEX, SegmentationDataset, Transform, image_to_tensor, read_size

logger = logging.getLogger(__name__)

__all__ = ["A2D2", "A2D2_SPLITS", "ColourLookup", "load_a2d2_groups", "normalise_class_name"]

#: Session split used in the paper (train 18557 images).
A2D2_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "20181107_132730", "20181108_091945", "20181107_133258", "20181108_084007",
        "20180807_145028", "20180810_142822", "20180925_135056", "20181008_095521",
        "20181107_132300", "20181204_154421", "20181204_170238",
    ),
    "val": ("20180925_101535", "20181016_125231", "20181204_135952"),
    "test": ("20180925_124435", "20181108_123750", "20181108_103155"),
}

CAMERA = "cam_front_center"
IMAGE_TAG = "_camera_frontcenter_"
LABEL_TAG = "_label_frontcenter_"
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


def normalise_class_name(name: str) -> str:
    """Case-folded name with whitespace collapsed and a trailing instance number removed."""
    name = " ".join(name.strip().split()).casefold()
    return re.sub(r"\s+\d+$", "", name)


def load_a2d2_groups(path: str | Path | None = None) -> dict[str, Any]:
    """Load a grouping file (default: the packaged ``a2d2_groups.json``).

    Returns the parsed JSON: ``{"groups": [...], "classes": {name: group},
    "ignore": [names], "description": str}``.

    Raises:
        ValueError: a class maps to a group not listed in "groups".
    """
    if path is None:
        text = resources.files(__package__).joinpath("a2d2_groups.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    spec = json.loads(text)
    unknown = sorted(set(spec["classes"].values()) - set(spec["groups"]))
    if unknown:
        raise ValueError(f"grouping maps classes to undeclared groups: {unknown}")
    return spec


class ColourLookup:
    """Vectorised RGB colour -> class id lookup (unknown colours -> 255).

    Args:
        colour_to_id: mapping from (r, g, b) to an id in 0..255.
    """

    def __init__(self, colour_to_id: dict[tuple[int, int, int], int]) -> None:
        codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colour_to_id], dtype=np.int64)
        ids = np.array(list(colour_to_id.values()), dtype=np.uint8)
        order = np.argsort(codes)
        self.codes = codes[order]
        self.ids = ids[order]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 array -> (H, W) uint8 ids."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
        rgb = rgb.astype(np.int64)
        query = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        if self.codes.size == 0:
            return np.full(query.shape, IGNORE_INDEX, dtype=np.uint8)
        pos = np.clip(np.searchsorted(self.codes, query), 0, self.codes.size - 1)
        hit = self.codes[pos] == query
        return np.where(hit, self.ids[pos], np.uint8(IGNORE_INDEX)).astype(np.uint8)


def _parse_colour(key: str, where: Path) -> tuple[int, int, int]:
    m = _HEX.match(key.strip())
    if not m:
        raise ValueError(f"{where}: {key!r} is not a '#rrggbb' colour")
    v = int(m.group(1), 16)
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


class A2D2(SegmentationDataset):
    """A2D2 semantic segmentation, front-centre camera, 18 groups.

    Args:
        root: the ``camera_lidar_semantic`` folder (with ``class_list.json``).
        split: "train", "val" or "test" (sessions of :data:`A2D2_SPLITS`);
            ignored when ``sessions`` is given.
        sessions: explicit list of session folder names.
        groups: path of an alternative grouping JSON (same format as the
            packaged ``a2d2_groups.json``), or None for the packaged one.
        transform: optional ``(image, mask) -> (image, mask)``.

    Samples are ``(image uint8 (3, H, W), mask int64 (H, W))`` at full
    resolution; mask ids index :attr:`class_names` (the 18 groups) or are 255.

    Raises:
        FileNotFoundError: missing root, ``class_list.json`` or session folder,
            no images, or an image without label file (paths named).
        ValueError: malformed ``class_list.json``, unknown split, label size ≠
            image size (paths named).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        sessions: Optional[Sequence[str]] = None,
        groups: str | Path | None = None,
        transform: Optional[Transform] = None,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"A2D2 root folder does not exist: {self.root}")
        if sessions is None:
            if split not in A2D2_SPLITS:
                raise ValueError(f"unknown A2D2 split {split!r}; use one of {sorted(A2D2_SPLITS)} or pass sessions=")
            sessions = A2D2_SPLITS[split]
        self.sessions = tuple(sessions)
        spec = load_a2d2_groups(groups)
        self.class_names = tuple(spec["groups"])
        self.lookup, self.colour_names = self._build_lookup(spec)

        images: list[Path] = []
        for session in self.sessions:
            cam_dir = self.root / session / "camera" / CAMERA
            if not cam_dir.is_dir():
                raise FileNotFoundError(f"A2D2 session folder does not exist: {cam_dir}")
            images.extend(sorted(cam_dir.glob(f"*{IMAGE_TAG}*.png")))
        if not images:
            raise FileNotFoundError(
                f"A2D2 {split!r}: no *{IMAGE_TAG}*.png images under {self.root}/<session>/camera/{CAMERA} "
                f"for sessions {list(self.sessions)}"
            )
        labels = [
            im.parent.parent.parent / "label" / CAMERA / im.name.replace(IMAGE_TAG, LABEL_TAG) for im in images
        ]
        missing = [(im, lb) for im, lb in zip(images, labels) if not lb.is_file()]
        if missing:
            listing = "\n".join(f"  {im} -> expected {lb}" for im, lb in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise FileNotFoundError(f"{len(missing)} A2D2 images have no label file:\n{listing}{more}")
        self.images, self.labels = images, labels
        for im, lb in zip(images, labels):
            size, lsize = read_size(im), read_size(lb)
            if size != lsize:
                raise ValueError(f"label size {lsize} (H, W) of {lb} differs from image size {size} of {im}")
            self._sizes.append(size)
        logger.info("A2D2 %s: %d images from %d sessions, sizes %s", split, len(images), len(self.sessions), sorted(self.image_sizes))

    def _build_lookup(self, spec: dict[str, Any]) -> tuple[ColourLookup, dict[tuple[int, int, int], str]]:
        class_file = self.root / "class_list.json"
        if not class_file.is_file():
            raise FileNotFoundError(f"A2D2 class list not found: {class_file}")
        try:
            raw = json.loads(class_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{class_file} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{class_file} must map '#rrggbb' colours to class names")
        group_index = {g: i for i, g in enumerate(spec["groups"])}
        name_to_group = {normalise_class_name(k): group_index[v] for k, v in spec["classes"].items()}
        ignored = {normalise_class_name(n) for n in spec.get("ignore", [])}
        table: dict[tuple[int, int, int], int] = {}
        names: dict[tuple[int, int, int], str] = {}
        unknown = []
        for key, name in raw.items():
            colour = _parse_colour(key, class_file)
            base = normalise_class_name(str(name))
            names[colour] = str(name)
            if base in name_to_group:
                table[colour] = name_to_group[base]
            elif base not in ignored:
                unknown.append(str(name))
        if unknown:
            logger.warning("A2D2 classes without a group, mapped to %d: %s", IGNORE_INDEX, ", ".join(sorted(unknown)))
        return ColourLookup(table), names

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        im_path, lb_path = self.images[index], self.labels[index]
        with Image.open(im_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(lb_path) as lb:
            if lb.mode not in ("RGB", "RGBA"):
                raise ValueError(f"label file {lb_path} has mode {lb.mode!r}; expected a colour-coded RGB PNG")
            label = np.asarray(lb.convert("RGB"))
        if label.shape[:2] != image.shape[:2]:
            raise ValueError(f"label size {label.shape[:2]} of {lb_path} differs from image size {image.shape[:2]} of {im_path}")
        mask = self.lookup(label)
        return image_to_tensor(image), torch.from_numpy(mask.astype(np.int64))
