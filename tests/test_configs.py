"""The shipped configs load, hold the paper's settings (README, "Reproducing the paper"), and
the demo needs no download."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchdp_opacus.segmentation.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = {("cityscapes", "deeplabv3plus"), ("cityscapes", "pspnet"), ("a2d2", "deeplabv3plus"),
         ("a2d2", "pspnet")}


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert {(p.parent.name, p.stem) for p in paths} >= PAPER | {("configs", "demo")}
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("dataset,arch", sorted(PAPER))
def test_paper_configs_hold_the_paper_settings(dataset, arch):
    cfg = load_config(CONFIGS / dataset / f"{arch}.yaml")
    assert cfg.dataset.name == dataset and cfg.model.arch == arch
    assert (cfg.model.encoder_name, cfg.model.encoder_weights, cfg.model.output_stride) == \
        ("resnet101", "imagenet", 8)
    assert cfg.model.num_classes == {"cityscapes": 19, "a2d2": 18}[dataset]
    if arch == "deeplabv3plus":
        assert tuple(cfg.model.aspp_rates) == (12, 24, 36)
    p = cfg.privacy
    assert tuple(p.crop) == (505, 505) and tuple(p.padding) == (0, 0) and not p.pad_if_needed
    assert p.private_region == {"shape": "rectangle", "size": [10, 10]}
    assert p.max_grad_norm == 2.0 and p.delta is None  # delta = 1/N
    t = cfg.training
    assert (t.batch_size, t.lr) == (200, 0.02)
    assert t.epochs == {"cityscapes": 100, "a2d2": 25}[dataset]


def test_demo_runs_without_downloads_and_uses_the_fast_mode():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.dataset.name == "synthetic" and cfg.model.encoder_weights is None
    assert cfg.training.grad_sample_mode == "bk"
    assert cfg.privacy.accounting == "patch" and cfg.privacy.epsilon == 8.0
