"""The drop-in PrivacyEngine: loader, accountant and optimizer wired correctly, end to end."""

import math

import pytest
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from plugin_helpers import TinySegNet, per_image_ce, plain_loader

from patchdp_opacus import PrivacyEngine
from patchdp_opacus.plugin.accountant import GradientAccumulationError
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.privacy import CropGeometry, PatchDPSGD, epsilon, rectangle_inclusion

CROP, PATCH, SIZE = (8, 10), (2, 2), (20, 28)
DELTA = 1e-5


def make(grad_sample_mode="hooks", noise=1.0, C=1.0, n=24, batch_size=6, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinySegNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    out = engine.make_private(module=model, optimizer=opt, data_loader=plain_loader(n, batch_size),
                              criterion=per_image_ce(), noise_multiplier=noise, max_grad_norm=C,
                              crop=CROP, private_region=PATCH, seed=seed,
                              grad_sample_mode=grad_sample_mode, **kw)
    return engine, out


def run_epoch(model, opt, loader, criterion, physical=None):
    if physical is None:
        for x, y in loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
        return
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                            optimizer=opt) as mem:
        for x, y in mem:
            assert x.shape[0] <= physical
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()


def test_make_private_wires_loader_accountant_and_batch_size():
    # N=28, B=6: 5 steps per epoch; Opacus alone would set expected_batch_size int(28/5) = 5
    engine, (model, opt, loader) = make(n=28)
    assert isinstance(loader, CropDPDataLoader)
    assert opt.expected_batch_size == 6 == loader.batch_size
    assert len(loader) == 5
    p = rectangle_inclusion(CropGeometry(CROP), SIZE, PATCH).value
    assert p == (9 / 13) * (11 / 19)
    assert loader.inclusion_probability == p == engine.accountant.inclusion_probability
    assert loader.sample_rate == 6 / 28
    x, y = next(iter(loader))
    assert x.shape == (6, 3, *CROP) and y.shape == (6, *CROP)


@pytest.mark.parametrize("physical", [None, 2, 4])
def test_accounting_steps_equal_logical_steps(physical):
    engine, (model, opt, loader) = make(n=28)  # q = 6/28, not 1/len(loader) = 1/5
    crit = per_image_ce()
    for _ in range(2):
        run_epoch(model, opt, loader, crit, physical)
    assert len(engine.accountant) == 2 * len(loader)
    p = loader.inclusion_probability
    expected = epsilon(PatchDPSGD(1.0, 6 / 28, p, 2 * len(loader)), DELTA)
    assert engine.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    assert engine.get_epsilon(DELTA, level="record") == pytest.approx(
        epsilon(PatchDPSGD(1.0, 6 / 28, 1.0, 2 * len(loader)), DELTA), rel=1e-12)


def test_manual_gradient_accumulation_is_refused():
    engine, (model, opt, loader) = make()
    crit = per_image_ce()
    it = iter(loader)
    for _ in range(2):  # two loader batches, one optimizer step
        x, y = next(it)
        crit(model(x), y).backward()
    with pytest.raises(GradientAccumulationError, match="BatchMemoryManager"):
        opt.step()
    assert len(engine.accountant) == 0


@pytest.mark.parametrize("C", [0.5, 3.0])
def test_noise_std_is_z_times_C_and_epsilon_ignores_C(C):
    """Zero per-sample gradients: the update is pure noise / B (mean reduction)."""
    z = 1.7
    torch.manual_seed(0)
    big = torch.nn.Linear(400, 100)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * CROP[0] * CROP[1], 400),
                                big)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=plain_loader(), noise_multiplier=z,
        max_grad_norm=C, crop=CROP, private_region=PATCH, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    x, _ = next(iter(loader))
    (model(x) * 0.0).sum().backward()  # zero gradients, per-sample grads exist
    opt.step()
    deltas = torch.cat([(b - a.detach()).flatten() for a, b in zip(model.parameters(), before)])
    measured = deltas.std().item() * opt.expected_batch_size
    assert measured == pytest.approx(z * C, rel=0.03)
    assert engine.get_epsilon(DELTA) == pytest.approx(
        epsilon(PatchDPSGD(z, 6 / 24, loader.inclusion_probability, 1), DELTA), rel=1e-12)


