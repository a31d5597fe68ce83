"""Deterministic synthetic street scenes with private regions (no download).

Each sample is drawn lazily from ``(seed, split, index)``: sky, buildings with
windows, trees, a tiled sidewalk, a road, cars with number plates and people
with faces, labelled with Cityscapes trainIds (road 0, sidewalk 1, building 2,
vegetation 8, sky 10, person 11, car 13). Every class has its own colour range
and texture plus Gaussian pixel noise, so a small model learns it quickly.

Number plates and faces are the *private regions*: axis-aligned boxes
``(y, x, h, w)`` (top-left row/column, height/width in pixels), each no larger
than ``max_private_patch`` = (h, w). Plate pixels have the colours
:data:`PLATE_COLOUR` / :data:`GLYPH_COLOUR`, face pixels one of
:data:`SKIN_COLOURS`; these colours occur nowhere else (before noise).
Private regions never overlap other objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import CITYSCAPES_CLASSES, SegmentationDataset, Transform, image_to_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "GLYPH_COLOUR",
    "PLATE_COLOUR",
    "SKIN_COLOURS",
    "SceneLayout",
    "SyntheticStreetScenes",
]

ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 8, 10, 11, 13

PLATE_COLOUR = (242, 242, 236)
GLYPH_COLOUR = (24, 26, 38)
SKIN_COLOURS = ((233, 190, 160), (198, 140, 105), (141, 85, 56))
HAIR_COLOUR = (52, 38, 30)
_ROAD_COLOUR = (88, 88, 94)
_SIDEWALK_COLOUR = (176, 160, 150)
_VEGETATION_COLOUR = (62, 122, 48)
_SKY_TOP, _SKY_BOTTOM = (100, 160, 225), (175, 210, 240)
_BUILDING_COLOURS = ((196, 176, 134), (150, 82, 62), (118, 128, 150), (214, 204, 178), (160, 150, 140))
_CAR_COLOURS = ((178, 32, 30), (38, 62, 160), (168, 170, 178), (224, 224, 214), (206, 176, 38), (34, 34, 40))
_CAR_WINDOW = (58, 78, 98)
_WHEEL = (16, 16, 16)
_CLOTHES = ((200, 60, 60), (60, 90, 190), (70, 150, 80), (220, 200, 60), (120, 60, 140), (230, 120, 40))
_TROUSERS = (44, 44, 66)

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class SceneLayout:
    """The random draws of one scene (everything except pixel noise).

    Boxes are (y, x, h, w) in pixels; ``private_regions`` and
    ``private_kinds`` ("plate" or "face") are parallel lists.
    """

    horizon: int
    sidewalk_top: int
    road_top: int
    buildings: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (top, x0, x1, colour, window)
    trees: list[tuple[int, int, int, int]] = field(default_factory=list)  # (cy, cx, ry, rx)
    people: list[dict] = field(default_factory=list)
    cars: list[dict] = field(default_factory=list)
    private_regions: list[tuple[int, int, int, int]] = field(default_factory=list)
    private_kinds: list[str] = field(default_factory=list)


def _place_row(rng: np.random.Generator, widths: list[int], width: int, margin: int) -> list[int]:
    """Left x of non-overlapping objects along a row (objects that do not fit are dropped: -1)."""
    xs = []
    cursor = int(rng.integers(0, max(1, width // 8)))
    for w in widths:
        cursor += int(rng.integers(0, max(1, width // 10)))
        if cursor + w > width:
            xs.append(-1)
            continue
        xs.append(cursor)
        cursor += w + margin
    return xs


class SyntheticStreetScenes(SegmentationDataset):
    """Synthetic street scenes in Cityscapes trainIds, generated per index.

    Args:
        root: ignored (registry compatibility).
        split: "train", "val" or "test": different streams of scenes.
        num_samples: dataset length.
        image_size: (height, width) in pixels, at least (32, 64).
        seed: base seed; the same (seed, split, index) always gives the same sample.
        max_private_patch: (h, w) in pixels; every plate/face box fits in it.
        noise_std: std of the Gaussian pixel noise (pixel units); 0 disables it.
        max_cars, max_people: upper bounds on objects per scene (at least one
            of each is drawn when it fits).
        transform: optional ``(image, mask) -> (image, mask)``.
    """

    class_names = CITYSCAPES_CLASSES

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        num_samples: int = 64,
        image_size: tuple[int, int] = (128, 256),
        seed: int = 0,
        max_private_patch: tuple[int, int] = (10, 10),
        noise_std: float = 8.0,
        max_cars: int = 3,
        max_people: int = 4,
        transform: Optional[Transform] = None,
    ) -> None:
        super().__init__(transform)
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(_SPLIT_CODES)}")
        h, w = (int(v) for v in image_size)
        if h < 32 or w < 64:
            raise ValueError(f"image_size must be at least (32, 64), got {image_size}")
        kh, kw = (int(v) for v in max_private_patch)
        if kh < 1 or kw < 1:
            raise ValueError(f"max_private_patch must be positive, got {max_private_patch}")
        if num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        self.split = split
        self.image_size = (h, w)
        self.seed = int(seed)
        self.max_private_patch = (kh, kw)
        self.noise_std = float(noise_std)
        self.max_cars = int(max_cars)
        self.max_people = int(max_people)
        self._sizes = [(h, w)] * int(num_samples)

    # -- random draws -----------------------------------------------------

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_CODES[self.split], int(index), stream]))

    def layout(self, index: int) -> SceneLayout:
        """The scene's geometry and private regions, without rendering pixels."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        rng = self._rng(index, 0)
        H, W = self.image_size
        kh, kw = self.max_private_patch
        horizon = int(H * rng.uniform(0.33, 0.42))
        sidewalk_top = int(H * rng.uniform(0.56, 0.62))
        road_top = sidewalk_top + max(3, int(H * rng.uniform(0.08, 0.12)))
        lay = SceneLayout(horizon=horizon, sidewalk_top=sidewalk_top, road_top=road_top)

        x = 0
        while x < W:
            bw = int(rng.integers(W // 10, W // 4 + 1))
            top = int(rng.integers(int(H * 0.06), max(int(H * 0.06) + 1, horizon)))
            if rng.random() < 0.8:  # else a gap showing sky
                lay.buildings.append((top, x, min(W, x + bw), int(rng.integers(len(_BUILDING_COLOURS))), int(rng.integers(5, 9))))
            x += bw
        for _ in range(int(rng.integers(1, 4))):
            ry = int(rng.integers(max(2, H // 16), max(3, H // 7)))
            rx = int(ry * rng.uniform(0.8, 1.4))
            cy = sidewalk_top - ry - 1
            cx = int(rng.integers(0, W))
            lay.trees.append((cy, cx, ry, rx))

        # people on the sidewalk: feet inside the sidewalk band, never overlapping
        n_people = int(rng.integers(1, self.max_people + 1)) if self.max_people > 0 else 0
        heights = [int(H * rng.uniform(0.18, 0.27)) for _ in range(n_people)]
        widths = [max(3, int(h * rng.uniform(0.3, 0.38))) for h in heights]
        for h, w, x0 in zip(heights, widths, _place_row(rng, widths, W, 2)):
            if x0 < 0:
                continue
            feet = int(rng.integers(sidewalk_top + 1, road_top))
            top = feet - h
            head_h = max(3, int(h * 0.24))
            face_h = min(kh, head_h - 1)
            face_w = min(kw, max(2, int(w * 0.6)))
            face_y = top + (head_h - face_h)
            face_x = x0 + (w - face_w) // 2
            lay.people.append({
                "top": top, "x": x0, "h": h, "w": w, "head_h": head_h,
                "clothes": int(rng.integers(len(_CLOTHES))), "skin": int(rng.integers(len(SKIN_COLOURS))),
                "face": (face_y, face_x, face_h, face_w),
            })
            lay.private_regions.append((face_y, face_x, face_h, face_w))
            lay.private_kinds.append("face")

        # cars fully inside the road, never overlapping
        n_cars = int(rng.integers(1, self.max_cars + 1)) if self.max_cars > 0 else 0
        road_h = H - road_top
        c_heights = [max(6, min(road_h - 2, int(H * rng.uniform(0.12, 0.2)))) for _ in range(n_cars)]
        c_widths = [int(h * rng.uniform(1.8, 2.4)) for h in c_heights]
        for h, w, x0 in zip(c_heights, c_widths, _place_row(rng, c_widths, W, 3)):
            if x0 < 0 or road_h - h - 1 < 1:
                continue
            top = int(rng.integers(road_top + 1, H - h))
            plate_h = max(1, min(kh, int(round(h * 0.22))))
            plate_w = max(2, min(kw, int(round(w * 0.28))))
            plate_w = min(plate_w, w - 2)
            py = top + h - max(2, int(h * 0.22)) - plate_h
            py = max(top + h // 2, py)
            px = x0 + (w - plate_w) // 2
            lay.cars.append({"top": top, "x": x0, "h": h, "w": w, "colour": int(rng.integers(len(_CAR_COLOURS))),
                             "plate": (py, px, plate_h, plate_w)})
            lay.private_regions.append((py, px, plate_h, plate_w))
            lay.private_kinds.append("plate")
        return lay

    def private_regions(self, index: int) -> list[tuple[int, int, int, int]]:
        """Private boxes (y, x, h, w) of sample ``index`` (plates and faces)."""
        return list(self.layout(index).private_regions)

    def private_kinds(self, index: int) -> list[str]:
        """"plate" or "face" for each box of :meth:`private_regions`."""
        return list(self.layout(index).private_kinds)

    def private_mask(self, index: int) -> np.ndarray:
        """Boolean (H, W) mask of the private pixels of sample ``index``."""
        out = np.zeros(self.image_size, dtype=bool)
        for y, x, h, w in self.private_regions(index):
            out[y:y + h, x:x + w] = True
        return out

    # -- rendering --------------------------------------------------------

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3), mask uint8 (H, W)) of sample ``index``."""
        lay = self.layout(index)
        rng = self._rng(index, 1)
        H, W = self.image_size
        img = np.empty((H, W, 3), dtype=np.float32)
        mask = np.empty((H, W), dtype=np.uint8)
        rows = np.arange(H)[:, None]
        cols = np.arange(W)[None, :]

        # sky gradient over the whole upper part
        t = np.clip(rows / max(1, lay.sidewalk_top), 0, 1)[..., None]
        img[:] = (1 - t) * np.array(_SKY_TOP) + t * np.array(_SKY_BOTTOM)
        mask[:] = SKY
        for top, x0, x1, colour, period in lay.buildings:
            base = np.array(_BUILDING_COLOURS[colour], dtype=np.float32)
            img[top:lay.sidewalk_top, x0:x1] = base
            mask[top:lay.sidewalk_top, x0:x1] = BUILDING
            r = rows[top + 2:lay.sidewalk_top - 2] - top
            c = cols[:, x0 + 1:x1 - 1] - x0
            windows = ((r % period) < period // 2) & ((c % period) < period // 2) & (r > 0) & (c > 0)
            region = img[top + 2:lay.sidewalk_top - 2, x0 + 1:x1 - 1]
            region[windows] = base * 0.45
        for cy, cx, ry, rx in lay.trees:
            y0, y1 = max(0, cy - ry), min(lay.sidewalk_top, cy + ry + 1)
            x0, x1 = max(0, cx - rx), min(W, cx + rx + 1)
            inside = ((rows[y0:y1] - cy) / ry) ** 2 + ((cols[:, x0:x1] - cx) / rx) ** 2 <= 1.0
            leaf = np.array(_VEGETATION_COLOUR, dtype=np.float32) + rng.normal(0, 18, size=(y1 - y0, x1 - x0, 1)) * np.array([0.6, 1.0, 0.5])
            img[y0:y1, x0:x1][inside] = leaf[inside]
            mask[y0:y1, x0:x1][inside] = VEGETATION
        # sidewalk with tile joints, road with fine grain
        sw = img[lay.sidewalk_top:lay.road_top]
        sw[:] = _SIDEWALK_COLOUR
        joints = ((rows[lay.sidewalk_top:lay.road_top] % 5) == 0) | ((cols % 9) == 0)
        sw[joints] = np.array(_SIDEWALK_COLOUR) * 0.8
        mask[lay.sidewalk_top:lay.road_top] = SIDEWALK
        img[lay.road_top:] = np.array(_ROAD_COLOUR, dtype=np.float32) + rng.normal(0, 6, size=(H - lay.road_top, W, 1))
        mask[lay.road_top:] = ROAD

        for p in lay.people:
            top, x0, h, w, hh = p["top"], p["x"], p["h"], p["w"], p["head_h"]
            legs = top + hh + (h - hh) // 2
            img[top:top + hh, x0:x0 + w] = HAIR_COLOUR
            img[top + hh:legs, x0:x0 + w] = _CLOTHES[p["clothes"]]
            img[legs:top + h, x0:x0 + w] = _TROUSERS
            mask[top:top + h, x0:x0 + w] = PERSON
            fy, fx, fh, fw = p["face"]
            img[fy:fy + fh, fx:fx + fw] = SKIN_COLOURS[p["skin"]]
        for c in lay.cars:
            top, x0, h, w = c["top"], c["x"], c["h"], c["w"]
            img[top:top + h, x0:x0 + w] = _CAR_COLOURS[c["colour"]]
            win_h = max(1, h // 3)
            img[top + 1:top + win_h, x0 + w // 5:x0 + w - w // 5] = _CAR_WINDOW
            wheel = max(2, h // 4)
            img[top + h - wheel:top + h, x0 + 1:x0 + 1 + wheel] = _WHEEL
            img[top + h - wheel:top + h, x0 + w - 1 - wheel:x0 + w - 1] = _WHEEL
            mask[top:top + h, x0:x0 + w] = CAR
            py, px, ph, pw = c["plate"]
            plate = img[py:py + ph, px:px + pw]
            plate[:] = PLATE_COLOUR
            if ph >= 3 and pw >= 4:  # glyphs: every other column of the inner rows
                plate[1:ph - 1, 1:pw - 1:2] = GLYPH_COLOUR

        if self.noise_std > 0:
            img += rng.normal(0.0, self.noise_std, size=img.shape)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return image, mask

    def record_key(self, index: int) -> tuple:
        """A scene is its (seed, split, index): two instances with those equal draw the same
        scene (and the same private regions), whatever their other arguments."""
        return ("synthetic", self.seed, self.split, int(index))

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.render(index)
        return image_to_tensor(image), torch.from_numpy(mask.astype(np.int64))
