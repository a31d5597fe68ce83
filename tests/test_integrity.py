"""What each noisy step releases: one logical batch, one row per sample, no sample-mixing layer,
noise from OS entropy (patchdp_opacus.plugin.integrity through the engine)."""

import warnings

import pytest
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from plugin_helpers import TinySegNet, per_image_ce, plain_loader
from torch import nn
from torch.utils.data import DataLoader, Dataset

from patchdp_opacus import PrivacyEngine
from patchdp_opacus.plugin.accountant import GradientAccumulationError
from patchdp_opacus.plugin.compat import make_private_compatible
from patchdp_opacus.plugin.integrity import (
    LogicalBatchError,
    PerSampleIntegrityError,
    SampleMixingError,
)

CROP, PATCH = (4, 4), (1, 1)
MODES = ["hooks", "ghost", "bk"]


class IndexImages(Dataset):
    """Image i is constant i + 1 (so the crop's mean tells which record it is)."""

    def __init__(self, n=24, size=(6, 6)):
        self.n, self.size = n, size
        self.image_sizes = [size]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, *self.size), float(i + 1)), 0


class MeanLinear(nn.Module):
    """out = w * mean(x): the per-sample gradient of sum(out) is mean(x) = record index + 1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 1, bias=False)

    def forward(self, x):
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def _sum_loss(out, _y=None):
    return out.sum()


class PerSampleSum(nn.Module):
    """sum(out) per sample; ``reduction`` as torch losses (ghost mode sets "none")."""

    def __init__(self, reduction="sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred, _target=None):
        per = pred.reshape(len(pred), -1).sum(1)
        return per if self.reduction == "none" else per.sum()


def private(model, *, mode="hooks", n=24, batch=6, noise=0.0, C=1e6, workers=0, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine()
    loader = DataLoader(IndexImages(n), batch_size=batch, num_workers=workers)
    out = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                              noise_multiplier=noise, max_grad_norm=C, crop=CROP,
                              private_region=PATCH, grad_sample_mode=mode,
                              criterion=PerSampleSum(), loss_reduction="sum", **kw)
    return engine, out


def _loss_fn(out):
    """The loss callable of a (model, opt, [criterion,] loader) tuple (ghost wraps it)."""
    if len(out) == 4:
        crit = out[2]
        return lambda pred: crit(pred, torch.zeros_like(pred))
    return _sum_loss


# --- finding 4: accumulation through signal_skip_step ----------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_signal_skip_step_accumulation_is_refused(mode):
    engine, out = private(MeanLinear(), mode=mode)
    model, opt, loader = out[0], out[1], out[-1]
    loss = _loss_fn(out)
    it = iter(loader)
    x, _ = next(it)
    opt.signal_skip_step(do_skip=True)  # Opacus' manual accumulation over two loader draws
    loss(model(x)).backward()
    with pytest.raises(GradientAccumulationError, match="signal_skip_step"):
        opt.step()
    assert len(engine.accountant) == 0


# --- finding 5: a BatchMemoryManager loop left mid logical batch --------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_abandoned_logical_batch_is_discarded_never_released(mode, workers):
    """B = 6 in chunks of 2; break after the first chunk; the next loop's noisy steps release
    exactly their own logical batches (noise 0, no clipping: lr=1 SGD moves w by the summed
    per-sample gradients = sum of the released records' index + 1)."""
    engine, (model, opt, loader) = private(MeanLinear(), mode=mode, workers=workers)
    w = model._module.fc.weight if hasattr(model, "_module") else model.fc.weight
    released, chunks = [], []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2,
                            optimizer=opt) as mem:
        for x, _ in mem:
            opt.zero_grad()
            _sum_loss(model(x)).backward()
            opt.step()
            break  # leaves 4 of the 6 samples of logical batch 0 unstepped
    assert len(engine.accountant) == 0
    with pytest.warns(UserWarning, match="discarding an unfinished logical batch"):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2,
                                optimizer=opt) as mem:
            for x, _ in mem:
                before, steps = w.item(), len(engine.accountant)
                opt.zero_grad()
                _sum_loss(model(x)).backward()
                opt.step()
                chunks.append(x.mean(dim=(1, 2, 3)).sum().item())
                if len(engine.accountant) > steps:  # a noisy step: one logical batch, 3 chunks
                    assert len(chunks) == 3
                    released.append((before - w.item(), sum(chunks)))
                    chunks = []
    assert len(released) == len(loader) == len(engine.accountant)
    for moved, expected in released:
        assert moved == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_chunk_that_is_not_stepped_is_refused(workers):
    """`continue` before optimizer.step() would shift every later chunk into the wrong logical
    batch (the skip flags are per sampled chunk); caught at the next step."""
    engine, (model, opt, loader) = private(MeanLinear(), n=48, workers=workers)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2,
                            optimizer=opt) as mem:
        with pytest.raises(LogicalBatchError, match="without optimizer.step"):
            for i, (x, _) in enumerate(mem):
                if i == 1:
                    continue  # the user skips a chunk of logical batch 0
                opt.zero_grad()
                _sum_loss(model(x)).backward()
                opt.step()
    assert len(engine.accountant) == 0


