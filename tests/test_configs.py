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


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert {(p.parent.name, p.stem) for p in paths} >= PAPER | {("configs", "demo")} | \
        set(CLASSIFICATION) | {("dtd", "resnet18_resize"), ("dtd", "vgg11_resize")}
    for path in paths:
        cfg = load_config(path)
        assert cfg.task == ("classification" if path.parent.name in ("dtd", "mnist")
                            else "segmentation")


CLASSIFICATION = {("dtd", "resnet18"): ("resnet18", 128, 150, [100, 100], [5, 5], "frozen"),
                  ("dtd", "vgg11"): ("vgg11_bn", 64, 150, [100, 100], [5, 5], "frozen"),
                  ("mnist", "resnet18"): ("resnet18", 64, 15, [10, 10], [1, 1], "none"),
                  ("mnist", "vgg11"): ("vgg11", 64, 15, [10, 10], [1, 1], "none")}


@pytest.mark.parametrize("dataset,name", sorted(CLASSIFICATION))
def test_classification_configs_hold_the_paper_settings(dataset, name):
    loaded = load_config(CONFIGS / dataset / f"{name}.yaml")
    assert loaded.model.arch == CLASSIFICATION[(dataset, name)][0]
    assert loaded.privacy.transform is None  # the offline-preprocessed DTD copy
    cfg = yaml.safe_load((CONFIGS / dataset / f"{name}.yaml").read_text())
    arch, batch, epochs, crop, patch, norm = CLASSIFICATION[(dataset, name)]
    assert cfg["task"] == "classification" and cfg["dataset"]["name"] == dataset
    m, p, t = cfg["model"], cfg["privacy"], cfg["training"]
    classes = {"dtd": 47, "mnist": 10}[dataset]
    assert (m["arch"], m["norm"], m["num_classes"]) == (arch, norm, classes)
    assert m["weights"] == ("imagenet" if dataset == "dtd" else None)
    assert (t["batch_size"], t["epochs"], t["scheduler"]) == (batch, epochs, "cosine")
    assert (p["crop"], p["private_region"]["size"], p["delta"]) == (crop, patch, None)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_dtd_resize_configs_resize_in_the_loader_and_otherwise_equal_the_offline_ones(name):
    from patchdp_opacus.app.config import evaluation_geometry, loader_geometry
    from patchdp_opacus.privacy import Resize

    offline = load_config(CONFIGS / "dtd" / f"{name}.yaml")
    inloader = load_config(CONFIGS / "dtd" / f"{name}_resize.yaml")
    geometry = loader_geometry(inloader.privacy)
    assert isinstance(geometry, Resize) and geometry.size == (300, 300)
    assert geometry.crop.crop_size == (100, 100)
    assert evaluation_geometry(inloader.privacy).crop is None  # whole resized val images
    assert evaluation_geometry(offline.privacy) is None
    assert inloader.dataset.train == {"split": "train", "partition": 1, "image_size": None,
                                      "min_side": 300}
    a, b = offline.to_dict(), inloader.to_dict()
    for d in (a, b):
        d.pop("name"), d["privacy"].pop("transform"), d.pop("dataset")
    assert a == b


def test_table1_pair_is_non_private_with_and_without_the_crop():
    crop, nocrop = (yaml.safe_load((CONFIGS / "mnist" / f"table1_{n}.yaml").read_text())
                    for n in ("crop", "nocrop"))
    assert crop["privacy"]["accounting"] == nocrop["privacy"]["accounting"] == "none"
    assert (crop["privacy"]["crop"], nocrop["privacy"]["crop"]) == ([10, 10], None)
    drop = ("name", "privacy")
    assert {k: v for k, v in crop.items() if k not in drop} == \
        {k: v for k, v in nocrop.items() if k not in drop}
    loaded = load_config(CONFIGS / "mnist" / "table1_nocrop.yaml")
    assert loaded.privacy.crop is None and loaded.privacy.epsilon is None
    assert loaded.dataset.val == {"split": "test"} and loaded.evaluation.confusion_matrix


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
