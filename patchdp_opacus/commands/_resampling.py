"""CLI flags for the loader-owned resampling transforms: random scale before the crop
(``--scale-range``, ``--scale-step``), a deterministic ``--resize`` before the crop, and
RandomResizedCrop (``--resized-crop`` and its ``--resized-crop-*`` options), with the image
kernel (``--interpolation``, ``--no-antialias``).

Parsing, conflicts and building the privacy layer's transform live here; every message names
the flags.  Numbers are read as exact fractions (``0.25``, ``3/4``).  Never imports torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from fractions import Fraction

from patchdp_opacus.commands import UsageError, int_type
from patchdp_opacus.privacy import CropGeometry, RandomResizedCrop, RandomScaleCrop, Resize
from patchdp_opacus.privacy.interpolation import INTERPOLATIONS

DEFAULT_SCALE_STEP = Fraction(1, 4)
DEFAULT_RRC_SCALE = (Fraction(2, 25), Fraction(1))
DEFAULT_RRC_RATIO = (Fraction(3, 4), Fraction(4, 3))
DEFAULT_RRC_GRID = (8, 5)


def positive_fraction(text: str) -> Fraction:
    """A positive finite number, exactly: ``0.25``, ``2``, ``3/4``."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.5 or 3/4, got {text!r}") \
            from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


_count = int_type(1, "a count")
_pixels = int_type(1, "pixels")


def _num(x: Fraction) -> str:
    return str(x) if x.denominator > 1000 else f"{float(x):g}"


def add_resampling_flags(parser) -> None:
    g = parser.add_argument_group(
        "loader-owned resampling (the private region stays in stored-image pixels; p uses each "
        "output's source footprint, kernel support included)")
    g.add_argument("--scale-range", nargs=2, type=positive_fraction, metavar=("MIN", "MAX"),
                   help="random scale before the crop: resize the image by s, drawn uniformly "
                        "from MIN, MIN+STEP, ... <= MAX, then pad and crop --crop-size")
    g.add_argument("--scale-step", type=positive_fraction, metavar="STEP",
                   help=f"grid step of --scale-range (default: {_num(DEFAULT_SCALE_STEP)})")
    g.add_argument("--resize", nargs=2, type=_pixels, metavar=("H", "W"),
                   help="deterministic resize of every image to HxW before the random crop")
    g.add_argument("--resized-crop", nargs=2, type=_pixels, metavar=("H", "W"),
                   help="RandomResizedCrop to HxW instead of --crop-size: a box of random area "
                        "and aspect ratio, uniformly placed, resized to HxW")
    g.add_argument("--resized-crop-scale", nargs=2, type=positive_fraction,
                   metavar=("MIN", "MAX"),
                   help="box area as a fraction of the image (default: 0.08 1)")
    g.add_argument("--resized-crop-ratio", nargs=2, type=positive_fraction,
                   metavar=("MIN", "MAX"),
                   help="box aspect ratio width/height, log-uniform (default: 3/4 4/3)")
    g.add_argument("--resized-crop-grid", nargs=2, type=_count, metavar=("AREAS", "RATIOS"),
                   help="number of areas x ratios in the finite grid drawn from (default: 8 5)")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear",
                   help="image kernel of the resize (masks always use nearest)")
    g.add_argument("--no-antialias", action="store_true",
                   help="resize without antialiasing (torchvision's antialias=False)")


@dataclass(frozen=True)
class Resampling:
    """What the resampling flags ask for; :meth:`build` makes the privacy layer's transform."""

    kind: str                 # "scale", "resize" or "resized-crop"
    flags: str                # the flags as typed, for messages
    scales: tuple = ()
    resize: tuple = ()
    size: tuple = ()
    area: tuple = DEFAULT_RRC_SCALE
    ratio: tuple = DEFAULT_RRC_RATIO
    grid: tuple = DEFAULT_RRC_GRID
    interpolation: str = "bilinear"
    antialias: bool = True

    @property
    def replaces_crop(self) -> bool:
        return self.kind == "resized-crop"

    def build(self, crop: CropGeometry | None):
        kernel = {"interpolation": self.interpolation, "antialias": self.antialias}
        try:
            if self.kind == "scale":
                return RandomScaleCrop(crop, self.scales, **kernel)
            if self.kind == "resize":
                return Resize(self.resize, crop=crop, **kernel)
            return RandomResizedCrop(self.size, self.area, self.ratio, self.grid, **kernel)
        except ValueError as exc:
            raise UsageError(f"{self.flags}: {exc}") from None


def _text(values) -> str:
    return " ".join(_num(v) if isinstance(v, Fraction) else str(v) for v in values)