def test_part_of_a_batch_without_batch_memory_manager_is_refused():
    engine, (model, opt, loader) = private(MeanLinear())
    x, _ = next(iter(loader))
    _sum_loss(model(x[:3])).backward()
    with pytest.raises(LogicalBatchError, match="BatchMemoryManager"):
        opt.step()


# --- finding 6: layers that mix samples without trainable parameters ---------------------------
def _bn_frozen_in_train_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(1))
    model(torch.zeros(2, 1, *CROP))
    for p in model[1].parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("build", [
    _bn_frozen_in_train_mode,
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.Flatten(),
                          nn.Linear(8, 1)),
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True),
                          nn.Flatten(), nn.Linear(8, 1)),
], ids=["frozen-bn-train-mode", "bn-affine-false", "instancenorm-running-stats"])
def test_sample_mixing_layers_refused(build):
    with pytest.raises(SampleMixingError, match="mixes samples"):
        private(build())
    # the layer in eval mode for make_private, back to train mode later: refused at the forward
    model = build()
    model[1].eval()
    engine, (model, opt, loader) = private(model)
    model.train()
    x, _ = next(iter(loader))
    with pytest.raises(SampleMixingError, match="mixes samples"):
        model(x)


def test_buffer_updates_in_a_training_forward_are_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 1)
            self.register_buffer("batch_mean", torch.zeros(16))

        def forward(self, x):
            x = x.flatten(1)
            self.batch_mean.copy_(x.mean(0))  # a batch statistic, released without noise
            return self.lin(x)

    engine, (model, opt, loader) = private(Counter())
    x, _ = next(iter(loader))
    with pytest.raises(SampleMixingError, match="batch_mean"):
        model(x)
    with torch.no_grad():
        model.eval()
        model(x)  # evaluation may do what it likes


def test_controls_groupnorm_and_compat_frozen_bn_train():
    gn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 1))
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 1))
    bn, _ = make_private_compatible(bn, norm="frozen")
    for model in (gn, bn):
        engine, (model, opt, loader) = private(model)
        model.train()
        for x, _ in loader:
            opt.zero_grad()
            _sum_loss(model(x)).backward()
            opt.step()
        assert len(engine.accountant) == len(loader)


