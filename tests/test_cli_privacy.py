"""The ``patchdp`` privacy commands: every number equals the privacy layer's, bad input exits 2
with one line naming the flag, figures and JSON are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from patchdp_opacus.cli import main
from patchdp_opacus.privacy import (
    CropGeometry,
    PatchDPSGD,
    calibrate_noise,
    data_level_profile,
    epsilon,
    gaussian_augmentation_tv,
    group_epsilon,
    inclusion_probability,
    make_region,
    privacy_profile,
)

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
CITYSCAPES = ["--image-size", "1024", "2048", "--crop-size", "505", "505", "--patch-size", "10",
              "10", "--dataset-size", "2975", "--batch-size", "200"]
# A small setting: cheap PLDs (few steps, coarse discretization).
SMALL = ["--image-size", "256", "256", "--crop-size", "64", "64", "--patch-size", "8", "8",
         "--dataset-size", "1000", "--batch-size", "100", "--steps", "5",
         "--discretization", "1e-3"]
DISC = 1e-3


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # exactly one JSON object on stdout


def test_console_script_cityscapes():
    """The installed entry point: paper's Cityscapes setting, default discretization."""
    script = Path(sys.executable).with_name("patchdp")
    assert script.exists(), "console script not installed: pip install -e ."
    proc = subprocess.run([str(script), "epsilon", *CITYSCAPES, "--epochs", "100",
                           "--noise-multiplier", "1", "--delta", "1/2975", "--json"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["epsilon_patch"] == pytest.approx(32.7, abs=0.1)
    assert Fraction(res["inclusion_fraction"]) == Fraction(66049, 200720)
    assert res["inclusion_fraction"] == "66049/200720"
    assert res["steps"] == 1500 and res["steps_per_epoch"] == 15
    assert res["sample_rate"] == 200 / 2975
    assert res["effective_sampling_rate"] == pytest.approx(200 / 2975 * 66049 / 200720, rel=1e-12)
    assert res["epsilon_record"] > 3 * res["epsilon_patch"]
    assert res["delta"] == 1 / 2975


@pytest.mark.parametrize("shape", ["rectangle", "circle"])
def test_epsilon_json_equals_privacy_layer(capsys, shape):
    res = run_json(capsys, "epsilon", "--image-size", 100, 150, "--image-size", 120, 90,
                   "--crop-size", 64, 64, "--padding", 4, 6, "--patch-size", 9, 9,
                   "--patch-shape", shape, "--dataset-size", 1000, "--batch-size", 300,
                   "--epochs", 3, "--noise-multiplier", 1.3, "--delta", 1e-5,
                   "--discretization", DISC)
    inc = inclusion_probability(CropGeometry((64, 64), (4, 6)), [(100, 150), (120, 90)],
                                make_region(shape, (9, 9)))
    steps = 3 * round(1000 / 300)
    layer = PatchDPSGD(1.3, 300 / 1000, inc.value, steps)
    assert res["steps"] == steps == 9
    assert res["inclusion_probability"] == inc.value
    assert Fraction(res["inclusion_fraction"]) == inc.fraction
    assert res["effective_sampling_rate"] == layer.effective_sample_rate
    assert res["sample_rate"] == 0.3
    assert res["epsilon_patch"] == epsilon(layer, 1e-5, DISC)
    assert res["epsilon_record"] == epsilon(layer.record_level(), 1e-5, DISC)
    assert res["noise_multiplier"] == 1.3 and res["delta"] == 1e-5
    assert res["geometry"]["region"]["shape"] == shape
    assert res["geometry"]["worst_image_size"] == list(inc.image_size)


@pytest.mark.parametrize("n, b", [(2975, 200), (1000, 300), (5, 2), (25, 10), (7, 7)])
def test_epochs_count_steps_like_the_loader(capsys, n, b):
    """Steps per epoch agree with the sampler the loader uses (ties 2.5 -> 3)."""
    sampler = pytest.importorskip("patchdp_opacus.plugin.sampler")
    res = run_json(capsys, "epsilon", *SMALL[:9], "--dataset-size", n, "--batch-size", b,
                   "--epochs", 2, "--noise-multiplier", 5, "--delta", 1e-5,
                   "--discretization", 1e-2)
    assert res["steps_per_epoch"] == sampler.steps_per_epoch_for(n, b)
    assert res["steps"] == 2 * res["steps_per_epoch"]


def test_epsilon_group_size_uses_group_privacy(capsys):
    res = run_json(capsys, "epsilon", *SMALL, "--noise-multiplier", 1, "--delta", 1e-5,
                   "--group-size", 2)
    inc = inclusion_probability(CropGeometry(64), (256, 256), (8, 8))
    layer = PatchDPSGD(1.0, 0.1, inc.value, 5)
    assert res["group_size"] == 2
    assert res["epsilon_patch"] == group_epsilon(layer, 1e-5, 2, DISC)
    assert res["epsilon_patch"] > epsilon(layer, 1e-5, DISC)


def test_epsilon_text_output(capsys):
    code, out, err = run(capsys, "epsilon", *SMALL, "--noise-multiplier", 1, "--delta", 1e-5)
    assert code == 0 and err == ""
    inc = inclusion_probability(CropGeometry(64), (256, 256), (8, 8))
    assert f"{inc.fraction.numerator}/{inc.fraction.denominator}" in out
    assert "patch-level" in out and "record-level" in out and "w = q*p" in out


def test_noise_round_trip(capsys):
    target, delta = 2.0, 1e-5
    res = run_json(capsys, "noise", *SMALL, "--target-epsilon", target, "--delta", delta)
    p = inclusion_probability(CropGeometry(64), (256, 256), (8, 8)).value
    z_patch, z_record = res["noise_multiplier_patch"], res["noise_multiplier_record"]
    assert z_patch == calibrate_noise(target, delta, 0.1, p, 5, discretization=DISC)
    assert z_record == calibrate_noise(target, delta, 0.1, 1.0, 5, discretization=DISC)
    eps_patch = epsilon(PatchDPSGD(z_patch, 0.1, p, 5), delta, DISC)
    eps_record = epsilon(PatchDPSGD(z_record, 0.1, 1.0, 5), delta, DISC)
    assert eps_patch <= target and eps_record <= target
    assert res["epsilon_patch"] == eps_patch and res["epsilon_record"] == eps_record
    # calibrated, not just any large z: 1% less noise misses the target
    assert epsilon(PatchDPSGD(0.99 * z_patch, 0.1, p, 5), delta, DISC) > target
    assert z_patch < z_record


def test_profile_writes_png_and_json(capsys, tmp_path):
    out = tmp_path / "profile.png"
    res = run_json(capsys, "profile", *SMALL, "--noise-multiplier", 1, "--epsilon-range", 0, 5,
                   11, "--sigma-data", 4000, "--sigma-aug", 3000, "--out", out)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = np.linspace(0, 5, 11)
    inc = inclusion_probability(CropGeometry(64), (256, 256), (8, 8))
    layer = PatchDPSGD(1.0, 0.1, inc.value, 5)
    assert res["epsilons"] == grid.tolist()
    np.testing.assert_array_equal(res["delta_patch"], privacy_profile(layer, grid, DISC))
    np.testing.assert_array_equal(res["delta_record"],
                                  privacy_profile(layer.record_level(), grid, DISC))
    np.testing.assert_array_equal(res["delta_data_level"], data_level_profile(4000, (8, 8), grid))
    tv = gaussian_augmentation_tv(3000, (8, 8))
    assert res["augmentation_tv"] == tv
    np.testing.assert_array_equal(res["delta_gaussian_augmentation"],
                                  privacy_profile(PatchDPSGD(1.0, 0.1, tv, 5), grid, DISC))
    assert all(a <= b for a, b in zip(res["delta_patch"], res["delta_record"]))
    assert res["out"] == str(out)


def test_sweep_crop_equals_privacy_layer(capsys, tmp_path):
    out = tmp_path / "crop.png"
    res = run_json(capsys, "sweep", "crop", "--values", 32, "96x64", "--noise-multipliers", 1, 2,
                   "--image-size", 256, 256, "--patch-size", 8, 8, "--dataset-size", 1000,
                   "--batch-size", 100, "--steps", 5, "--delta", 1e-5, "--discretization", DISC,
                   "--out", out)
    assert out.stat().st_size > 1000
    assert [(pt["value"], pt["noise_multiplier"]) for pt in res["points"]] == [
        ([32, 32], 1.0), ([96, 64], 1.0), ([32, 32], 2.0), ([96, 64], 2.0)]
    for pt in res["points"]:
        inc = inclusion_probability(CropGeometry(tuple(pt["value"])), (256, 256), (8, 8))
        layer = PatchDPSGD(pt["noise_multiplier"], 0.1, inc.value, 5)
        assert pt["inclusion_fraction"] == f"{inc.fraction.numerator}/{inc.fraction.denominator}"
        assert pt["epsilon_patch"] == epsilon(layer, 1e-5, DISC)
        assert pt["epsilon_record"] == epsilon(layer.record_level(), 1e-5, DISC)
    first, second = res["points"][0], res["points"][1]
    assert first["epsilon_patch"] < second["epsilon_patch"] < second["epsilon_record"]


@pytest.mark.parametrize("kind, values, extra", [
    ("patch", ["4", "16"], ["--image-size", "256", "256", "--crop-size", "64", "64"]),
    ("padding", ["0", "32"], ["--image-size", "256", "256", "--crop-size", "64", "64",
                              "--patch-size", "8", "8"]),
    ("resolution", ["128", "256x512"], ["--crop-size", "64", "64", "--patch-size", "8", "8"]),
    ("noise", ["1", "2"], ["--image-size", "256", "256", "--crop-size", "64", "64",
                           "--patch-size", "8", "8"]),
])
def test_sweep_kinds_write_png_and_json(capsys, tmp_path, kind, values, extra):
    out = tmp_path / f"{kind}.png"
    z = [] if kind == "noise" else ["--noise-multipliers", "1"]
    res = run_json(capsys, "sweep", kind, "--values", *values, *z, *extra, "--dataset-size", 1000,
                   "--batch-size", 100, "--steps", 5, "--delta", 1e-5, "--discretization", DISC,
                   "--out", out)
    assert out.stat().st_size > 1000
    assert res["sweep"] == kind and len(res["points"]) == 2
    eps = [pt["epsilon_patch"] for pt in res["points"]]
    ps = [pt["inclusion_probability"] for pt in res["points"]]
    if kind == "patch":       # bigger patch: more crops hit it
        assert ps[0] < ps[1] and eps[0] < eps[1]
    elif kind in ("padding", "resolution"):  # more room for the crop: fewer hits
        assert ps[0] > ps[1] and eps[0] > eps[1]
    else:                     # more noise: smaller epsilon, p unchanged
        assert ps[0] == ps[1] and eps[0] > eps[1]
        assert res["points"][0]["epsilon_record"] > res["points"][1]["epsilon_record"]


BAD = [
    (["epsilon", "--image-size", 200, 200, "--crop-size", 100, 100, "--patch-size", 300, 300],
     "--patch-size 300 300 does not fit in --image-size 200 200"),
    (["epsilon", "--image-size", 0, 200, "--crop-size", 100, 100, "--patch-size", 3, 3],
     "--image-size"),
    (["epsilon", "--image-size", 200, 200, "--crop-size", -100, 100, "--patch-size", 3, 3],
     "--crop-size"),
    (["epsilon", "--image-size", 200, 200, "--crop-size", 300, 300, "--patch-size", 3, 3],
     "--crop-size 300 300 does not fit in --image-size 200 200"),
    (["epsilon", "--image-size", 200, 200, "--crop-size", 100, 100, "--patch-size", 3, 3,
      "--patch-shape", "hexagon"], "--patch-shape"),
    (["epsilon", "--image-size", 200, 200, "--crop-size", 100, 100, "--patch-size", 3, 3,
      "--padding", -1, 0], "--padding"),
]
GOOD_DATA = ["--dataset-size", 1000, "--batch-size", 100, "--steps", 5]


@pytest.mark.parametrize("argv, flag", [
    *[(a + GOOD_DATA + ["--noise-multiplier", 1, "--delta", 1e-5], f) for a, f in BAD],
    (["epsilon", *SMALL, "--noise-multiplier", 1, "--delta", 1], "--delta"),
    (["epsilon", *SMALL, "--noise-multiplier", 1, "--delta", 0], "--delta"),
    (["epsilon", *SMALL, "--noise-multiplier", 1, "--delta", -0.5], "--delta"),
    (["epsilon", *SMALL, "--noise-multiplier", 0, "--delta", 1e-5], "--noise-multiplier"),
    (["epsilon", *SMALL[:-8], "--dataset-size", 100, "--batch-size", 200, "--steps", 5,
      "--noise-multiplier", 1, "--delta", 1e-5], "--batch-size 200 is larger than --dataset-size"),
    (["noise", *SMALL, "--target-epsilon", 0, "--delta", 1e-5], "--target-epsilon"),
    (["sweep", "crop", "--values", 32, 300, "--noise-multipliers", 1, "--image-size", 256, 256,
      "--patch-size", 8, 8, *GOOD_DATA, "--delta", 1e-5], "--values 300"),
    (["sweep", "crop", "--values", 32, "--image-size", 256, 256, "--patch-size", 8, 8,
      *GOOD_DATA, "--delta", 1e-5], "--noise-multipliers"),
    (["profile", *SMALL, "--noise-multiplier", 1, "--out", "/nonexistent-dir/x.png"], "--out"),
])
def test_bad_input_exits_2_with_one_line_naming_the_flag(capsys, argv, flag):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patchdp: error:") and flag in lines[0]


def test_pad_if_needed_accepts_a_crop_bigger_than_the_image(capsys):
    res = run_json(capsys, "epsilon", "--image-size", 200, 200, "--crop-size", 300, 300,
                   "--patch-size", 3, 3, "--pad-if-needed", *GOOD_DATA, "--noise-multiplier", 1,
                   "--delta", 1e-5, "--discretization", DISC)
    assert res["inclusion_fraction"] == "1/1"  # every crop holds the whole image


def test_user_error_through_the_module_entry_point_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "patchdp_opacus.cli", "epsilon", "--image-size",
                           "200", "200", "--crop-size", "300", "300", "--patch-size", "3", "3",
                           "--dataset-size", "10", "--batch-size", "2", "--steps", "1",
                           "--noise-multiplier", "1", "--delta", "1e-5"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "patchdp: error: --crop-size 300 300 does not fit in --image-size 200 200 padded by "
        "--padding 0 0; add --pad-if-needed, more --padding or use a smaller crop"]


def test_privacy_commands_do_not_import_torch():
    code = ("import sys; from patchdp_opacus.cli import main; "
            f"rc = main({['epsilon', *SMALL, '--noise-multiplier', '1', '--delta', '1e-5']!r}); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_help_documents_defaults_and_units(capsys):
    code, out, _ = run(capsys, "epsilon", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in ("(default: rectangle)", "(default: 0 0)", "(default: 1)", "pixels",
                 "noise std = z*C", "--epochs E | --steps T"):
        assert text in flat, text
