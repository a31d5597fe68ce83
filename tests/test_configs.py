"""The shipped configs load, hold the paper's settings (README, "Reproducing the paper"), and
the demo needs no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from patchdp_opacus.segmentation.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = {("cityscapes", "deeplabv3plus"), ("cityscapes", "pspnet"), ("a2d2", "deeplabv3plus"),
         ("a2d2", "pspnet")}


def _classification(path) -> bool:
    return (yaml.safe_load(path.read_text()) or {}).get("task") == "classification"


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert {(p.parent.name, p.stem) for p in paths} >= PAPER | {("configs", "demo")}
    for path in paths:
        if _classification(path):  # read by the classification integration (issue 14, phase B)
            continue
        load_config(path)


CLASSIFICATION = {("dtd", "resnet18"): ("resnet18", 128, 150, [100, 100], [5, 5], "frozen"),
                  ("dtd", "vgg11"): ("vgg11_bn", 64, 150, [100, 100], [5, 5], "frozen"),
                  ("mnist", "resnet18"): ("resnet18", 64, 15, [10, 10], [1, 1], "none"),
                  ("mnist", "vgg11"): ("vgg11", 64, 15, [10, 10], [1, 1], "none")}


@pytest.mark.parametrize("dataset,name", sorted(CLASSIFICATION))
def test_classification_configs_hold_the_paper_settings(dataset, name):
    cfg = yaml.safe_load((CONFIGS / dataset / f"{name}.yaml").read_text())
    arch, batch, epochs, crop, patch, norm = CLASSIFICATION[(dataset, name)]
    assert cfg["task"] == "classification" and cfg["dataset"]["name"] == dataset
    m, p, t = cfg["model"], cfg["privacy"], cfg["training"]
    classes = {"dtd": 47, "mnist": 10}[dataset]
    assert (m["arch"], m["norm"], m["num_classes"]) == (arch, norm, classes)
    assert m["weights"] == ("imagenet" if dataset == "dtd" else None)
    assert (t["batch_size"], t["epochs"], t["scheduler"]) == (batch, epochs, "cosine")
    assert (p["crop"], p["private_region"]["size"], p["delta"]) == (crop, patch, None)


def test_table1_pair_is_non_private_with_and_without_the_crop():
    crop, nocrop = (yaml.safe_load((CONFIGS / "mnist" / f"table1_{n}.yaml").read_text())
                    for n in ("crop", "nocrop"))
    assert crop["privacy"]["accounting"] == nocrop["privacy"]["accounting"] == "none"
    assert (crop["privacy"]["crop"], nocrop["privacy"]["crop"]) == ([10, 10], None)
    drop = ("name", "privacy")
    assert {k: v for k, v in crop.items() if k not in drop} == \
        {k: v for k, v in nocrop.items() if k not in drop}


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