def test_make_private_with_epsilon_reaches_target_in_logical_steps():
    torch.manual_seed(0)
    model = TinySegNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    target, epochs = 4.0, 3
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=plain_loader(), criterion=per_image_ce(),
        target_epsilon=target, target_delta=DELTA, epochs=epochs, max_grad_norm=1.0,
        crop=CROP, private_region=PATCH, seed=0)
    assert engine.target["steps"] == epochs * len(loader)  # not epochs / (q p)
    crit = per_image_ce()
    for _ in range(epochs):
        run_epoch(model, opt, loader, crit, physical=3)
    eps = engine.get_epsilon(DELTA)
    assert eps <= target and eps > 0.95 * target
    # record-level calibration asks for more noise for the same target
    model2 = TinySegNet()
    engine2 = PrivacyEngine()
    engine2.make_private_with_epsilon(
        module=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=0.1),
        data_loader=plain_loader(), target_epsilon=target, target_delta=DELTA, epochs=epochs,
        max_grad_norm=1.0, crop=CROP, private_region=PATCH, seed=0, level="record")
    assert engine2.noise_multiplier > engine.noise_multiplier


def test_checkpoint_round_trip_and_geometry_mismatch(tmp_path):
    engine, (model, opt, loader) = make()
    run_epoch(model, opt, loader, per_image_ce())
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=opt)
    eps = engine.get_epsilon(DELTA)
    next_batch = next(iter(loader))[0]

    engine2, (model2, opt2, loader2) = make(seed=5)
    engine2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    assert engine2.get_epsilon(DELTA) == eps and len(engine2.accountant) == len(loader)
    assert torch.equal(next(iter(loader2))[0], next_batch)  # same batch/crop stream
    run_epoch(model2, opt2, loader2, per_image_ce())
    run_epoch(model, opt, loader, per_image_ce())
    assert engine2.get_epsilon(DELTA) == engine.get_epsilon(DELTA)

    torch.manual_seed(0)
    other_model = TinySegNet()
    engine3 = PrivacyEngine()
    other_model, other_opt, _ = engine3.make_private(
        module=other_model, optimizer=torch.optim.SGD(other_model.parameters(), lr=0.1),
        data_loader=plain_loader(), noise_multiplier=1.0, max_grad_norm=1.0, crop=(10, 10),
        private_region=PATCH, seed=0)
    with pytest.raises(ValueError, match="geometry differs"):
        engine3.load_checkpoint(path=path, module=other_model, optimizer=other_opt)


