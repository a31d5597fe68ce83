"""``patchdp epsilon | noise | profile | sweep``: the privacy of a DP-SGD training setting.

Every privacy number printed here comes from :mod:`patchdp_opacus.privacy` (inclusion
probability, Theorem-2 accounting, baselines); this module only parses flags, checks them with
messages that name the flag, and formats the results.  Imports numpy, scipy and dp-accounting
(through the privacy layer), never torch; matplotlib only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from fractions import Fraction

from patchdp_opacus.commands import HelpFormatter, UsageError, _resampling, int_type
from patchdp_opacus.privacy import (
    DEFAULT_DISCRETIZATION,
    CropGeometry,
    PatchDPSGD,
    PatchPrivacySpec,
    calibrate_noise,
    data_level_profile,
    epsilon,
    gaussian_augmentation_tv,
    group_epsilon,
    make_region,
    privacy_profile,
)
from patchdp_opacus.privacy.accounting import (
    NO_AMPLIFICATION_WARNING,
    OPACUS_RELATION,
    add_remove_poisson_epsilon,
    steps_per_epoch,
)
from patchdp_opacus.privacy.regions import SHAPES

SWEEPS = ("crop", "patch", "padding", "noise", "resolution", "scale")
DEFAULT_SIGMA_DATA = 5000.0
DEFAULT_EPSILON_RANGE = (0.0, 50.0, 201)
#: Lowest delta shown in profile figures (smaller values only squash the DP-SGD curves).
_PROFILE_FLOOR = 1e-16


# --------------------------------------------------------------------------- argument types

def _positive_float(unit: str):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({unit}), got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive finite number ({unit}), "
                                             f"got {text}")
        return value
    return parse


def _delta_type(text):
    """A probability in (0, 1), as a decimal or a fraction such as ``1/2975``."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 1/2975, "
                                         f"got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (per run), got {text}")
    return float(value)


_pixels = int_type(1, "pixels")
_padding_pixels = int_type(0, "pixels")
_count = int_type(1, "a count")


# --------------------------------------------------------------------------- parser

def _add_geometry(parser, *, sweep: bool = False) -> None:
    g = parser.add_argument_group("crop geometry (pixels, height then width)")
    g.add_argument("--image-size", nargs=2, type=_pixels, action="append", metavar=("H", "W"),
                   required=not sweep,
                   help="training image size; repeat it for a data set with several sizes "
                        "(p is the worst case over them)")
    g.add_argument("--crop-size", nargs=2, type=_pixels, metavar=("H", "W"),
                   help="random crop applied in training (origin uniform over the padded image); "
                        "required unless --resized-crop")
    g.add_argument("--patch-size", nargs=2, type=_pixels, metavar=("H", "W"), required=not sweep,
                   help="bounding box of the private region, protected at any placement inside "
                        "the image (a circle has diameter min(H, W))")
    g.add_argument("--patch-shape", choices=SHAPES, default="rectangle",
                   help="shape of the private region inside its bounding box")
    g.add_argument("--padding", nargs=2, type=_padding_pixels, metavar=("PH", "PW"),
                   default=None if sweep else [0, 0],
                   help="constant padding before the crop: PH rows above and below, PW columns "
                        "left and right" + (" (default: 0 0)" if sweep else ""))
    g.add_argument("--pad-if-needed", action="store_true",
                   help="pad a side still shorter than the crop, symmetrically, up to the crop "
                        "size")
    _resampling.add_resampling_flags(parser)


def _add_group(parser) -> None:
    parser.add_argument("--group-size", type=_count, default=1, metavar="K",
                        help="protect K private regions of one image by group privacy "
                             "(patch-level epsilon only; record level covers the whole image)")


def _add_training(parser) -> None:
    g = parser.add_argument_group("training schedule")
    g.add_argument("--dataset-size", type=_count, required=True, metavar="N",
                   help="number of training images")
    g.add_argument("--batch-size", type=_count, required=True, metavar="B",
                   help="fixed logical batch size, batches drawn uniformly without replacement "
                        "(sampling rate q = B/N)")
    length = g.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=_count, metavar="E",
                        help="training epochs; steps = E x round(N/B), halves rounded up")
    length.add_argument("--steps", type=_count, metavar="T", help="logical DP-SGD steps")


