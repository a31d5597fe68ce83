"""``patchdp epsilon/noise/profile/sweep`` with loader-owned resampling: random scale
(``--scale-range``/``--scale-step``), ``--resize`` and ``--resized-crop``; ``sweep scale``.  Every
number equals the privacy layer's; bad input exits 2 with one line naming the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from patchdp_opacus.cli import main
from patchdp_opacus.privacy import (
    CropGeometry,
    PatchDPSGD,
    RandomResizedCrop,
    RandomScaleCrop,
    Resize,
    calibrate_noise,
    epsilon,
    inclusion_probability,
    make_region,
)

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
DATA = ["--dataset-size", 1000, "--batch-size", 100, "--steps", 5, "--discretization", 1e-3]
GEOM = ["--image-size", 120, 160, "--crop-size", 48, 48, "--patch-size", 6, 6]
DISC = 1e-3


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_epsilon_with_scale_jitter_equals_the_privacy_layer(capsys):
    res = run_json(capsys, "epsilon", *GEOM, "--padding", 2, 3, "--scale-range", 0.5, 1.5,
                   "--scale-step", "1/4", "--interpolation", "bicubic", *DATA,
                   "--noise-multiplier", 1.2, "--delta", 1e-5)
    t = RandomScaleCrop(CropGeometry((48, 48), (2, 3)), scale_range=(0.5, 1.5), scale_step=0.25,
                        interpolation="bicubic")
    inc = t.inclusion_probability((120, 160), (6, 6))
    layer = PatchDPSGD(1.2, 0.1, inc.value, 5)
    assert Fraction(res["inclusion_fraction"]) == inc.fraction
    assert res["inclusion_average_of_maxima"] == float(inc.average_of_maxima)
    assert res["epsilon_patch"] == epsilon(layer, 1e-5, DISC)
    assert res["geometry"]["crop"] == t.to_dict()
    assert res["geometry"]["worst_placement"] == list(inc.placement)


def test_one_scale_of_one_equals_the_plain_crop(capsys):
    jitter = run_json(capsys, "epsilon", *GEOM, "--scale-range", 1, 1, *DATA,
                      "--noise-multiplier", 1, "--delta", 1e-5)
    plain = run_json(capsys, "epsilon", *GEOM, *DATA, "--noise-multiplier", 1, "--delta", 1e-5)
    assert jitter["inclusion_fraction"] == plain["inclusion_fraction"]
    assert jitter["epsilon_patch"] == plain["epsilon_patch"]


def test_noise_with_resized_crop_equals_the_privacy_layer(capsys):
    res = run_json(capsys, "noise", "--image-size", 90, 120, "--resized-crop", 32, 32,
                   "--resized-crop-scale", 0.2, 0.6, "--resized-crop-ratio", "3/4", "4/3",
                   "--resized-crop-grid", 3, 2, "--patch-size", 4, 4, *DATA,
                   "--target-epsilon", 3, "--delta", 1e-5)
    t = RandomResizedCrop((32, 32), (Fraction(1, 5), Fraction(3, 5)), grid=(3, 2))
    p = t.inclusion_probability((90, 120), (4, 4)).value
    assert res["inclusion_probability"] == p < 1
    assert res["noise_multiplier_patch"] == calibrate_noise(3, 1e-5, 0.1, p, 5,
                                                            discretization=DISC)


def test_profile_with_resize_before_the_crop(capsys, tmp_path):
    out = tmp_path / "profile.png"
    res = run_json(capsys, "profile", "--image-size", 60, 80, "--resize", 120, 160,
                   "--crop-size", 48, 48, "--patch-size", 3, 3, *DATA, "--noise-multiplier", 1,
                   "--epsilon-range", 0, 4, 5, "--out", out)
    assert out.stat().st_size > 1000
    t = Resize((120, 160), crop=(48, 48))
    assert Fraction(res["inclusion_fraction"]) == t.inclusion_probability((60, 80),
                                                                          (3, 3)).fraction
    # a 2x upscale: the region covers twice the pixels of the crop, so p exceeds the crop's p
    # for a 6x6 patch on the upscaled image (the bilinear support adds a little more)
    plain = inclusion_probability(CropGeometry(48), (120, 160), (6, 6)).value
    assert res["inclusion_probability"] > plain


def test_sweep_scale_writes_png_and_json(capsys, tmp_path):
    out = tmp_path / "scale.png"
    res = run_json(capsys, "sweep", "scale", "--values", 1, "0.75-1.25", "0.5:2",
                   "--noise-multipliers", 1, 2, *GEOM, "--pad-if-needed", *DATA,
                   "--delta", 1e-5, "--out", out)
    assert out.stat().st_size > 1000
    assert res["sweep"] == "scale" and len(res["points"]) == 6
    first = res["points"][0]
    assert first["scales"] == ["1"] and first["noise_multiplier"] == 1
    plain = inclusion_probability(CropGeometry(48, pad_if_needed=True), (120, 160), (6, 6))
    assert Fraction(first["inclusion_fraction"]) == plain.fraction
    wide = res["points"][2]
    assert wide["scales"] == [str(Fraction(k, 4)) for k in range(2, 9)]
    t = RandomScaleCrop(CropGeometry(48, pad_if_needed=True), scale_range=(0.5, 2))
    inc = t.inclusion_probability((120, 160), (6, 6))
    assert Fraction(wide["inclusion_fraction"]) == inc.fraction
    assert wide["epsilon_patch"] == epsilon(PatchDPSGD(1, 0.1, inc.value, 5), 1e-5, DISC)
    assert res["points"][3]["epsilon_patch"] < first["epsilon_patch"]  # z = 2: less epsilon


def test_other_sweeps_keep_the_resampling(capsys):
    res = run_json(capsys, "sweep", "patch", "--values", 3, 6, "--noise-multipliers", 1,
                   "--image-size", 120, 160, "--crop-size", 48, 48, "--scale-range", 0.5, 1,
                   *DATA, "--delta", 1e-5)
    t = RandomScaleCrop(48, scale_range=(0.5, 1))
    for pt, k in zip(res["points"], (3, 6)):
        assert Fraction(pt["inclusion_fraction"]) == t.inclusion_probability(
            (120, 160), make_region("rectangle", (k, k))).fraction


BAD = [
    (["--scale-range", 0.5, 2, "--resize", 60, 60], "--scale-range and --resize"),
    (["--scale-step", 0.25], "--scale-step needs --scale-range"),
    (["--scale-range", 2, 0.5], "--scale-range 2 0.5"),
    (["--scale-range", 0, 2], "--scale-range"),
    (["--scale-range", "a", 2], "--scale-range"),
    (["--scale-range", 0.05, 0.1], "--scale-range 0.05 0.1 and --crop-size 48 48"),
    (["--scale-range", 0.5, 1, "--scale-step", "1e-9"], "--scale-step"),
    (["--resized-crop", 32, 32], "--resized-crop replaces --crop-size"),
    (["--resized-crop-grid", 2, 2], "--resized-crop-grid needs --resized-crop"),
    (["--interpolation", "bicubic"], "--interpolation"),
    (["--scale-range", 0.5, 1, "--interpolation", "lanczos"], "--interpolation"),
    (["--resize", 30, 30], "--resize 30 30 and --crop-size 48 48"),
]


@pytest.mark.parametrize("extra, flag", [
    *[(["epsilon", *GEOM, *e, *DATA, "--noise-multiplier", 1, "--delta", 1e-5], f)
      for e, f in BAD],
    (["epsilon", "--image-size", 120, 160, "--patch-size", 6, 6, *DATA, "--noise-multiplier",
      1, "--delta", 1e-5], "--crop-size is required"),
    (["epsilon", "--image-size", 120, 160, "--resized-crop", 32, 32, "--resized-crop-scale", 0.5,
      2, "--patch-size", 6, 6, *DATA, "--noise-multiplier", 1, "--delta", 1e-5],
     "--resized-crop-scale 0.5 2"),
    (["epsilon", "--image-size", 120, 160, "--resized-crop", 32, 32, "--padding", 2, 2,
      "--patch-size", 6, 6, *DATA, "--noise-multiplier", 1, "--delta", 1e-5], "--padding"),
    (["sweep", "scale", "--values", 1, "0.5-x", "--noise-multipliers", 1, *GEOM, *DATA,
      "--delta", 1e-5], "--values 0.5-x"),
    (["sweep", "scale", "--values", "2-1", "--noise-multipliers", 1, *GEOM, *DATA,
      "--delta", 1e-5], "--values 2-1"),
    (["sweep", "scale", "--values", 1, "--scale-range", 0.5, 1, "--noise-multipliers", 1, *GEOM,
      *DATA, "--delta", 1e-5], "--scale-range conflicts with 'sweep scale'"),
    (["sweep", "scale", "--values", "0.1-0.2", "--noise-multipliers", 1, *GEOM, *DATA,
      "--delta", 1e-5], "--values 0.1-0.2 and --crop-size 48 48"),
    (["sweep", "crop", "--values", 32, "--resized-crop", 32, 32, "--noise-multipliers", 1,
      "--image-size", 120, 160, "--patch-size", 6, 6, *DATA, "--delta", 1e-5],
     "--resized-crop conflicts with 'sweep crop'"),
])
def test_bad_input_exits_2_with_one_line_naming_the_flag(capsys, extra, flag):
    code, out, err = run(capsys, *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patchdp: error:") and flag in lines[0], lines[0]


def test_help_lists_the_resampling_flags(capsys):
    code, out, _ = run(capsys, "epsilon", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in ("--scale-range MIN MAX", "--scale-step STEP", "(default: 0.25)", "--resize H W",
                 "--resized-crop H W", "(default: 0.08 1)", "(default: 3/4 4/3)",
                 "(default: 8 5)", "(default: bilinear)", "--no-antialias",
                 "stored-image pixels"):
        assert text in flat, text
    code, out, _ = run(capsys, "sweep", "--help")
    assert "scale: random scale range" in " ".join(out.split())


def test_resampling_commands_do_not_import_torch():
    argv = ["epsilon", *map(str, GEOM), "--scale-range", "0.5", "2", *map(str, DATA),
            "--noise-multiplier", "1", "--delta", "1e-5"]
    code = ("import sys; from patchdp_opacus.cli import main; "
            f"rc = main({argv!r}); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
