"""Shared set-up of the red-team tests (``test_epsilon_attacks*.py``): a tiny segmentation
run whose crop leaves the region out often (p = 64/169), the private engine, one honest DP
pass, and every reading of the claim."""

import torch
from plugin_helpers import TinySegData, per_image_ce
from torch import nn
from torch.utils.data import DataLoader

from patchdp_opacus import PrivacyEngine

CROP, REGION, SIZE = (8, 8), (1, 1), (20, 20)   # p = 64/169 < 1
#: a refusal with one of these is the safe outcome of an attack
SAFE_ERRORS = (RuntimeError, ValueError, TypeError)


def make_loader(n=24, batch_size=6, dataset=None, **kw):
    return DataLoader(dataset if dataset is not None else TinySegData(n, SIZE),
                      batch_size=batch_size, **kw)


def make_private(model, *, mode="hooks", noise=1.0, clip=1.0, lr=0.1, loader=None,
                 optimizer=None, **kw):
    """``(engine, make_private's return)``; the optimizer defaults to SGD over the trainable
    parameters."""
    optimizer = optimizer or torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr)
    engine = PrivacyEngine()
    out = engine.make_private(module=model, optimizer=optimizer,
                              data_loader=loader if loader is not None else make_loader(),
                              noise_multiplier=noise, max_grad_norm=clip, crop=CROP,
                              private_region=REGION, criterion=per_image_ce(),
                              grad_sample_mode=mode, **kw)
    return engine, out


def dp_pass(model, opt, loader):
    """One pass of the plain DP loop over the returned loader."""
    for x, y in loader:
        opt.zero_grad()
        per_image_ce()(model(x), y).backward()
        opt.step()


def read_claim(engine, delta=1e-3):
    """What a user prints: every reading of the claim (each with its integrity checks)."""
    eps = engine.get_epsilon(delta)
    engine.accountant.get_epsilon(delta)
    engine.privacy_report(delta)
    return eps


def post_crop_refused(stage, dataset=None) -> bool:
    """One pass of a crop-aware loader with ``stage`` as its post-crop transform (12 uint8
    images by default): True if it was refused."""
    from torch.utils.data import TensorDataset

    from patchdp_opacus.plugin.loader import CropDPDataLoader

    if dataset is None:
        g = torch.Generator().manual_seed(0)
        dataset = TensorDataset(
            torch.randint(0, 256, (12, 3, *SIZE), dtype=torch.uint8, generator=g),
            torch.randint(0, 3, (12, *SIZE), generator=g))
    try:
        loader = CropDPDataLoader.from_data_loader(
            DataLoader(dataset, batch_size=4), crop=CROP, private_region=REGION,
            image_sizes=[SIZE], post_crop_transform=stage)
        for _ in loader:
            pass
    except SAFE_ERRORS:
        return True
    return False


# noise 1, C = 1, lr 1, B = 6, ~900 weights: an honest DP step moves the weights by ~5
HONEST_MOVE = 100.0


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def moved(model, before) -> float:
    """Euclidean distance of the model's parameters from ``before``."""
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                                for p, b in zip(model.parameters(), before))))


def assert_one_step_is_honest(engine, model, dp_model, opt, loader, what, crit=None):
    """One DP step and every reading of the claim: refused (safe), or the model moved no more
    than an honest DP step moves it."""
    crit = crit or per_image_ce()
    try:
        x, y = next(iter(loader))
        before = params_of(model)
        opt.zero_grad()
        crit(dp_model(x), y).backward()
        opt.step()
        eps = read_claim(engine)
    except SAFE_ERRORS:
        return
    distance = moved(model, before)
    assert distance < HONEST_MOVE, f"{what} moved the model by {distance:.3g}; epsilon {eps:.3g}"


class Prototypes(nn.Module):
    """A 1x1 conv and frozen class "prototypes" kept as a Parameter (saved with the model,
    in ``SGD(model.parameters())``): what prototype / memory-bank methods write from private
    features."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.prototypes = nn.Parameter(torch.zeros(classes, 3), requires_grad=False)

    def forward(self, x):
        return self.conv(x)