def _privacy_group(parser):
    g = parser.add_argument_group("privacy accounting")
    g.add_argument("--discretization", type=_positive_float("nats"), metavar="NATS",
                   default=DEFAULT_DISCRETIZATION,
                   help="PLD discretization; coarser (1e-3) is faster and still an upper bound")
    return g


def _add_noise(parser) -> None:
    parser.add_argument("--noise-multiplier", type=_positive_float("noise std = z*C"),
                        required=True, metavar="Z",
                        help="Opacus noise multiplier z: noise std = z*C for clip norm C")


def _add_delta(parser, required: bool = True) -> None:
    parser.add_argument("--delta", type=_delta_type, required=required, metavar="D",
                        help="target delta of the whole run, e.g. 1/N (decimal or fraction)")


def _add_json(parser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of text")


def register(subparsers) -> None:
    """Add ``epsilon``, ``noise``, ``profile`` and ``sweep`` to the ``patchdp`` parser."""
    common = dict(formatter_class=HelpFormatter)

    p = subparsers.add_parser(
        "epsilon", **common, help="patch-level and record-level epsilon of a run",
        description="Patch-level epsilon (Theorem 2, w = q*p) of DP-SGD with random crops, beside "
                    "the record-level epsilon of the same run (p = 1). Epsilon in nats.")
    _add_geometry(p)
    _add_training(p)
    priv = _privacy_group(p)
    _add_noise(priv)
    _add_delta(priv)
    _add_group(priv)
    _add_json(p)
    p.set_defaults(handler=cmd_epsilon)

    p = subparsers.add_parser(
        "noise", **common, help="noise multiplier for a target epsilon",
        description="Smallest noise multiplier z (noise std = z*C) reaching a target epsilon, "
                    "calibrated for patch-level and for record-level privacy.")
    _add_geometry(p)
    _add_training(p)
    priv = _privacy_group(p)
    priv.add_argument("--target-epsilon", type=_positive_float("nats"), required=True,
                      metavar="E", help="target epsilon of the whole run")
    _add_delta(priv)
    priv.add_argument("--tolerance", type=_positive_float("relative"), default=1e-3,
                   help="relative precision of the calibrated z (the returned z always meets "
                        "the target)")
    _add_json(p)
    p.set_defaults(handler=cmd_noise)

    p = subparsers.add_parser(
        "profile", **common, help="privacy profiles delta(epsilon) with baselines",
        description="delta(epsilon) of the whole run for record-level DP-SGD, patch-level DP-SGD "
                    "and the data-level noise baseline (optionally Gaussian-noise augmentation).")
    _add_geometry(p)
    _add_training(p)
    _add_noise(_privacy_group(p))
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--epsilon-range", nargs=3, type=float, metavar=("MIN", "MAX", "NUM"),
                      default=list(DEFAULT_EPSILON_RANGE),
                      help="epsilon grid (nats): NUM evenly spaced values from MIN to MAX")
    grid.add_argument("--epsilons", nargs="+", type=float, metavar="EPS",
                      help="explicit epsilon grid (nats), instead of --epsilon-range")
    p.add_argument("--sigma-data", type=_positive_float("pixel units, 0-255"),
                   default=DEFAULT_SIGMA_DATA,
                   help="noise std of the data-level baseline: the image itself released once "
                        "with Gaussian noise (sensitivity 255*sqrt(channels*kh*kw))")
    p.add_argument("--sigma-aug", type=_positive_float("pixel units, 0-255"),
                   help="add the Gaussian-augmentation baseline with this input-noise std "
                        "(amplification w = q*TV instead of q*p)")
    p.add_argument("--channels", type=_count, default=3,
                   help="image channels (input sensitivity of the baselines)")
    p.add_argument("--out", metavar="FIG.png", help="write the figure here")
    _add_json(p)
    p.set_defaults(handler=cmd_profile)

    p = subparsers.add_parser(
        "sweep", **common, help="epsilon against crop, patch, padding, noise or resolution",
        description="Epsilon at --delta against one swept quantity, for one or several noise "
                    "multipliers, with the record-level epsilon for reference. Sizes in --values "
                    "are S (square) or HxW; the swept quantity's own flag is omitted.")
    p.add_argument("quantity", choices=SWEEPS,
                   help="crop: crop size; patch: private-region size; padding: padding; "
                        "noise: noise multiplier; resolution: image size; scale: random scale "
                        "range before the crop")
    p.add_argument("--values", nargs="+", required=True, metavar="V",
                   help="values of the swept quantity (sizes: S or HxW pixels; noise: z; "
                        "scale: S or MIN-MAX, grid step --scale-step)")
    p.add_argument("--noise-multipliers", nargs="+", type=_positive_float("noise std = z*C"),
                   metavar="Z", help="one curve per noise multiplier (required unless "
                                     "sweeping noise)")
    _add_geometry(p, sweep=True)
    _add_training(p)
    priv = _privacy_group(p)
    _add_delta(priv)
    _add_group(priv)
    p.add_argument("--out", metavar="FIG.png", help="write the figure here")
    _add_json(p)
    p.set_defaults(handler=cmd_sweep)


