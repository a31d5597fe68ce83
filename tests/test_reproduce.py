"""The privacy-only figures: the claims the paper's text makes about them, pinned at the
paper's settings (coarse PLD discretisation: the pessimistic bounds only loosen, and every
comparison below is one the looseness cannot create), plus the command's outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from patchdp_opacus.privacy import data_level_profile, privacy_profile
from patchdp_opacus.reproduce import privacy_figures as pf
from patchdp_opacus.reproduce.cli import main
from patchdp_opacus.reproduce.figures import CITYSCAPES, NUMERICAL_ZERO, PRIVACY_FIGURES, \
    SIGMA_AUGS
from patchdp_opacus.reproduce.settings import PAPER, crop_grid, epsilon_grid, patch_grid

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # dp-accounting's exp overflow

DISC = 1e-2
SQUARE, WIDE = (1000, 1000), (1000, 2000)


def test_paper_noise_units_and_schedule():
    assert PAPER.noise_multiplier == 1.0  # the paper's sigma 2 = std on sensitivity 2C, C = 2
    assert PAPER.with_(sigma=5.0).noise_multiplier == 2.5
    assert (PAPER.steps, PAPER.sample_rate) == (100_000, 1e-3)


def _brute_force_full_coverage(length, crop, k):
    """Some placement of a k-pixel segment is met by every crop origin (one axis)."""
    origins = range(length - crop + 1)
    return any(all(j <= x + k - 1 and j + crop - 1 >= x for j in origins)
               for x in range(length - k + 1))


@pytest.mark.parametrize("image,quantity,base,expected", [
    (SQUARE, "crop", PAPER.with_(patch=(10, 10)), 496),
    (SQUARE, "patch", PAPER.with_(crop=450), 102),
    (WIDE, "crop", PAPER.with_(image_size=WIDE, patch=(10, 10)), 996),
    (WIDE, "patch", PAPER.with_(image_size=WIDE, crop=450), None),  # never saturates
])
def test_saturation_thresholds(image, quantity, base, expected):
    assert pf.saturation_threshold(base, quantity) == expected
    if expected is None:  # the 2000-pixel width is never covered by a 450 crop
        assert not _brute_force_full_coverage(2000, 450, 1000)
        return
    for v, full in ((expected - 1, False), (expected, True)):
        crop, k = (v, 10) if quantity == "crop" else (450, v)
        assert all(_brute_force_full_coverage(n, crop, k) for n in image) is full


@pytest.mark.parametrize("image", [SQUARE, WIDE])
@pytest.mark.parametrize("quantity", ["crop", "patch"])
def test_sweeps_below_record_level_and_equal_exactly_where_p_is_one(image, quantity):
    base = PAPER.with_(image_size=image, **({"patch": (10, 10)} if quantity == "crop"
                                            else {"crop": 450}))
    threshold = pf.saturation_threshold(base, quantity)
    values = crop_grid(image) if quantity == "crop" else patch_grid()
    if threshold is not None and threshold <= values[-1]:
        values = sorted(set(values) | {threshold, threshold - 1})
    rows = pf.sweep_rows("t", base, quantity, values, (4.0,), DISC)
    for row in rows:
        saturated = threshold is not None and row["value"] >= threshold
        assert row["saturated"] is saturated and (row["p"] == 1.0) is saturated
        if saturated:
            assert row["epsilon_patch"] == row["epsilon_record"]
        else:
            assert row["epsilon_patch"] < row["epsilon_record"]
    eps = [r["epsilon_patch"] for r in rows]
    assert eps == sorted(eps)  # epsilon grows with crop and with patch size
    if image == WIDE and quantity == "patch":
        assert max(eps) < 0.9 * rows[0]["epsilon_record"]  # an advantage throughout


FIG2_PANELS = PRIVACY_FIGURES["fig2"].panels + PRIVACY_FIGURES["fig18"].panels + \
    PRIVACY_FIGURES["fig19"].panels + PRIVACY_FIGURES["fig20"].panels + \
    PRIVACY_FIGURES["fig21"].panels


@pytest.mark.parametrize("title,setting", FIG2_PANELS, ids=[t for t, _ in FIG2_PANELS])
def test_profiles_patch_below_record_and_data_level_above_patch(title, setting):
    rows = pf.profile_rows(title, setting, epsilon_grid(50), DISC)
    assert all(r["epsilon"] > 709 for r in rows if np.isnan(r["delta_patch"]))  # e^eps overflow
    rows = [r for r in rows if not np.isnan(r["delta_patch"])]
    for r in rows:  # up to the accountant's numerical floor (its truncated tail mass)
        assert r["delta_patch"] <= r["delta_record"] + NUMERICAL_ZERO
        assert r["delta_data_level"] >= r["delta_patch"] - NUMERICAL_ZERO, r["epsilon"]
    positive = [r for r in rows if r["delta_record"] > 1e-6]
    assert all(r["delta_patch"] < r["delta_record"] for r in positive)


def test_the_data_level_claim_holds_in_the_papers_profile_setting_only():
    """The data-level baseline is one release (r / sigma_data fixed by the patch); the DP-SGD
    curves move with q, z and the steps. In the paper's profile setting (q = 1e-3, 1e5 steps,
    z = 1) sigma_data = 1000 leaks more than patch-level DP-SGD. In the Cityscapes training
    setting at the same z (q = 200/2975, 1500 steps; 'patchdp profile' as a previous session ran
    it) DP-SGD leaks more than a single release at the CLI's default sigma_data = 5000, and
    even at 1000: the inversion seen there is the setting, not a bug in the baseline."""
    grid = epsilon_grid(50)
    grid = grid[grid < 700]
    paper = privacy_profile(PAPER.with_(patch=(10, 10)).run(), grid, DISC)
    assert np.all(data_level_profile(1000.0, (10, 10), grid) >= paper - NUMERICAL_ZERO)
    assert CITYSCAPES.noise_multiplier == 1.0
    cityscapes = privacy_profile(CITYSCAPES.run(), grid, DISC)
    for sigma_data in (5000.0, 1000.0):
        assert np.any(data_level_profile(sigma_data, (10, 10), grid) < cityscapes - 1e-3)


def test_gaussian_augmentation_amplifies_less_than_cropping_unless_noise_drowns_the_image():
    rows = pf.augmentation_rows("Cityscapes", CITYSCAPES, SIGMA_AUGS, (5,), DISC)
    z = {r["curve"]: r["noise_multiplier"] for r in rows}
    amp = {r["curve"]: r["amplification"] for r in rows}
    record, patch = z["record-level"], z["patch-level"]
    assert patch < record
    by_sigma = [z[f"Gaussian augmentation σ_aug = {s:g}"] for s in SIGMA_AUGS]
    assert by_sigma[0] == pytest.approx(record, rel=2e-2)  # sigma_aug = 255: TV ~ 1
    assert patch < by_sigma[1] < record                     # 10x the pixel range: still worse
    assert by_sigma[2] < patch                              # 100x: the image is noise
    assert amp["Gaussian augmentation σ_aug = 2550"] > amp["patch-level"] > \
        amp["Gaussian augmentation σ_aug = 25500"]


def test_command_writes_png_and_csv(tmp_path, capsys):
    assert main(["fig20", "fig4", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "p = 1 exactly from crop 496" in out and "wrote" in out
    for name in ("fig20", "fig4"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with open(tmp_path / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows and "p" in rows[0] and "noise_multiplier" in rows[0]


def test_training_figures_print_their_grid_and_needs(capsys):
    assert main(["fig13", "fig5"]) == 0
    out = capsys.readouterr().out
    assert "scripts/run_paper_grid.py --config configs/dtd/resnet18.yaml" in out
    assert "patchdp reproduce fig13 --data-root ROOT" in out and "GPU-h" in out
    assert "preprocess_dtd.py" in out and "_resize.yaml" in out
    assert "configs/cityscapes/pspnet.yaml" in out and "phase B" not in out
    assert main(["fig99"]) == 2
    assert "unknown figure 'fig99'" in capsys.readouterr().err


def test_register_adds_a_patchdp_subcommand(capsys):
    import argparse

    from patchdp_opacus.reproduce.cli import register

    parser = argparse.ArgumentParser(prog="patchdp")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reproduce", "table1"])
    assert args.handler(args) == 0
    assert "configs/mnist/table1_crop.yaml" in capsys.readouterr().out
    from patchdp_opacus.cli import main as patchdp

    assert patchdp(["reproduce", "table1", "--data-root", "data/mnist", "--seeds", "1",
                    "--dry-run", "--runs", "elsewhere"]) == 0
    out = capsys.readouterr().out
    assert "--accounting none --seed 1 --output elsewhere/mnist_table1_crop/none_seed1" in out
    assert "--set privacy.epsilon=null" in out and "--data-root data/mnist" in out