# --- finding 7: a model that folds a sample into several rows -----------------------------------
class Tiles(nn.Module):
    """Cuts every crop into 4 tiles stacked in dimension 0, then averages them back."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        b = x.shape[0]
        tiles = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(b * 4, 4)
        return self.fc(tiles).reshape(b, 4).mean(1, keepdim=True)


@pytest.mark.parametrize("mode", MODES)
def test_folded_batch_rows_are_refused(mode):
    engine, out = private(Tiles(), mode=mode)
    model, opt, loader = out[0], out[1], out[-1]
    loss = _loss_fn(out)
    x, _ = next(iter(loader))
    # hooks and bk: the guard's message; ghost: Opacus' own shape error in its second backward
    # (24 clip factors for 6 per-sample losses), also before anything is released
    expected = RuntimeError if mode == "ghost" else PerSampleIntegrityError
    with pytest.raises(expected, match="per-sample gradient rows|size of tensor a \\(24\\)"):
        loss(model(x)).backward()
        opt.step()
    assert len(engine.accountant) == 0


@pytest.mark.parametrize("mode", MODES)
def test_control_plain_model_steps_in_every_mode(mode):
    engine, out = private(MeanLinear(), mode=mode)
    model, opt, loader = out[0], out[1], out[-1]
    loss = _loss_fn(out)
    for x, _ in loader:
        opt.zero_grad()
        loss(model(x)).backward()
        opt.step()
    assert len(engine.accountant) == len(loader)


# --- finding 11: noise not reproducible from public values -------------------------------------
def _noise_draw(**kw):
    torch.manual_seed(0)  # the "config seed": must not determine the noise
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 400))
    engine, (model, opt, loader) = private(model, noise=1.0, C=1.0, **kw)
    before = model._module[1].weight.detach().clone()
    x, _ = next(iter(loader))
    (model(x) * 0.0).sum().backward()
    opt.step()
    return engine, before - model._module[1].weight.detach()


def test_noise_is_drawn_from_os_entropy_not_the_torch_seed():
    e1, d1 = _noise_draw()
    e2, d2 = _noise_draw()
    assert not torch.equal(d1, d2)
    assert "OS entropy" in e1.privacy_report(1e-5)["noise_source"]
    # reproducible only on request, and then reported as such
    e3, d3 = _noise_draw(noise_generator=torch.Generator().manual_seed(7))
    e4, d4 = _noise_draw(noise_generator=torch.Generator().manual_seed(7))
    assert torch.equal(d3, d4)
    assert "not private if its seed is known" in e3.privacy_report(1e-5)["noise_source"]


def test_secure_mode_reseeds_noise_and_keeps_std():
    torch.manual_seed(0)
    z, C, B = 1.3, 2.0, 6
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2000))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(secure_mode=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Secure RNG")  # not "turned off" here
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=DataLoader(IndexImages(), batch_size=B),
            noise_multiplier=z, max_grad_norm=C, crop=CROP, private_region=PATCH,
            criterion=PerSampleSum(), loss_reduction="sum")
    assert opt.secure_mode and loader.batch_sampler.secure
    generators = []
    for x, _ in loader:
        before = model._module[1].weight.detach().clone()
        opt.zero_grad()
        (model(x) * 0.0).sum().backward()
        opt.step()
        generators.append(opt.generator)
        noise = before - model._module[1].weight.detach()  # loss_reduction="sum": no /B
        assert noise.std().item() == pytest.approx(z * C, rel=0.05)
    assert len({id(g) for g in generators}) == len(generators)  # a fresh OS seed every step
    with pytest.raises(ValueError, match="secure_mode"):
        PrivacyEngine(secure_mode=True).make_private(
            module=nn.Linear(1, 1), optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(),
                                                              lr=1),
            data_loader=DataLoader(IndexImages(), batch_size=B), noise_multiplier=z,
            max_grad_norm=C, crop=CROP, private_region=PATCH,
            noise_generator=torch.Generator())


def test_sampling_is_secret_by_default_and_checkpoint_holds_no_rng_state(tmp_path):
    def first_batch():
        torch.manual_seed(0)
        _, (model, opt, loader) = private(MeanLinear())
        return next(iter(loader))[0]

    assert not torch.equal(first_batch(), first_batch())
    engine, (model, opt, loader) = private(MeanLinear())
    assert "OS entropy" in engine.privacy_report(1e-5)["sampling_source"]
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=opt)
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    assert not [k for k in saved if "rng" in k or "generator" in k]
    seeded, (model, opt, loader) = private(MeanLinear(), seed=3)
    assert "seed stays secret" in seeded.privacy_report(1e-5)["sampling_source"]
    seeded.save_checkpoint(path=tmp_path / "s.pt", module=model, optimizer=opt)
    assert "patchdp_sampler_rng_state" in torch.load(tmp_path / "s.pt", weights_only=False)


def test_opacus_secure_rng_warning_is_not_suppressed():
    with pytest.warns(UserWarning, match="Secure RNG turned off"):
        PrivacyEngine()


def test_engine_helpers_still_train_tiny_segnet_with_bmm():
    torch.manual_seed(0)
    model = TinySegNet()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=plain_loader(), criterion=per_image_ce(), noise_multiplier=1.0,
        max_grad_norm=1.0, crop=(8, 10), private_region=(2, 2))
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=opt) as m:
        for x, y in m:
            opt.zero_grad()
            per_image_ce()(model(x), y).backward()
            opt.step()
    assert len(engine.accountant) == len(loader)