# --------------------------------------------------------------------------- setting checks

def _flag(name: str, values) -> str:
    return " ".join([name, *(str(v) for v in values)])


def _size_text(size) -> str:
    return f"{size[0]}x{size[1]}"


def _build_spec(*, shape, image_sizes, crop_size, padding, pad_if_needed, patch_size,
                group_size, names, resampling=None) -> PatchPrivacySpec:
    """The privacy layer's spec, after checks whose messages name the flags.

    ``names``: how to call each input in a message: ``patch``, ``crop``, ``padding`` (strings)
    and ``image`` (one string per image size).  ``resampling``: the loader-owned resampling
    asked for (:mod:`._resampling`), None for a plain crop."""
    try:
        region = make_region(shape, tuple(patch_size))
    except ValueError as exc:
        raise UsageError(f"{names['patch']}: {exc}") from None
    for size, name in zip(image_sizes, names["image"]):
        if region.size[0] > size[0] or region.size[1] > size[1]:
            raise UsageError(f"{names['patch']} does not fit in {name}")
    if resampling is not None:
        geometry = _resampled_geometry(resampling, crop_size, padding, pad_if_needed,
                                       image_sizes, names)
    else:
        if crop_size is None:
            raise UsageError("--crop-size is required (or --resized-crop)")
        geometry = CropGeometry(tuple(crop_size), tuple(padding), pad_if_needed)
        for size, name in zip(image_sizes, names["image"]):
            try:
                geometry.axes(size)
            except ValueError:
                raise UsageError(
                    f"{names['crop']} does not fit in {name} padded by {names['padding']}; add "
                    f"--pad-if-needed, more --padding or use a smaller crop") from None
    try:
        return PatchPrivacySpec(geometry, region, tuple(tuple(s) for s in image_sizes),
                                group_size)
    except ValueError as exc:
        raise UsageError(f"{names['patch']}: {exc}") from None


def _resampled_geometry(resampling, crop_size, padding, pad_if_needed, image_sizes, names):
    """The loader-owned transform of ``resampling`` around the crop, checked on every image
    size with a message naming the flags."""
    crop = None
    if not resampling.replaces_crop:
        if crop_size is None:
            raise UsageError(f"{resampling.flags} needs --crop-size")
        crop = CropGeometry(tuple(crop_size), tuple(padding), pad_if_needed)
    transform = resampling.build(crop)
    for size, name in zip(image_sizes, names["image"]):
        try:
            transform.validate(size)
        except ValueError as exc:
            with_crop = "" if crop is None else f" and {names['crop']}"
            why = str(exc).replace("pad_if_needed=True", "--pad-if-needed").replace(
                "smaller crop_size", "smaller --crop-size")
            raise UsageError(f"{resampling.flags}{with_crop} on {name}: {why}") from None
    return transform


def _spec_from_args(args) -> PatchPrivacySpec:
    padding = args.padding if args.padding is not None else [0, 0]
    return _build_spec(
        shape=args.patch_shape, image_sizes=args.image_size, crop_size=args.crop_size,
        padding=padding, pad_if_needed=args.pad_if_needed, patch_size=args.patch_size,
        group_size=getattr(args, "group_size", 1),
        names={"patch": _flag("--patch-size", args.patch_size),
               "crop": _flag("--crop-size", args.crop_size or ()),
               "padding": _flag("--padding", padding),
               "image": [_flag("--image-size", s) for s in args.image_size]},
        resampling=_resampling.resampling_from_args(args))


