"""The Opacus accountant: registry, lazy history, levels, checkpoints, refusal paths."""

import types

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from patchdp_opacus.plugin.accountant import (
    GradientAccumulationError,
    PatchPLDAccountant,
)
from patchdp_opacus.privacy import (
    CropGeometry,
    PatchDPSGD,
    PatchPrivacySpec,
    Rectangle,
    epsilon,
)

SPEC = PatchPrivacySpec(CropGeometry(33), Rectangle(4, 4), [(64, 96)])
DELTA = 1e-5


def test_registered_and_created_by_opacus():
    acc = create_accountant("patch_pld")
    assert isinstance(acc, PatchPLDAccountant)
    assert acc.mechanism() == "patch_pld" and len(acc) == 0 and acc.get_epsilon(DELTA) == 0.0


def test_history_read_lazily_and_p_applied_once():
    acc = PatchPLDAccountant(SPEC)
    p = SPEC.inclusion_probability
    assert 0 < p < 1
    acc.history = [(1.2, 0.1, 30)]  # what opacus' get_noise_multiplier does
    assert acc.get_epsilon(DELTA) == epsilon(PatchDPSGD(1.2, 0.1, p, 30), DELTA)
    assert acc.get_epsilon(DELTA, level="record") == epsilon(PatchDPSGD(1.2, 0.1, 1.0, 30), DELTA)
    # p applied exactly once: not p^2, not 1
    assert acc.get_epsilon(DELTA) != epsilon(PatchDPSGD(1.2, 0.1, p * p, 30), DELTA)
    with pytest.raises(ValueError, match="level"):
        acc.get_epsilon(DELTA, level="pixel")


def test_steps_merge_and_mixed_history_composes():
    acc = PatchPLDAccountant(SPEC)
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=0.2)
    for _ in range(3):
        acc.step(noise_multiplier=2.0, sample_rate=0.2)
    assert acc.history == [(1.0, 0.2, 5), (2.0, 0.2, 3)] and len(acc) == 8
    p = SPEC.inclusion_probability
    expected = epsilon([PatchDPSGD(1.0, 0.2, p, 5), PatchDPSGD(2.0, 0.2, p, 3)], DELTA)
    assert acc.get_epsilon(DELTA) == pytest.approx(expected)
    assert epsilon(PatchDPSGD(1.0, 0.2, p, 5), DELTA) < acc.get_epsilon(DELTA) < \
        epsilon(PatchDPSGD(1.0, 0.2, p, 8), DELTA)


def test_opacus_get_noise_multiplier_works_with_it():
    p = SPEC.inclusion_probability
    z = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.1, steps=50,
                             accountant="patch_pld", inclusion_probability=p,
                             epsilon_tolerance=0.01)
    e = epsilon(PatchDPSGD(z, 0.1, p, 50), DELTA)
    assert 3.0 - 0.01 <= e <= 3.0
    # without a spec the accountant is record level (p = 1): more noise for the same target
    z_record = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.1,
                                    steps=50, accountant="patch_pld")
    assert z_record > z


def test_state_dict_round_trip_and_geometry_checks():
    acc = PatchPLDAccountant(SPEC)
    for _ in range(7):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    state = acc.state_dict()
    assert state["spec"]["crop"]["crop_size"] == [33, 33] and state["mechanism"] == "patch_pld"
    fresh = PatchPLDAccountant()
    fresh.load_state_dict(state)
    assert fresh.get_epsilon(DELTA) == acc.get_epsilon(DELTA) and len(fresh) == 7
    same = PatchPLDAccountant(PatchPrivacySpec(CropGeometry(33), Rectangle(4, 4), [(64, 96)]))
    same.load_state_dict(state)
    assert same.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    other = PatchPLDAccountant(PatchPrivacySpec(CropGeometry(31), Rectangle(4, 4), [(64, 96)]))
    with pytest.raises(ValueError, match="geometry differs"):
        other.load_state_dict(state)
    record = PatchPLDAccountant()
    record.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="no patch geometry"):
        PatchPLDAccountant(SPEC).load_state_dict(record.state_dict())
    with pytest.raises(ValueError, match="another crop"):
        acc.set_spec(PatchPrivacySpec(CropGeometry(31), Rectangle(4, 4), [(64, 96)]))


def test_hook_counts_logical_steps_and_refuses_accumulation():
    acc = PatchPLDAccountant(SPEC)
    hook = acc.get_optimizer_hook_fn(sample_rate=0.25)
    hook(types.SimpleNamespace(noise_multiplier=0.9, accumulated_iterations=1))
    hook(types.SimpleNamespace(noise_multiplier=0.9, accumulated_iterations=1))
    assert acc.history == [(0.9, 0.25, 2)]
    with pytest.raises(GradientAccumulationError, match="BatchMemoryManager"):
        hook(types.SimpleNamespace(noise_multiplier=0.9, accumulated_iterations=2))
    assert len(acc) == 2
