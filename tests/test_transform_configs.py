"""Configs describe loader-owned transforms (privacy.transform), training builds them from a
config, and the shipped Cityscapes scale-jitter configs hold the p the README reports."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from patchdp_opacus.privacy import CropGeometry, Rectangle
from patchdp_opacus.privacy.geometric import (
    RandomResizedCrop,
    RandomScaleCrop,
    Resize,
    geometry_from_config,
)
from patchdp_opacus.segmentation.config import config_from_dict, load_config, loader_geometry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_transform_mapping_builds_the_loader_owned_transforms():
    scale = geometry_from_config([505, 505], [0, 0], False,
                                 {"kind": "random_scale_crop", "scale_range": [0.5, 2.0],
                                  "scale_step": 0.25})
    assert scale == RandomScaleCrop((505, 505), scale_range=(0.5, 2), scale_step="1/4")
    assert geometry_from_config([8, 8], transform={"kind": "resize", "size": [30, 30]}) == \
        Resize((30, 30), crop=(8, 8))
    assert geometry_from_config([8, 8], transform={"kind": "random_resized_crop",
                                                   "scale": ["0.08", 1]}) == \
        RandomResizedCrop((8, 8), scale=(Fraction(2, 25), 1))
    assert geometry_from_config([8, 8]) == CropGeometry((8, 8))
    for bad, message in [({"kind": "random_crop"}, "not a loader-owned transform"),
                         ({"kind": "resize", "size": [9, 9], "scale": 2}, "unknown key"),
                         ({"kind": "resize"}, "needs size"),
                         ({"scale_range": [1, 2]}, "kind")]:
        with pytest.raises(ValueError, match=message):
            geometry_from_config([8, 8], transform=bad)
    with pytest.raises(ValueError, match="box lies inside the image"):
        geometry_from_config([8, 8], [1, 1], transform={"kind": "random_resized_crop"})


def test_training_from_a_config_with_a_scale_transform(tmp_path):
    """`train` builds the loader-owned transform from privacy.transform; the privacy report
    holds its geometry and its p."""
    from patchdp_opacus.segmentation.train import train

    cfg = config_from_dict({
        "name": "tiny_scale",
        "dataset": {"name": "synthetic", "train": {"num_samples": 8, "image_size": [32, 64],
                                                   "seed": 1, "max_private_patch": [4, 4]},
                    "val": {"num_samples": 1, "image_size": [32, 64], "seed": 1,
                            "max_private_patch": [4, 4]}},
        "model": {"arch": "deeplabv3plus", "encoder_name": "resnet18", "encoder_weights": None,
                  "output_stride": 16, "norm": "group", "aspp_rates": [2, 4, 6],
                  "extra": {"encoder_depth": 3, "decoder_channels": 48}},
        "privacy": {"epsilon": 8.0, "crop": [24, 24], "max_grad_norm": 1.0,
                    "transform": {"kind": "random_scale_crop", "scale_range": [0.75, 1.25]},
                    "private_region": {"shape": "rectangle", "size": [4, 4]}},
        "training": {"epochs": 1, "batch_size": 4, "max_physical_batch_size": 4,
                     "eval_every": 1, "device": "cpu", "max_steps": 1}})
    train(cfg, tmp_path, resume=False)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    transform = RandomScaleCrop((24, 24), scale_range=(0.75, 1.25))
    assert report["geometry"]["crop"] == transform.to_dict()
    assert report["geometry"]["inclusion_probability"] == \
        transform.inclusion_probability([(32, 64)], Rectangle(4, 4)).value
    assert "random scale" in (tmp_path / "privacy_report.txt").read_text()
    with pytest.raises(ValueError, match="privacy.transform"):
        config_from_dict({"privacy": {"transform": {"kind": "random_scale_crop"}}})


@pytest.mark.parametrize("arch", ["deeplabv3plus", "pspnet"])
def test_cityscapes_scale_configs_are_the_paper_configs_plus_scale_jitter(arch):
    plain = load_config(CONFIGS / "cityscapes" / f"{arch}.yaml").to_dict()
    scaled = load_config(CONFIGS / "cityscapes" / f"{arch}_scale.yaml").to_dict()
    transform = scaled["privacy"].pop("transform")
    plain["privacy"].pop("transform")
    assert scaled.pop("name") == plain.pop("name") + "_scale"
    assert scaled == plain
    assert transform["kind"] == "random_scale_crop"
    geometry = loader_geometry(load_config(CONFIGS / "cityscapes" / f"{arch}_scale.yaml").privacy)
    assert geometry == RandomScaleCrop((505, 505), scale_range=(0.5, 2), scale_step="1/4")


def test_cityscapes_scale_config_p_is_the_one_the_readme_reports():
    cfg = load_config(CONFIGS / "cityscapes" / "deeplabv3plus_scale.yaml")
    p = loader_geometry(cfg.privacy).inclusion_probability([(1024, 2048)], Rectangle(10, 10))
    assert round(p.value, 5) == 0.31404
    crop = loader_geometry(load_config(CONFIGS / "cityscapes" / "deeplabv3plus.yaml").privacy)
    assert crop == CropGeometry((505, 505))