@dataclass(frozen=True)
class Schedule:
    """Fixed-size batches of B out of N without replacement; ``steps`` logical steps."""

    dataset_size: int
    batch_size: int
    steps: int
    epochs: int | None = None
    steps_per_epoch: int | None = None

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def describe(self) -> str:
        if self.epochs is None:
            return f"{self.steps}"
        unit = "epoch" if self.epochs == 1 else "epochs"
        return f"{self.steps}   ({self.epochs} {unit} x {self.steps_per_epoch} steps per epoch)"

    def to_dict(self) -> dict:
        return {"dataset_size": self.dataset_size, "batch_size": self.batch_size,
                "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "steps": self.steps}


def _schedule(args) -> Schedule:
    n, b = args.dataset_size, args.batch_size
    if b > n:
        raise UsageError(f"--batch-size {b} is larger than --dataset-size {n} (the sampling rate "
                         f"q = B/N must be <= 1)")
    if args.steps is not None:
        return Schedule(n, b, args.steps)
    per_epoch = steps_per_epoch(n, b)  # as the loader's sampler counts an epoch
    return Schedule(n, b, args.epochs * per_epoch, args.epochs, per_epoch)


def _run(z, sched: Schedule, p: float) -> PatchDPSGD:
    try:
        return PatchDPSGD(z, sched.sample_rate, p, sched.steps)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _fraction_text(frac: Fraction) -> str:
    return f"{frac.numerator}/{frac.denominator}"


def _finite(x):
    """JSON has no infinity: non-finite numbers become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def _num(x, missing: float = math.inf) -> float:
    """Back from JSON's null (an unbounded epsilon) to a float."""
    return missing if x is None else x


def _setting_payload(spec: PatchPrivacySpec, sched: Schedule, run: PatchDPSGD) -> dict:
    geometry = spec.to_dict()
    geometry["worst_image_size"] = list(spec.inclusion.image_size)
    geometry["worst_placement"] = list(spec.inclusion.placement)
    loose = getattr(spec.inclusion, "average_of_maxima", None)
    extra = {} if loose is None else {"inclusion_average_of_maxima": float(loose)}
    return {"inclusion_probability": spec.inclusion.value,
            "inclusion_fraction": _fraction_text(spec.inclusion.fraction), **extra,
            "sample_rate": run.sample_rate,
            "effective_sampling_rate": run.effective_sample_rate,
            **sched.to_dict(),
            "geometry": geometry}


def _setting_lines(spec: PatchPrivacySpec, sched: Schedule, run: PatchDPSGD) -> list[str]:
    inc = spec.inclusion
    worst = (f"worst image size {_size_text(inc.image_size)} of "
             f"{', '.join(_size_text(s) for s in spec.image_sizes)}; "
             if len(spec.image_sizes) > 1 else "")
    region = spec.region.describe()
    pixels = "padded" if isinstance(spec.crop, CropGeometry) else "stored-image"
    return [
        f"p = {inc.value:.6g} = {_fraction_text(inc.fraction)}   ({worst}worst placement: region "
        f"top-left (y, x) = {inc.placement} in {pixels} pixels)",
        f"region: {region['shape']} in a {_size_text(region['size'])} box, {region['pixels']} "
        f"pixels; {_resampling.describe_geometry(spec)}",
        f"q = B/N = {sched.batch_size}/{sched.dataset_size} = {run.sample_rate:.6g}",
        f"w = q*p = {run.effective_sample_rate:.6g}   (effective sampling rate)",
        f"steps = {sched.describe()}",
    ]


def _emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, allow_nan=False))
    else:
        print("\n".join(lines))


# --------------------------------------------------------------------------- commands

def _patch_epsilon(run: PatchDPSGD, delta: float, group_size: int, disc: float) -> float:
    if group_size == 1:
        return epsilon(run, delta, disc)
    return group_epsilon(run, delta, group_size, disc)