def resampling_from_args(args, *, scales=None, scales_flag: str = "") -> Resampling | None:
    """The requested resampling, or None for a plain crop.  ``scales`` overrides
    ``--scale-range`` (``sweep scale``; ``scales_flag`` names them in messages).  Conflicting
    flags raise :class:`UsageError`."""
    scale_range = getattr(args, "scale_range", None)
    rrc = getattr(args, "resized_crop", None)
    rrc_options = {"--resized-crop-scale": args.resized_crop_scale,
                   "--resized-crop-ratio": args.resized_crop_ratio,
                   "--resized-crop-grid": args.resized_crop_grid}
    kernel = {"interpolation": args.interpolation, "antialias": not args.no_antialias}
    chosen = [name for name, value in (("--scale-range", scale_range or scales),
                                       ("--resize", args.resize), ("--resized-crop", rrc))
              if value]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} cannot be combined: choose one resampling")
    if args.scale_step is not None and not (scale_range or scales):
        raise UsageError("--scale-step needs --scale-range")
    for name, value in rrc_options.items():
        if value is not None and not rrc:
            raise UsageError(f"{name} needs --resized-crop")
    if not chosen:
        if args.interpolation != "bilinear" or args.no_antialias:
            raise UsageError("--interpolation/--no-antialias need a resampling: --scale-range, "
                             "--resize or --resized-crop")
        return None
    if rrc:
        if args.crop_size is not None:
            raise UsageError("--resized-crop replaces --crop-size: give one of them")
        if (args.padding or [0, 0]) != [0, 0] or args.pad_if_needed:
            raise UsageError("--padding/--pad-if-needed do not apply to --resized-crop (its box "
                             "lies inside the image)")
        flags = _flags("--resized-crop", rrc, rrc_options)
        return Resampling("resized-crop", flags, size=tuple(rrc),
                          area=tuple(args.resized_crop_scale or DEFAULT_RRC_SCALE),
                          ratio=tuple(args.resized_crop_ratio or DEFAULT_RRC_RATIO),
                          grid=tuple(args.resized_crop_grid or DEFAULT_RRC_GRID), **kernel)
    if args.resize:
        return Resampling("resize", f"--resize {_text(args.resize)}", resize=tuple(args.resize),
                          **kernel)
    if scales is None:
        lo, hi = scale_range
        step = args.scale_step if args.scale_step is not None else DEFAULT_SCALE_STEP
        flags = f"--scale-range {_text(scale_range)}" + (
            f" --scale-step {_num(args.scale_step)}" if args.scale_step is not None else "")
        if lo > hi:
            raise UsageError(f"{flags}: MIN must not exceed MAX")
        scales = scale_grid_or_error(lo, hi, step, flags)
    else:
        flags = scales_flag or "--values " + " ".join(_num(s) for s in scales)
    return Resampling("scale", flags, scales=tuple(scales), **kernel)


def scale_grid_or_error(lo, hi, step, flags: str) -> tuple:
    from patchdp_opacus.privacy.geometric import scale_grid

    try:
        return scale_grid((lo, hi), step)
    except ValueError as exc:
        raise UsageError(f"{flags}: {exc}") from None


def _flags(name, value, options) -> str:
    parts = [f"{name} {_text(value)}"]
    parts += [f"{k} {_text(v)}" for k, v in options.items() if v is not None]
    return " ".join(parts)


def parse_scale_range_value(text: str, step: Fraction) -> tuple[Fraction, ...]:
    """``sweep scale --values``: ``S`` (one scale) or ``MIN-MAX`` / ``MIN:MAX`` (the grid with
    ``step``)."""
    parts = text.replace(":", "-").split("-")
    try:
        values = [positive_fraction(p) for p in parts]
    except argparse.ArgumentTypeError:
        values = []
    if len(values) not in (1, 2) or (len(values) == 2 and values[0] > values[1]):
        raise UsageError(f"--values {text}: expected a scale S or a range MIN-MAX of positive "
                         f"numbers (MIN <= MAX)")
    if len(values) == 1:
        return (values[0],)
    return scale_grid_or_error(values[0], values[1], step, f"--values {text}")


def describe_geometry(spec) -> str:
    """One line: the transform (or crop), padding included, for text output and titles."""
    return spec.describe_geometry()


def short_geometry(spec) -> str:
    """A few words for figure titles: ``crop HxW`` or the transform's description."""
    crop = spec.crop
    if isinstance(crop, CropGeometry):
        return f"crop {crop.crop_size[0]}x{crop.crop_size[1]}"
    return crop.describe()
