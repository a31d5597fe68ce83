"""The engine is a superset of opacus.PrivacyEngine: no geometry -> exactly Opacus; a geometry ->
the patch-level mode; the two never leak into each other."""

import json
import logging

import opacus
import pytest
import torch
from opacus.data_loader import DPDataLoader
from plugin_helpers import TinySegNet, per_image_ce, plain_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from patchdp_opacus import PrivacyEngine
from patchdp_opacus.cli import main
from patchdp_opacus.plugin.accountant import PatchPLDAccountant
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.privacy.accounting import (
    NO_AMPLIFICATION_WARNING,
    add_remove_poisson_epsilon,
)

GEOMETRY = dict(crop=(8, 10), private_region=(2, 2))


def _classification(seed=0):
    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=16)


def _train(model, opt, loader, epochs=2):
    for _ in range(epochs):
        for x, y in loader:
            if len(x) == 0:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("accountant", [None, "rdp", "gdp"])
def test_without_geometry_it_is_exactly_opacus(accountant, caplog):
    kw = {} if accountant is None else {"accountant": accountant}
    results = {}
    for name, cls in (("opacus", opacus.PrivacyEngine), ("patchdp", PrivacyEngine)):
        model, opt, loader = _classification()
        engine = cls(**kw)
        torch.manual_seed(1)  # Opacus draws Poisson batches and noise from torch's generator
        with caplog.at_level(logging.INFO, logger="patchdp_opacus.plugin.engine"):
            model, opt, dp_loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.1,
                max_grad_norm=1.0)
        assert isinstance(dp_loader, DPDataLoader)  # Poisson sampling by default
        results[name] = (_train(model, opt, dp_loader), engine.get_epsilon(1e-5),
                         engine.accountant.mechanism())
    assert torch.equal(results["opacus"][0], results["patchdp"][0])
    assert results["opacus"][1:] == results["patchdp"][1:]
    assert results["patchdp"][2] == (accountant or "prv")
    assert "record-level" in caplog.text and "crop=" in caplog.text


def test_make_private_with_epsilon_without_geometry_is_opacus():
    zs = []
    for cls in (opacus.PrivacyEngine, PrivacyEngine):
        model, opt, loader = _classification()
        _, dp_opt, _ = cls().make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=3.0,
            target_delta=1e-5, epochs=2, max_grad_norm=1.0)
        zs.append(dp_opt.noise_multiplier)
    assert zs[0] == zs[1]


def test_one_engine_two_calls_modes_do_not_leak():
    """An engine keeps the mode of its first make_private: its optimizer steps this engine's
    accountant, which composes one relation; a model in the other mode needs another engine."""
    patch_engine = PrivacyEngine()
    seg = TinySegNet()
    model, opt, loader = patch_engine.make_private(
        module=seg, optimizer=torch.optim.SGD(seg.parameters(), lr=0.1),
        data_loader=plain_loader(), criterion=per_image_ce(), noise_multiplier=1.0,
        max_grad_norm=1.0, **GEOMETRY)
    assert isinstance(patch_engine.accountant, PatchPLDAccountant)
    assert isinstance(loader, CropDPDataLoader)
    model2, opt2, loader2 = _classification()
    with pytest.raises(ValueError, match="already made a model private in the patch-level"):
        patch_engine.make_private(module=model2, optimizer=opt2, data_loader=loader2,
                                  noise_multiplier=1.0, max_grad_norm=1.0)
    assert isinstance(patch_engine.accountant, PatchPLDAccountant)  # untouched
    # the same geometry again is fine (one accountant, one p); another geometry is not
    seg2 = TinySegNet()
    with pytest.raises(ValueError, match="another crop/patch geometry"):
        patch_engine.make_private(
            module=seg2, optimizer=torch.optim.SGD(seg2.parameters(), lr=0.1),
            data_loader=plain_loader(), noise_multiplier=1.0, max_grad_norm=1.0,
            crop=(4, 4), private_region=(2, 2))

    opacus_engine = PrivacyEngine()
    model2, opt2, dp_loader = opacus_engine.make_private(
        module=model2, optimizer=opt2, data_loader=loader2, noise_multiplier=1.0,
        max_grad_norm=1.0)
    assert opacus_engine.accountant.mechanism() == "prv" and isinstance(dp_loader, DPDataLoader)
    _train(model2, opt2, dp_loader, epochs=1)
    with pytest.raises(ValueError, match="level='patch' needs a patch-level claim"):
        opacus_engine.get_epsilon(1e-5, level="patch")
    assert opacus_engine.get_epsilon(1e-5) > 0
    assert "opacus_orientation" not in opacus_engine.privacy_report(1e-5)
    seg3 = TinySegNet()
    with pytest.raises(ValueError, match="already made a model private in the Opacus"):
        opacus_engine.make_private(
            module=seg3, optimizer=torch.optim.SGD(seg3.parameters(), lr=0.1),
            data_loader=plain_loader(), noise_multiplier=1.0, max_grad_norm=1.0, **GEOMETRY)