def cmd_epsilon(args) -> int:
    spec = _spec_from_args(args)
    sched = _schedule(args)
    run = _run(args.noise_multiplier, sched, spec.inclusion.value)
    k = spec.group_size
    eps_patch = _patch_epsilon(run, args.delta, k, args.discretization)
    eps_record = epsilon(run.record_level(), args.delta, args.discretization)
    eps_opacus = add_remove_poisson_epsilon(
        [(args.noise_multiplier, run.sample_rate, run.steps)], args.delta)
    payload = {"epsilon_patch": _finite(eps_patch), "epsilon_record": _finite(eps_record),
               **_setting_payload(spec, sched, run), "group_size": k,
               "noise_multiplier": args.noise_multiplier, "delta": args.delta,
               "discretization": args.discretization,
               "opacus_orientation": {
                   "epsilon": _finite(eps_opacus), "relation": OPACUS_RELATION,
                   "note": "for orientation only: a different neighbouring relation and "
                           "sampling scheme than both claims above"}}
    group = f", {k} regions by group privacy" if k > 1 else ""
    lines = [f"patch-level  epsilon = {eps_patch:.4f}   (delta = {args.delta:.6g} per run{group})",
             f"record-level epsilon = {eps_record:.4f}   (same run, p = 1)",
             *_setting_lines(spec, sched, run),
             f"z = {args.noise_multiplier:g}   (noise std = z*C)",
             f"for orientation, Opacus-style epsilon = {eps_opacus:.4f}   ({OPACUS_RELATION}: "
             f"a different relation and sampling, not comparable to the two claims above)"]
    if eps_patch > eps_record:
        lines.append("note: the record-level epsilon also bounds any regions of one image and is "
                     "smaller here")
    if spec.inclusion.value >= 1.0:
        payload["warning"] = NO_AMPLIFICATION_WARNING
        lines.append(f"warning: {NO_AMPLIFICATION_WARNING}")
    _emit(args, payload, lines)
    return 0


def _calibrate(args, sched: Schedule, p: float) -> float:
    try:
        return calibrate_noise(args.target_epsilon, args.delta, sched.sample_rate, p, sched.steps,
                               discretization=args.discretization, tolerance=args.tolerance)
    except ValueError as exc:
        raise UsageError(f"--target-epsilon {args.target_epsilon:g}: {exc}") from None


def cmd_noise(args) -> int:
    spec = _spec_from_args(args)
    sched = _schedule(args)
    p = spec.inclusion.value
    z_patch = _calibrate(args, sched, p)
    z_record = _calibrate(args, sched, 1.0)
    run = _run(z_patch, sched, p)
    record = _run(z_record, sched, 1.0)
    eps_patch = epsilon(run, args.delta, args.discretization)
    eps_record = epsilon(record, args.delta, args.discretization)
    payload = {"noise_multiplier_patch": z_patch, "noise_multiplier_record": z_record,
               "epsilon_patch": eps_patch, "epsilon_record": eps_record,
               "target_epsilon": args.target_epsilon, "delta": args.delta,
               **_setting_payload(spec, sched, run), "tolerance": args.tolerance,
               "discretization": args.discretization}
    lines = [f"patch-level  z = {z_patch:.4f}   (achieved epsilon = {eps_patch:.4f})",
             f"record-level z = {z_record:.4f}   (achieved epsilon = {eps_record:.4f})",
             f"target epsilon = {args.target_epsilon:g} at delta = {args.delta:.6g} per run; "
             f"noise std = z*C; patch-level needs {z_patch / z_record:.1%} of the record-level "
             f"noise",
             *_setting_lines(spec, sched, run)]
    _emit(args, payload, lines)
    return 0


def _epsilon_grid(args):
    import numpy as np

    if args.epsilons:
        return np.asarray(sorted(set(args.epsilons)), dtype=float)
    lo, hi, num = args.epsilon_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or num != int(num) or num < 2:
        raise UsageError(f"--epsilon-range {lo:g} {hi:g} {num:g}: need MIN < MAX (nats) and an "
                         f"integer NUM >= 2")
    return np.linspace(lo, hi, int(num))


