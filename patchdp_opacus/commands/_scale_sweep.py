"""``patchdp sweep scale``: p and epsilon against the random-scale range before the crop.

Each ``--values`` entry is one scale ``S`` (no jitter at that scale) or a range ``MIN-MAX``
whose grid step is ``--scale-step`` (default 0.25); the crop, patch, padding and kernel flags are
those of ``patchdp epsilon``.  Every number comes from the privacy layer (the footprint ``p`` of
:class:`~patchdp_opacus.privacy.RandomScaleCrop`, Theorem-2 accounting).  One curve of the
patch-level epsilon per noise multiplier, the record-level epsilon as a dashed line, and ``p``
(dotted, right axis).
"""

from __future__ import annotations

from patchdp_opacus.commands import UsageError, _resampling
from patchdp_opacus.commands.privacy import (
    _build_spec,
    _check_sweep_flags,
    _emit,
    _finite,
    _flag,
    _fraction_text,
    _num,
    _patch_epsilon,
    _run,
    _schedule,
    _size_text,
)
from patchdp_opacus.privacy import epsilon


def _scale_points(args) -> list[tuple[str, tuple, object]]:
    """``(label, scales, spec)`` for every ``--values`` entry."""
    step = args.scale_step if args.scale_step is not None else _resampling.DEFAULT_SCALE_STEP
    padding = args.padding if args.padding is not None else [0, 0]
    names = {"patch": _flag("--patch-size", args.patch_size),
             "crop": _flag("--crop-size", args.crop_size),
             "padding": _flag("--padding", padding),
             "image": [_flag("--image-size", s) for s in args.image_size]}
    out = []
    for text in args.values:
        scales = _resampling.parse_scale_range_value(text, step)
        resampling = _resampling.resampling_from_args(args, scales=scales,
                                                      scales_flag=f"--values {text}")
        spec = _build_spec(shape=args.patch_shape, image_sizes=args.image_size,
                           crop_size=args.crop_size, padding=padding,
                           pad_if_needed=args.pad_if_needed, patch_size=args.patch_size,
                           group_size=args.group_size, names=names, resampling=resampling)
        out.append((text, scales, spec))
    return out


def _figure(args, sched, points, noises, record, out) -> None:
    from patchdp_opacus.commands import _plot

    labels = list(dict.fromkeys(pt["value"] for pt in points))
    xs = list(range(len(labels)))
    step = args.scale_step if args.scale_step is not None else _resampling.DEFAULT_SCALE_STEP
    fig, ax = _plot.new_figure(
        f"epsilon and p vs random scale range before the crop\n(image "
        f"{', '.join(_size_text(s) for s in args.image_size)}, crop "
        f"{_size_text(args.crop_size)}, {args.patch_shape} {_size_text(args.patch_size)}, "
        f"q = {sched.sample_rate:.4g}, {sched.steps} steps)",
        f"scale range (grid step {float(step):g})",
        f"epsilon (nats) at delta = {args.delta:.3g}")
    for k, z in enumerate(noises):
        mine = [pt for pt in points if pt["noise_multiplier"] == z]
        ax.plot(xs, [_num(pt["epsilon_patch"], float("nan")) for pt in mine], "o-",
                color=f"C{k % 10}", label=f"patch-level, z = {z:g}")
        ax.axhline(record[z], ls="--", color=f"C{k % 10}", label=f"record-level, z = {z:g}")
    ax.set_xticks(xs, labels)
    p_axis = ax.twinx()
    p_axis.plot(xs, [pt["inclusion_probability"] for pt in points[:len(labels)]], "k:",
                marker="s")
    p_axis.set_ylabel("p (worst-case inclusion probability)")
    p_axis.set_ylim(0, 1.05)
    ax.plot([], [], "k:", marker="s", label="p (right axis)")  # legend entry for the twin axis
    _plot.save(fig, out)


def cmd_sweep_scale(args) -> int:
    from patchdp_opacus.commands import _plot

    _check_sweep_flags(args)
    if args.scale_range is not None:
        raise UsageError("--scale-range conflicts with 'sweep scale', which takes the scale "
                         "ranges from --values")
    if args.resize:
        raise UsageError("--resize cannot be combined with 'sweep scale'")
    out = _plot.check_out_path(args.out) if args.out else None
    sched = _schedule(args)
    settings = _scale_points(args)
    disc, k = args.discretization, args.group_size
    points, record = [], {}
    for z in args.noise_multipliers:
        for text, scales, spec in settings:
            run = _run(z, sched, spec.inclusion.value)
            if z not in record:
                record[z] = epsilon(run.record_level(), args.delta, disc)
            points.append({
                "value": text, "scales": [str(s) for s in scales], "noise_multiplier": z,
                "inclusion_probability": spec.inclusion.value,
                "inclusion_fraction": _fraction_text(spec.inclusion.fraction),
                "inclusion_average_of_maxima": float(spec.inclusion.average_of_maxima),
                "effective_sampling_rate": run.effective_sample_rate,
                "epsilon_patch": _finite(_patch_epsilon(run, args.delta, k, disc)),
                "epsilon_record": _finite(record[z]),
            })
    if out is not None:
        _figure(args, sched, points, args.noise_multipliers, record, out)
    payload = {"sweep": "scale", "values": list(args.values), "points": points,
               "geometry": settings[0][2].to_dict()["crop"], "delta": args.delta,
               "group_size": k, **sched.to_dict(), "sample_rate": sched.sample_rate,
               "discretization": disc, "out": str(out) if out else None}
    lines = [f"{'scales':>14}  {'z':>7}  {'p':>10}  {'w = q*p':>10}  {'eps patch':>10}  "
             f"{'eps record':>10}"]
    for pt in points:
        lines.append(f"{pt['value']:>14}  {pt['noise_multiplier']:7.4g}  "
                     f"{pt['inclusion_probability']:10.4g}  {pt['effective_sampling_rate']:10.4g}"
                     f"  {_num(pt['epsilon_patch']):10.4f}  {_num(pt['epsilon_record']):10.4f}")
    lines.append(f"{_resampling.describe_geometry(settings[-1][2])}; delta = {args.delta:.6g} "
                 f"per run, q = {sched.sample_rate:.6g}, steps = {sched.describe()}")
    if out is not None:
        lines.append(f"wrote {out}")
    _emit(args, payload, lines)
    return 0