def test_accountant_choice_per_mode():
    seg = TinySegNet()
    with pytest.raises(ValueError, match="Poisson sampling under add/remove"):
        PrivacyEngine(accountant="gdp").make_private(
            module=seg, optimizer=torch.optim.SGD(seg.parameters(), lr=0.1),
            data_loader=plain_loader(), noise_multiplier=1.0, max_grad_norm=1.0, **GEOMETRY)
    model, opt, loader = _classification()
    with pytest.raises(ValueError, match="needs a crop geometry"):
        PrivacyEngine(accountant="patch_pld").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0)
    with pytest.raises(ValueError, match="fixed-size"):
        PrivacyEngine().make_private(
            module=seg, optimizer=torch.optim.SGD(seg.parameters(), lr=0.1),
            data_loader=plain_loader(), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, **GEOMETRY)


def test_opacus_orientation_epsilon_matches_opacus_prv():
    from opacus.accountants import PRVAccountant

    for z, q, steps, delta in [(1.131, 0.125, 80, 1 / 1024), (2.0, 0.02, 500, 1e-5)]:
        prv = PRVAccountant()
        prv.history = [(z, q, steps)]
        ours = add_remove_poisson_epsilon([(z, q, steps)], delta)
        assert ours == pytest.approx(prv.get_epsilon(delta), rel=0.03)
    # a different relation than the record-level substitution claim of the same run (2C, fixed)
    from patchdp_opacus.privacy import PatchDPSGD, epsilon

    assert epsilon(PatchDPSGD(1.131, 0.125, 1.0, 80), 1 / 1024) > 4 * add_remove_poisson_epsilon(
        [(1.131, 0.125, 80)], 1 / 1024)


def test_report_and_cli_label_the_opacus_number_and_warn_at_p_one(capsys):
    seg = TinySegNet()
    engine = PrivacyEngine()
    with pytest.warns(UserWarning, match="p = 1"):
        model, opt, loader = engine.make_private(
            module=seg, optimizer=torch.optim.SGD(seg.parameters(), lr=0.1),
            data_loader=plain_loader(), criterion=per_image_ce(), noise_multiplier=1.0,
            max_grad_norm=1.0, crop=(20, 28), private_region=(2, 2))
    for x, y in loader:
        opt.zero_grad()
        per_image_ce()(model(x), y).backward()
        opt.step()
    orientation = engine.privacy_report(1e-5)["opacus_orientation"]
    assert "different neighbouring relation" in orientation["note"]
    assert orientation["epsilon"] == pytest.approx(add_remove_poisson_epsilon(
        engine.accountant.history, 1e-5))
    args = ["epsilon", "--image-size", "20", "28", "--crop-size", "20", "28", "--patch-size", "2",
            "2", "--dataset-size", "24", "--batch-size", "6", "--epochs", "1",
            "--noise-multiplier", "1", "--delta", "1e-5"]
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["warning"] == NO_AMPLIFICATION_WARNING
    assert payload["opacus_orientation"]["relation"].startswith("record-level add/remove")
    assert main(args) == 0
    assert "warning: p = 1" in capsys.readouterr().out