def _draw_profile(args, spec, sched: Schedule, run: PatchDPSGD, grid, curves: dict,
                  labels: dict, out) -> None:
    """delta(epsilon) curves on a log axis, clipped at delta = 1, with the usual target
    delta = 1/N (or --delta when given) as a horizontal line."""
    import numpy as np

    from patchdp_opacus.commands import _plot

    target = getattr(args, "delta", None) or 1.0 / sched.dataset_size
    target_label = (f"target delta = {target:.3g}" if getattr(args, "delta", None)
                    else f"target delta = 1/N = {target:.3g}")
    fig, ax = _plot.new_figure(
        f"Privacy profiles of the whole run: z = {args.noise_multiplier:g}, {sched.steps} steps, "
        f"q = {run.sample_rate:.4g}, {_resampling.short_geometry(spec)}, "
        f"{spec.region.name} private region {_size_text(spec.region.size)}",
        "epsilon (nats)", "delta(epsilon), clipped at 1", logy=True)
    for key, values in curves.items():
        clipped = np.minimum(values, 1.0)
        shown = np.where(clipped > 0, clipped, np.nan)  # log scale: delta = 0 is not drawn
        ax.plot(grid, shown, label=labels[key])
    ax.axhline(target, color="0.3", ls=":", lw=1.2, label=target_label)
    positive = [v for vals in curves.values() for v in vals if v > 0] + [target]
    ax.set_ylim(max(_PROFILE_FLOOR, min(positive)) / 2, 1.0)
    _plot.save(fig, out)


def _draw_sweep(args, sched: Schedule, values, points, noises, record_cache, squares, xs,
                out, geometry: str) -> None:
    """epsilon against the swept quantity, one patch-level curve per z with its record-level
    reference; log axes where the values span a decade or more; the title names the region."""
    import numpy as np

    from patchdp_opacus.commands import _plot

    kind, k = args.quantity, args.group_size
    shape = f"{args.patch_shape} private region"
    fixed = []
    if kind != "resolution":
        fixed.append("image " + ", ".join(_size_text(s) for s in args.image_size))
    if kind != "crop":
        fixed.append(geometry)
    fixed.append(shape if kind == "patch" else f"{shape} {_size_text(args.patch_size)}")
    fixed.append(f"q = {sched.sample_rate:.4g}, {sched.steps} steps")
    what = f"{args.patch_shape} region size" if kind == "patch" else kind
    fig, ax = _plot.new_figure(f"epsilon vs {what} ({'; '.join(fixed)})",
                               _SWEEP_LABELS[kind] + ("" if squares else ", HxW"),
                               f"epsilon (nats) at delta = {args.delta:.3g}")
    drawn = []
    for i, z_fixed in enumerate(noises):
        color = f"C{i % 10}"
        mine = [pt for pt in points if kind == "noise" or pt["noise_multiplier"] == z_fixed]
        eps = [_num(pt["epsilon_patch"], np.nan) for pt in mine]
        tag = "" if kind == "noise" else f", z = {z_fixed:g}"
        group = f", {k} regions" if k > 1 else ""
        ax.plot(xs, eps, "o-", color=color, label=f"patch-level{tag}{group}")
        drawn += eps
        if kind == "noise":
            record = [_num(pt["epsilon_record"], np.nan) for pt in mine]
            ax.plot(xs, record, "s--", color="C1", label="record-level (p = 1)")
            drawn += record
        else:
            ax.axhline(record_cache[z_fixed], ls="--", color=color, label=f"record-level{tag}")
            drawn.append(record_cache[z_fixed])
    if squares and _plot.spans_decades(xs):
        _plot.log_axis(ax, "x", ticks=xs)
    if not squares:
        ax.set_xticks(xs, [_size_text(v) for v in values])
    if _plot.spans_decades(drawn):
        _plot.log_axis(ax, "y")
    _plot.save(fig, out)


