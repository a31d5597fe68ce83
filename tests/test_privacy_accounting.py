"""Theorem-2 accounting: closed forms, limits, monotonicity, calibration and a Monte Carlo audit."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from patchdp_opacus.privacy import (
    CropGeometry,
    PatchDPSGD,
    calibrate_noise,
    data_level_profile,
    delta,
    epsilon,
    gaussian_augmentation_tv,
    group_epsilon,
    inclusion_probability,
    input_sensitivity,
    privacy_profile,
)
from patchdp_opacus.privacy.accounting import one_step_profile


def closed_form_remove(z, w, eps, s=2.0):
    """One-step delta(eps), eps >= 0, of P=(1-w)N(0,z^2)+wN(s,z^2) vs Q=N(0,z^2) in closed form
    (README, "The analysis in one paragraph")."""
    x = s / 2 + (z * z / s) * np.log((np.exp(eps) - 1 + w) / w)
    return (1 - w) * norm.sf(x / z) + w * norm.sf((x - s) / z) - np.exp(eps) * norm.sf(x / z)


def closed_form_add(z, w, eps):
    """eps < 0: H_{e^eps}(Q||P) = 1 - e^eps + e^eps H_{e^-eps}(P||Q)."""
    return 1 - np.exp(eps) + np.exp(eps) * closed_form_remove(z, w, -eps)


@pytest.mark.parametrize("z,w", [(1.0, 0.02), (0.7, 0.3), (2.0, 1.0), (1.3, 0.001), (0.5, 0.6)])
def test_one_step_delta_matches_closed_form(z, w):
    eps = np.array([0.0, 0.05, 0.5, 1.0, 2.0, 3.5])
    expected = closed_form_remove(z, w, eps)
    np.testing.assert_allclose(one_step_profile(z, w)(eps), expected, rtol=1e-6)
    # The composed-PLD path for one step, at discretisation grid points.
    run = PatchDPSGD(z, w, 1.0, 1)
    got = np.array([delta(run, e) for e in eps])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    neg = -eps[1:]
    np.testing.assert_allclose(one_step_profile(z, w)(neg), closed_form_add(z, w, neg), rtol=1e-6)
    np.testing.assert_allclose([delta(run, e) for e in neg], closed_form_add(z, w, neg), rtol=1e-6)


def test_record_level_full_batch_is_composed_gaussian():
    """q = p = 1: T steps of the Gaussian mechanism with sensitivity 2 = one Gaussian with
    mu = 2 sqrt(T) / z (closed form), so the whole composition path is checked."""
    z, T = 3.0, 40
    mu = 2 * math.sqrt(T) / z
    for eps in (0.5, 1.0, 2.0, 4.0):
        exact = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        got = delta(PatchDPSGD(z, 1.0, 1.0, T), eps)
        assert got >= exact - 1e-12  # pessimistic
        assert got == pytest.approx(exact, rel=2e-3)


def test_only_q_times_p_matters_and_p_one_is_record_level():
    a = epsilon(PatchDPSGD(1.1, 0.1, 0.5, 200), 1e-5)
    b = epsilon(PatchDPSGD(1.1, 0.05, 1.0, 200), 1e-5)
    assert a == pytest.approx(b, rel=1e-9)
    run = PatchDPSGD(1.1, 0.1, 0.5, 200)
    assert epsilon(run.record_level(), 1e-5) == epsilon(PatchDPSGD(1.1, 0.1, 1.0, 200), 1e-5)
    assert epsilon(run.record_level(), 1e-5) > epsilon(run, 1e-5)


def test_cityscapes_reference_values():
    """Cityscapes patch setting, z=1, 100 epochs, delta=1/N gives eps ~ 32.7 (the
    wrong REPLACE_ONE / two-PMF shortcuts give ~7.3 / ~26.8)."""
    N, B = 2975, 200
    p = inclusion_probability(CropGeometry(505), (1024, 2048), (10, 10)).value
    run = PatchDPSGD(1.0, B / N, p, 100 * round(N / B))
    assert epsilon(run, 1 / N) == pytest.approx(32.7, abs=0.1)


def test_monotonicity():
    base = dict(noise_multiplier=1.0, sample_rate=0.05, inclusion_probability=0.3, steps=100)
    e0 = epsilon(PatchDPSGD(**base), 1e-5)
    assert epsilon(PatchDPSGD(**{**base, "inclusion_probability": 0.6}), 1e-5) > e0
    assert epsilon(PatchDPSGD(**{**base, "steps": 200}), 1e-5) > e0
    assert epsilon(PatchDPSGD(**{**base, "noise_multiplier": 1.5}), 1e-5) < e0
    assert epsilon(PatchDPSGD(**base), 1e-6) > e0
    assert epsilon(PatchDPSGD(**{**base, "steps": 0}), 1e-5) == 0.0


def test_discretisation_stable_and_pessimistic():
    run = PatchDPSGD(0.9, 0.07, 0.33, 300)
    fine, coarse = epsilon(run, 1e-5, 1e-4), epsilon(run, 1e-5, 1e-3)
    assert coarse >= fine - 1e-9
    assert coarse == pytest.approx(fine, rel=5e-3)


@settings(max_examples=8, deadline=None)
@given(target=st.floats(0.3, 20.0), q=st.floats(0.01, 0.5), p=st.floats(0.05, 1.0),
       steps=st.integers(1, 40))
def test_calibration_never_overshoots_and_is_tight(target, q, p, steps):
    delta_ = 1e-5
    z = calibrate_noise(target, delta_, q, p, steps, tolerance=1e-3)
    assert epsilon(PatchDPSGD(z, q, p, steps), delta_) <= target
    assert epsilon(PatchDPSGD(z * (1 - 3e-3), q, p, steps), delta_) > target


@pytest.mark.parametrize("fine_shift", [0.05, -0.05])
def test_calibration_safe_when_finer_discretisation_moves_epsilon(monkeypatch, fine_shift):
    """The ladder assumes a finer rung moves epsilon very little; with a synthetic epsilon whose
    finest rung is 5% above (or below) the coarser ones, the answer must still meet the target
    at the requested discretisation, and (shift up: that rung re-brackets and bisects) be
    tight there."""
    from patchdp_opacus.privacy import accounting

    fine = 1e-4
    calls = []

    def fake_epsilon(run, delta_, disc):
        calls.append(disc)
        return 10.0 / run.noise_multiplier * (1 + (fine_shift if disc <= fine else 0.0))

    monkeypatch.setattr(accounting, "epsilon", fake_epsilon)
    z = accounting.calibrate_noise(4.0, 1e-5, 0.1, 0.5, 10, discretization=fine)
    assert set(calls) == {1e-2, 1e-3, fine}
    assert fake_epsilon(PatchDPSGD(z, 0.1, 0.5, 10), 1e-5, fine) <= 4.0
    exact = 10.0 * (1 + fine_shift) / 4.0 if fine_shift > 0 else 10.0 / 4.0
    assert exact <= z <= exact * (1 + 2e-3)


def test_calibration_speed_setting_and_errors():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(0.0, 1e-5, 0.1, 0.5, 10)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise(1.0, 1.0, 0.1, 0.5, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        PatchDPSGD(1.0, 1.5, 0.5, 10)
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon(PatchDPSGD(0.0, 0.1, 0.5, 10), 1e-5)


def test_privacy_profile_is_decreasing_and_matches_delta():
    run = PatchDPSGD(1.0, 0.1, 0.4, 50)
    grid = np.linspace(0, 8, 9)
    prof = privacy_profile(run, grid)
    assert np.all(np.diff(prof) <= 0)
    assert prof[3] == pytest.approx(delta(run, grid[3]))
    # epsilon(delta) inverts delta(eps)
    e = epsilon(run, prof[4])
    assert e == pytest.approx(grid[4], abs=2e-3)


def test_group_privacy():
    run = PatchDPSGD(3.0, 0.1, 0.3, 50)
    e1 = epsilon(run, 1e-5)
    e2 = group_epsilon(run, 1e-5, 2)
    assert group_epsilon(run, 1e-5, 1) == e1
    assert e2 >= 2 * epsilon(run, 1e-5 / 2) - 1e-9  # k e' with delta' <= delta / k
    # the returned value satisfies the group-privacy conversion
    e_single = e2 / 2
    assert 2 * math.exp(e_single) * delta(run, e_single) <= 1e-5 * (1 + 1e-6)
    assert e2 < epsilon(run.record_level(), 1e-5)
    # where the conversion is weaker than record level, record level (valid for the whole
    # image) is returned
    weak = PatchDPSGD(1.0, 0.1, 0.9, 50)
    assert group_epsilon(weak, 1e-5, 3) == epsilon(weak.record_level(), 1e-5)


def test_baselines():
    r = input_sensitivity((10, 10))
    assert r == pytest.approx(255 * math.sqrt(300))
    sigma = 3000.0
    tv = gaussian_augmentation_tv(sigma, (10, 10))
    assert tv == pytest.approx(2 * norm.cdf(r / (2 * sigma)) - 1)
    assert 0 < tv < 1
    # Data-level noise: exact Gaussian-mechanism profile with mu = r / sigma.
    mu = r / sigma
    eps = np.array([0.0, 0.5, 1.0])
    exact = norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    np.testing.assert_allclose(data_level_profile(sigma, (10, 10), eps), exact, rtol=1e-6)


# --- Monte Carlo audit of the composed worst case -------------------------------------------
# Theorem-2 worst case: each step's released (1-d, units of C) output is x ~ P = (1-w)N(0,z^2)
# + wN(2,z^2) on one data set and x ~ Q = N(0,z^2) on its neighbour.  The true delta of T steps
# is E_P[(1 - e^{eps - L})_+] with L the summed log-likelihood ratio.  The audit estimates it
# independently of dp-accounting and checks that the claim is not refuted (estimate - 4 SE <=
# claimed delta), while deliberately wrong claims are refuted.

def _mc_delta(z, w, T, eps, n, rng, orientation="remove"):
    def log_ratio(x):  # log p(x)/q(x) with p = mixture, q = N(0, z^2)
        return np.log1p(w * np.expm1((2 * x - 2) / z ** 2))

    shifted = rng.random((n, T)) < w
    x = rng.standard_normal((n, T)) * z
    if orientation == "remove":  # sample from P, loss log P/Q
        x = x + 2.0 * shifted
        loss = log_ratio(x).sum(axis=1)
    else:  # sample from Q, loss log Q/P
        loss = -log_ratio(x).sum(axis=1)
    vals = np.maximum(0.0, 1.0 - np.exp(eps - loss))
    return vals.mean(), vals.std(ddof=1) / math.sqrt(n)


@pytest.mark.parametrize("orientation", ["remove", "add"])
def test_monte_carlo_audit(orientation):
    rng = np.random.default_rng(20261123)
    z, q, p, T = 0.8, 0.25, 0.6, 30
    w = q * p
    for eps in (0.5, 1.5):
        est, se = _mc_delta(z, w, T, eps, 200_000, rng, orientation)
        claimed = delta(PatchDPSGD(z, q, p, T), eps)
        assert est - 4 * se <= claimed, (est, se, claimed)
        # the audit has power: wrong claims are refuted
        wrong_sensitivity = delta(PatchDPSGD(2 * z, q, p, T), eps)  # = sensitivity 1 instead of 2
        wrong_p = delta(PatchDPSGD(z, q, p / 2, T), eps)
        if orientation == "remove":
            assert est - 4 * se > wrong_sensitivity, (est, se, wrong_sensitivity)
            assert est - 4 * se > wrong_p, (est, se, wrong_p)
