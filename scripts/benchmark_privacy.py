#!/usr/bin/env python
"""Time the two privacy computations users wait for, against fixed bars.

(a) the worst-case inclusion probability p of a circle of diameter 51 on a 1024x2048 image
    with a 505x505 crop (the exact all-placement mask path; bar: 1 s);
(b) ``calibrate_noise`` for the Cityscapes setting: N = 2975, B = 200, 1500 steps, crop 505,
    patch 10x10, delta = 1/N, target epsilon 8 (bar: 5 s);
(c) the footprint p of a random scale (0.5 to 2.0 in steps of 0.25, antialiased bilinear) then
    crop 512x512 on a 1024x2048 image, patch 10x10 (the exact joint worst case; bar: 2 s).

Each is run ``--repeat`` times from cold caches and the slowest run is compared with its bar.
Exits 1 if a bar is missed.

    python scripts/benchmark_privacy.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time

from patchdp_opacus.privacy import (
    CropGeometry,
    PatchDPSGD,
    RandomScaleCrop,
    calibrate_noise,
    epsilon,
    inclusion_probability,
    make_region,
)
from patchdp_opacus.privacy import accounting, geometric

N, B, STEPS, TARGET_EPSILON = 2975, 200, 1500, 8.0
IMAGE, CROP = (1024, 2048), (505, 505)


def _clear_caches() -> None:
    accounting.step_pld.cache_clear()
    accounting.composed_pld.cache_clear()
    geometric.clear_caches()


def bench_circle():
    region = make_region("circle", (51, 51))
    crop = CropGeometry(CROP)
    return inclusion_probability(crop, IMAGE, region)


def bench_calibrate():
    p = inclusion_probability(CropGeometry(CROP), IMAGE, (10, 10)).value
    return calibrate_noise(TARGET_EPSILON, 1 / N, B / N, p, STEPS), p


def bench_scale_crop():
    transform = RandomScaleCrop((512, 512), scale_range=(0.5, 2.0), scale_step=0.25)
    return transform.inclusion_probability(IMAGE, (10, 10))


def _time(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        _clear_caches()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="cold runs per benchmark")
    args = parser.parse_args(argv)
    repeat = max(1, args.repeat)

    ok = True
    times, inc = _time(bench_circle, repeat)
    bar = 1.0
    ok &= max(times) < bar
    print(f"(a) p, circle d=51, image 1024x2048, crop 505: p = {inc.fraction} = {inc.value:.6f}; "
          f"slowest {max(times):.3f} s, fastest {min(times):.3f} s (bar < {bar:g} s) "
          f"{'OK' if max(times) < bar else 'MISSED'}")

    times, (z, p) = _time(bench_calibrate, repeat)
    bar = 5.0
    ok &= max(times) < bar
    achieved = epsilon(PatchDPSGD(z, B / N, p, STEPS), 1 / N)
    print(f"(b) calibrate_noise, Cityscapes ({STEPS} steps, target eps {TARGET_EPSILON:g}, "
          f"delta 1/{N}): z = {z:.4f} (eps {achieved:.4f}); slowest {max(times):.3f} s, "
          f"fastest {min(times):.3f} s (bar < {bar:g} s) {'OK' if max(times) < bar else 'MISSED'}")

    times, inc = _time(bench_scale_crop, repeat)
    bar = 2.0
    ok &= max(times) < bar
    loose = float(inc.average_of_maxima)
    print(f"(c) footprint p, random scale 0.5-2.0 step 0.25 + crop 512, image 1024x2048, patch "
          f"10x10: p = {inc.value:.6f} (average of per-scale maxima {loose:.6f}); "
          f"slowest {max(times):.3f} s, fastest {min(times):.3f} s (bar < {bar:g} s) "
          f"{'OK' if max(times) < bar else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
