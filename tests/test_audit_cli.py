"""`patchdp audit --config`: passes a sound config, fails one with a whole-image photometric
transform before the crop (refused by the inspection and caught empirically); config-described
augmentations for the pre-crop and post-crop stages."""

import copy
import json

import pytest
import torch
import yaml
from test_train_cli import TINY

from patchdp_opacus.cli import main
from patchdp_opacus.segmentation.augment import Compose, build_transforms
from patchdp_opacus.segmentation.config import ConfigError, config_from_dict


def _config(tmp_path, **sections):
    cfg = copy.deepcopy(TINY)
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _audit(path, capsys, *extra):
    code = main(["audit", "--config", path, "--trials", "150", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_sound_config_passes_with_post_crop_contrast(tmp_path, capsys):
    path = _config(tmp_path,
                   dataset={"transforms": [{"tv.RandomHorizontalFlip": {"p": 0.5}}]},
                   privacy={"post_crop_transforms": [{"tv.ColorJitter": {"contrast": 0.5}}]})
    code, report = _audit(path, capsys)
    assert code == 0 and report["verdict"] == "pass", report["table"]
    assert report["inspection_refusal"] is None
    steps = report["training_steps"]
    assert steps["passed"] and steps["accountant_steps"] == steps["noisy_steps"] == 2


def test_whole_image_photometric_before_the_crop_fails(tmp_path, capsys):
    path = _config(tmp_path, dataset={"transforms": [{"tv.ColorJitter": {"contrast": 0.5}}]})
    code, report = _audit(path, capsys, "--train-steps", "0")
    assert code == 1 and report["verdict"] == "fail"
    assert "contrast" in report["inspection_refusal"]
    assert report["outside"] > 0  # and the empirical audit shows it, crop by crop
    assert "REFUSED" in report["table"] and "overall verdict: FAIL" in report["table"]


def test_audit_bad_input_exits_2(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["audit", "--config", path, "--trials", "0"]) == 2
    assert "--trials" in capsys.readouterr().err
    assert main(["audit", "--config", path, "--set", "privacy.crop=[99,99]"]) == 2
    assert "privacy.crop" in capsys.readouterr().err


def test_augment_items_build_and_bad_items_are_config_errors():
    compose = build_transforms([{"tv.RandomHorizontalFlip": {"p": 1.0}},
                                {"A.HueSaturationValue": {"p": 1.0}}, "tv.Identity"])
    assert isinstance(compose, Compose) and len(compose.transforms) == 3
    image = torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8)
    mask = torch.arange(80).reshape(8, 10)
    out_image, out_mask = compose(image, mask)
    assert out_image.shape == image.shape and out_image.dtype == torch.uint8
    assert torch.equal(out_mask, mask.flip(-1))  # the flip moved the mask with the image
    assert compose((image, mask))[1].shape == mask.shape  # the post-crop (sample) convention
    for bad, match in (([{"ColorJitter": {}}], "library prefix"),
                       ([{"tv.NoSuchThing": {}}], "has no transform"),
                       ([{"tv.ColorJitter": {"contrast": "x"}}], "ColorJitter"),
                       ({"tv.ColorJitter": {}}, "list")):
        with pytest.raises(ValueError, match=match):
            build_transforms(bad)
    cfg = copy.deepcopy(TINY)
    cfg["privacy"]["post_crop_transforms"] = [{"tv.NoSuchThing": {}}]
    with pytest.raises(ConfigError, match="privacy.post_crop_transforms"):
        config_from_dict(cfg)


def test_a_classification_config_is_audited(tmp_path, capsys):
    """The classification data sets decode through ``_load_image`` (no mask): the audit injects
    its neighbour pairs there, and the MNIST config passes."""
    from pathlib import Path

    from classification_data import write_mnist

    root = write_mnist(tmp_path / "mnist", n_train=32, n_test=8)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "mnist" / "resnet18.yaml")
    code, report = _audit(config, capsys, "--data-root", str(root), "--train-steps", "0",
                          "--set", "dataset.train.val_size=8", "--set", "dataset.val.val_size=8")
    assert code == 0 and report["verdict"] == "pass", report["table"]
    assert report["inspection_refusal"] is None
