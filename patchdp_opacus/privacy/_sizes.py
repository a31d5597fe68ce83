"""Sizes in pixels: ``(height, width)`` pairs and lists of them.

A leaf module (numpy only) shared by :mod:`.regions`, :mod:`.geometry` and the footprint
modules, so that none of them has to import another just to read a size.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

Size = tuple[int, int]


def _pair(value, name: str) -> Size:
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}") from None
    return h, w


def as_size(value, name: str = "size", *, minimum: int = 1) -> Size:
    """Normalise an int or ``(height, width)`` pair and check both sides are >= ``minimum``."""
    h, w = _pair(value, name)
    if h < minimum or w < minimum:
        raise ValueError(f"{name} must be >= {minimum} on both sides, got (height={h}, width={w})")
    return h, w


def as_size_list(image_sizes) -> list[Size]:
    """One ``(H, W)`` (an int, a pair) or an iterable of them -> sorted list of distinct sizes."""
    if isinstance(image_sizes, (int, np.integer)):
        return [as_size(image_sizes, "image_size")]
    items = list(image_sizes) if isinstance(image_sizes, Iterable) else [image_sizes]
    if len(items) == 2 and all(isinstance(v, (int, np.integer)) for v in items):
        return [as_size(tuple(items), "image_size")]
    if not items:
        raise ValueError("image_sizes is empty: declare at least one (height, width)")
    return sorted({as_size(s, "image_size") for s in items})