def test_refusals():
    model = TinySegNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fixed-size"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=plain_loader(),
                                     noise_multiplier=1.0, max_grad_norm=1.0, crop=CROP,
                                     private_region=PATCH, poisson_sampling=True)
    with pytest.raises(ValueError, match="fixed-size"):
        PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=plain_loader(), target_epsilon=1.0,
            target_delta=DELTA, epochs=1, max_grad_norm=1.0, crop=CROP, private_region=PATCH,
            poisson_sampling=True)
    with pytest.raises(ValueError, match="Poisson sampling under add/remove"):
        PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=opt, data_loader=plain_loader(), noise_multiplier=1.0,
            max_grad_norm=1.0, crop=CROP, private_region=PATCH)
    with pytest.raises(ValueError, match="adaptive"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=plain_loader(),
                                     noise_multiplier=1.0, max_grad_norm=1.0, crop=CROP,
                                     private_region=PATCH, clipping="adaptive")
    with pytest.raises(ValueError, match="fast_options"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=plain_loader(),
                                     noise_multiplier=1.0, max_grad_norm=1.0, crop=CROP,
                                     private_region=PATCH, fast_options={"storage": "keep"})
    with pytest.raises(ValueError, match="need crop=.*private_region"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=plain_loader(),
                                     noise_multiplier=1.0, max_grad_norm=1.0, padding=(1, 1))
    _, (_, _, crop_loader) = make()
    model = TinySegNet()
    with pytest.raises(ValueError, match="already a CropDPDataLoader"):
        PrivacyEngine().make_private(module=model,
                                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=crop_loader, noise_multiplier=1.0,
                                     max_grad_norm=1.0, crop=CROP, private_region=PATCH)
    with pytest.raises(ValueError, match="larger than the padded image"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=plain_loader(), noise_multiplier=1.0, max_grad_norm=1.0, crop=(40, 40),
            private_region=PATCH)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_tiny_training_run_end_to_end(mode):
    engine, out = make(grad_sample_mode=mode, noise=0.3, C=5.0, n=24, batch_size=8,
                       noise_generator=torch.Generator().manual_seed(0))  # a fixed noise draw
    if mode == "ghost":
        model, opt, criterion, loader = out
    else:
        model, opt, loader = out
        criterion = per_image_ce()
    first = None
    for epoch in range(4):
        for x, y in loader:
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
    assert len(engine.accountant) == 4 * len(loader)
    assert loss.item() < first
    assert math.isfinite(engine.get_epsilon(DELTA)) and engine.get_epsilon(DELTA) < \
        engine.get_epsilon(DELTA, level="record")


def test_privacy_report_contents():
    engine, (model, opt, loader) = make()
    run_epoch(model, opt, loader, per_image_ce())
    rep = engine.privacy_report(DELTA)
    assert rep["steps"] == len(loader) and rep["batch_size"] == 6 and rep["dataset_size"] == 24
    assert rep["geometry"]["crop"]["crop_size"] == list(CROP)
    assert rep["epsilon_patch"] == engine.get_epsilon(DELTA)
    assert rep["effective_sample_rate"] == pytest.approx(loader.sample_rate *
                                                         loader.inclusion_probability)


@pytest.mark.parametrize("fast_options", [None, {"storage": "recompute"}])
def test_bk_fast_mode_through_the_engine_matches_hooks(fast_options):
    """grad_sample_mode='bk' (patchdp_opacus.fast) selected through the engine: with no noise,
    one logical step (2 BatchMemoryManager chunks) gives the same parameters as Opacus hooks,
    and the accountant counts one step."""
    params = {}
    for mode in ("hooks", "bk"):
        extra = {"fast_options": fast_options} if mode == "bk" and fast_options else {}
        engine, (model, opt, loader) = make(grad_sample_mode=mode, noise=0.0, C=0.05, n=24,
                                            batch_size=6, seed=3, **extra)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3,
                                optimizer=opt) as mem:
            it = iter(mem)
            for _ in range(2):
                x, y = next(it)
                opt.zero_grad()
                per_image_ce()(model(x), y).backward()
                opt.step()
        assert len(engine.accountant) == 1
        params[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert (params[mode] - start).abs().max() > 1e-4  # the step did move the model
    torch.testing.assert_close(params["bk"], params["hooks"], rtol=1e-5, atol=1e-7)


def test_budget_exhausted_warns_once_when_training_past_the_plan():
    torch.manual_seed(0)
    model = TinySegNet()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=plain_loader(), target_epsilon=3.0, target_delta=DELTA, epochs=1,
        max_grad_norm=1.0, crop=CROP, private_region=PATCH, seed=0)
    crit = per_image_ce()
    import warnings as _w

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        run_epoch(model, opt, loader, crit)  # the planned epoch: no warning
        assert not [w for w in caught if "budget" in str(w.message)]
        assert engine.get_epsilon(DELTA) <= 3.0
        run_epoch(model, opt, loader, crit)  # one epoch too many
    budget = [w for w in caught if "privacy budget exhausted" in str(w.message)]
    assert len(budget) == 1 and "make_private_with_epsilon" in str(budget[0].message)
    assert engine.get_epsilon(DELTA) > 3.0
