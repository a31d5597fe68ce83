"""Shared set-up of the red-team tests (``test_epsilon_attacks*.py``): a tiny segmentation
run whose crop leaves the region out often (p = 64/169), the private engine, one honest DP
pass, and every reading of the claim."""

import torch
from plugin_helpers import TinySegData, per_image_ce
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