def cmd_profile(args) -> int:
    import numpy as np

    from patchdp_opacus.commands import _plot

    out = _plot.check_out_path(args.out) if args.out else None
    spec = _spec_from_args(args)
    sched = _schedule(args)
    grid = _epsilon_grid(args)
    disc = args.discretization
    run = _run(args.noise_multiplier, sched, spec.inclusion.value)
    # The baselines take a rectangle: the region's bounding box (exact for rectangles).
    box = spec.region.size
    curves = {
        "delta_record": privacy_profile(run.record_level(), grid, disc),
        "delta_patch": privacy_profile(run, grid, disc),
        "delta_data_level": data_level_profile(args.sigma_data, box, grid, args.channels),
    }
    tv = None
    if args.sigma_aug is not None:
        tv = gaussian_augmentation_tv(args.sigma_aug, box, args.channels)
        if tv > 0:
            curves["delta_gaussian_augmentation"] = privacy_profile(
                _run(args.noise_multiplier, sched, tv), grid, disc)
        else:  # TV underflowed to 0: no step can leak
            curves["delta_gaussian_augmentation"] = np.maximum(0.0, 1.0 - np.exp(grid))
    labels = {
        "delta_record": "record-level DP-SGD (p = 1)",
        "delta_patch": f"patch-level DP-SGD (p = {spec.inclusion.value:.4g})",
        "delta_data_level": f"data-level noise (sigma = {args.sigma_data:g} pixel units)",
        "delta_gaussian_augmentation": f"Gaussian augmentation (sigma = {args.sigma_aug:g}, "
                                       f"TV = {tv:.4g})" if tv is not None else "",
    }
    if out is not None:
        _draw_profile(args, spec, sched, run, grid, curves, labels, out)
    payload = {"epsilons": grid.tolist(),
               **{k: [_finite(v) for v in vals] for k, vals in curves.items()},
               "noise_multiplier": args.noise_multiplier, "sigma_data": args.sigma_data,
               "sigma_aug": args.sigma_aug, "augmentation_tv": tv, "channels": args.channels,
               **_setting_payload(spec, sched, run), "discretization": disc,
               "out": str(out) if out else None}
    idx = np.unique(np.linspace(0, len(grid) - 1, min(len(grid), 11)).round().astype(int))
    header = "epsilon  " + "  ".join(f"{'delta ' + k[6:]:>22}" for k in curves)
    rows = [f"{grid[i]:7.3f}  " + "  ".join(f"{curves[k][i]:22.6g}" for k in curves) for i in idx]
    lines = [header, *rows, *_setting_lines(spec, sched, run)]
    if out is not None:
        lines.append(f"wrote {out}")
    _emit(args, payload, lines)
    return 0


def _parse_size_value(text: str, minimum: int) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < minimum:
        what = "positive" if minimum else "non-negative"
        raise UsageError(f"--values {text}: expected S or HxW, {what} integers (pixels)")
    return values[0], values[1]


_SWEEP_FLAGS = {"crop": "--crop-size", "patch": "--patch-size", "padding": "--padding",
                "resolution": "--image-size"}
_SWEEP_LABELS = {"crop": "crop size (pixels)", "patch": "private-region size (pixels)",
                 "padding": "padding on each side (pixels)", "resolution": "image size (pixels)",
                 "noise": "noise multiplier z (noise std = z*C)"}


def _check_sweep_flags(args) -> None:
    kind = args.quantity
    flag = _SWEEP_FLAGS.get(kind)
    attr = {"--crop-size": "crop_size", "--patch-size": "patch_size", "--padding": "padding",
            "--image-size": "image_size"}
    if flag and getattr(args, attr[flag]) is not None:
        raise UsageError(f"{flag} conflicts with 'sweep {kind}', which takes it from --values")
    if args.resized_crop and kind in ("crop", "padding", "scale"):
        raise UsageError(f"--resized-crop conflicts with 'sweep {kind}' (it has no crop)")
    for other in ("--image-size", "--crop-size", "--patch-size"):
        if other == "--crop-size" and args.resized_crop:
            continue
        if other != flag and getattr(args, attr[other]) is None:
            raise UsageError(f"'sweep {kind}' needs {other}")
    if kind == "noise" and args.noise_multipliers:
        raise UsageError("--noise-multipliers conflicts with 'sweep noise', which takes the noise "
                         "multipliers from --values")
    if kind != "noise" and not args.noise_multipliers:
        raise UsageError(f"'sweep {kind}' needs --noise-multipliers")


def _sweep_points(args) -> tuple[list, list]:
    """``(values, specs)``: the parsed swept values and the spec at each one."""
    kind = args.quantity
    padding = args.padding if args.padding is not None else [0, 0]
    base = dict(shape=args.patch_shape, image_sizes=args.image_size, crop_size=args.crop_size,
                padding=padding, pad_if_needed=args.pad_if_needed, patch_size=args.patch_size,
                group_size=args.group_size, resampling=_resampling.resampling_from_args(args))
    names = {"patch": _flag("--patch-size", args.patch_size or ()),
             "crop": _flag("--crop-size", args.crop_size or ()),
             "padding": _flag("--padding", padding),
             "image": [_flag("--image-size", s) for s in args.image_size or ()]}
    if kind == "noise":
        parse = _positive_float("noise std = z*C")
        try:
            values = [parse(v) for v in args.values]
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--values: {exc}") from None
        spec = _build_spec(**base, names=names)
        return values, [spec] * len(values)
    values, specs = [], []
    for text in args.values:
        value = _parse_size_value(text, minimum=0 if kind == "padding" else 1)
        key = {"crop": "crop_size", "patch": "patch_size", "padding": "padding",
               "resolution": "image_sizes"}[kind]
        here_base = dict(base, **{key: [value] if kind == "resolution" else value})
        here_names = dict(names)
        label = f"--values {text}"
        if kind == "resolution":
            here_names["image"] = [f"image size {label}"]
        else:
            here_names[kind] = f"{kind} {label}"
        values.append(value)
        specs.append(_build_spec(**here_base, names=here_names))
    return values, specs


def cmd_sweep(args) -> int:
    from patchdp_opacus.commands import _plot

    if args.quantity == "scale":
        from patchdp_opacus.commands._scale_sweep import cmd_sweep_scale

        return cmd_sweep_scale(args)
    _check_sweep_flags(args)
    out = _plot.check_out_path(args.out) if args.out else None
    sched = _schedule(args)
    values, specs = _sweep_points(args)
    kind, disc, k = args.quantity, args.discretization, args.group_size
    noises = args.noise_multipliers if kind != "noise" else [None]
    points, record_cache = [], {}
    for z_fixed in noises:
        for value, spec in zip(values, specs):
            z = value if kind == "noise" else z_fixed
            run = _run(z, sched, spec.inclusion.value)
            if z not in record_cache:
                record_cache[z] = epsilon(run.record_level(), args.delta, disc)
            points.append({
                "value": value if kind == "noise" else list(value),
                "noise_multiplier": z,
                "inclusion_probability": spec.inclusion.value,
                "inclusion_fraction": _fraction_text(spec.inclusion.fraction),
                "effective_sampling_rate": run.effective_sample_rate,
                "epsilon_patch": _finite(_patch_epsilon(run, args.delta, k, disc)),
                "epsilon_record": _finite(record_cache[z]),
            })

    squares = kind == "noise" or all(v[0] == v[1] for v in values)
    xs = [v if kind == "noise" else v[0] for v in values] if squares else list(range(len(values)))
    if out is not None:
        _draw_sweep(args, sched, values, points, noises, record_cache, squares, xs, out,
                    _resampling.short_geometry(specs[0]))

    payload = {"sweep": kind, "values": [v if kind == "noise" else list(v) for v in values],
               "points": points, "delta": args.delta, "group_size": k,
               **sched.to_dict(), "sample_rate": sched.sample_rate, "discretization": disc,
               "out": str(out) if out else None}
    lines = [f"{'value':>11}  {'z':>7}  {'p':>10}  {'w = q*p':>10}  {'eps patch':>10}  "
             f"{'eps record':>10}"]
    for pt in points:
        value = pt["value"]
        shown = f"{value:g}" if kind == "noise" else _size_text(value)
        lines.append(f"{shown:>11}  {pt['noise_multiplier']:7.4g}  "
                     f"{pt['inclusion_probability']:10.4g}  {pt['effective_sampling_rate']:10.4g}"
                     f"  {_num(pt['epsilon_patch']):10.4f}  {_num(pt['epsilon_record']):10.4f}")
    lines.append(f"delta = {args.delta:.6g} per run, q = {sched.sample_rate:.6g}, "
                 f"steps = {sched.describe()}")
    if out is not None:
        lines.append(f"wrote {out}")
    _emit(args, payload, lines)
    return 0
