"""Config validation is table-driven: every key is checked (type, range, registry) before
anything is built, errors name the dotted key, overrides are read as YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchdp_opacus.segmentation.config import (
    CHECKS,
    ConfigError,
    TASK_CHECKS,
    apply_overrides,
    config_from_dict,
    dump_config,
    known_keys,
    load_config,
    parse_override,
)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

#: A value of the wrong kind for each kind of check: at least one must be refused by every key.
WRONG_KINDS = ({"not": "a scalar"}, ["a", "list"], "not-a-number", -7, True)

#: Values inside the right type but out of range (or unknown), and a good value, per key.
SPECIFIC = [
    ("training.lr", "fast", 0.1),
    ("training.lr", 0, "1e-3"),           # PyYAML reads 1e-3 as a string
    ("training.momentum", 1.0, 0.5),
    ("training.epochs", 2.5, 3),
    ("training.batch_size", 0, 1),
    ("training.eval_every", 0, 2),
    ("training.seed", -1, 0),
    ("training.max_steps", 0, None),
    ("training.device", "gpu", "cuda:1"),  # syntax only: availability is checked at run time
    ("training.grad_sample_mode", "fancy", "bk"),
    ("training.optimizer", "adam", "sgd"),
    ("training.log_train_loss", "yes", True),
    ("privacy.epsilon", -1, 3),
    ("privacy.delta", 1, "1/2975"),
    ("privacy.crop", [505], [505, 505]),
    ("privacy.crop", [0, 5], [5, 5]),
    ("privacy.padding", [-1, 0], [0, 0]),
    ("privacy.private_region", {"shape": "circle"}, {"shape": "circle", "diameter": 5}),
    ("privacy.accounting", "both", "record"),
    ("privacy.reproducible_noise", 1, False),
    ("model.arch", "unet9", "pspnet"),
    ("model.encoder_name", "resnet1O1", "resnet18"),
    ("model.output_stride", 4, 16),
    ("model.norm", "batch", "frozen"),
    ("dataset.name", "imagenet", "synthetic"),
    ("name", "", "run"),
]


def base(task: str = "segmentation") -> dict:
    if task == "classification":
        return {"task": "classification", "dataset": {"name": "mnist", "root": "data/mnist"},
                "privacy": {"crop": [10, 10], "private_region": {"shape": "rectangle",
                                                                 "size": [1, 1]}}}
    return {"model": {"encoder_name": "resnet18"}}


def _rows():
    """``(task, key)`` for every key with a row, in the configs of the tasks that know it."""
    return sorted({(task, key) for task in ("segmentation", "classification")
                   for key in (*CHECKS, *TASK_CHECKS[task]) if key in known_keys(task)})


@pytest.mark.parametrize("task,key", _rows())
def test_every_key_refuses_a_wrong_kind_and_names_itself(task, key):
    section, _, field = key.rpartition(".")
    refused = 0
    for value in WRONG_KINDS:
        data = base(task)
        if section:
            data.setdefault(section, {})[field] = value
        else:
            data[field] = value
        try:
            config_from_dict(data)
        except ConfigError as exc:
            refused += 1
            assert exc.key == key or exc.key.startswith(f"{key}."), str(exc)
            assert str(exc).startswith(f"{exc.key}: ")
    assert refused, f"{key} accepts every wrong kind of value"


def test_checks_table_names_only_real_keys():
    assert set(CHECKS) <= set(known_keys())
    for task, rows in TASK_CHECKS.items():
        assert set(rows) <= set(known_keys(task))
    assert {k for task in TASK_CHECKS for k in known_keys(task)} == set(known_keys())
    assert {"privacy.reproducible_noise", "privacy.reproducible_sampling",
            "training.log_train_loss"} <= set(known_keys())


@pytest.mark.parametrize("key, bad, good", SPECIFIC)
def test_out_of_range_values_are_refused_and_good_ones_kept(key, bad, good):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [(key, bad)])
    assert err.value.key == key and "\n" not in str(err.value)
    cfg = load_config(DEMO, [(key, good)])
    section, _, field = key.rpartition(".")
    value = getattr(getattr(cfg, section), field) if section else getattr(cfg, field)
    numbers = {"1e-3": 1e-3, "1/2975": 1 / 2975}  # strings read as numbers
    assert value == (numbers.get(good, good) if isinstance(good, str) else good)


def test_defaults_and_demo_config_are_valid():
    config_from_dict({})
    cfg = load_config(DEMO)
    assert not cfg.privacy.reproducible_noise and not cfg.privacy.reproducible_sampling
    assert not cfg.training.log_train_loss
    # the saved form loads back to the same config
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg, "header"))) == cfg


def test_cross_checks():
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({**base(), "privacy": {"epsilon": None}})
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({**base(), "privacy": {"epsilon": 1, "noise_multiplier": 1}})
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base(), "privacy": {"secure_sampling": True,
                                                "reproducible_sampling": True}})
    assert err.value.key == "privacy.reproducible_sampling"
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base(), "dataset": {"train": {"num_images": 3}}})
    assert err.value.key == "dataset.train.num_images" and "num_samples" in str(err.value)


CLASSIFICATION_SPECIFIC = [
    ("dataset.name", "cityscapes", "dtd"),
    ("model.arch", "deeplabv3plus", "vgg11_bn"),
    ("model.norm", "batch", "none"),
    ("model.weights", 3, "IMAGENET"),
    ("model.normalize", "cifar", None),
    ("privacy.accounting", "gauss", "gaussian_augmentation"),
    ("privacy.sigma_aug", 0, "255"),
    ("training.scheduler", "step", "cosine"),
    ("evaluation.confusion_matrix", "yes", True),
]


@pytest.mark.parametrize("key, bad, good", CLASSIFICATION_SPECIFIC)
def test_classification_keys_are_checked(key, bad, good):
    def with_(value):
        data = base("classification")
        data["privacy"]["sigma_aug"] = 100.0  # gaussian_augmentation needs it
        if key == "model.normalize" and value is not None:
            data["model"] = {"in_channels": 1}
        section, _, field = key.rpartition(".")
        data.setdefault(section, {})[field] = value
        return config_from_dict(data)

    with pytest.raises(ConfigError) as err:
        with_(bad)
    assert err.value.key == key
    cfg = with_(good)
    section, _, field = key.rpartition(".")
    expected = {"IMAGENET": "imagenet", "255": 255.0}.get(good, good)
    assert getattr(getattr(cfg, section), field) == expected


@pytest.mark.parametrize("change, key, words", [
    ({"privacy": {"accounting": "gaussian_augmentation"}}, "privacy.sigma_aug", "needs"),
    ({"privacy": {"accounting": "none"}}, "privacy.epsilon", "without DP"),
    ({"privacy": {"accounting": "none", "epsilon": None, "sigma_aug": 10}}, "privacy.sigma_aug",
     "without DP"),
    ({"privacy": {"crop": None}}, "privacy.crop", "only with privacy.accounting none"),
    ({"dataset": {"train": {"split": "train", "val_size": 10}}}, "dataset.val.val_size",
     "must equal dataset.train.val_size"),
    ({"dataset": {"name": "dtd", "train": {"partition": 11}}}, "dataset.train.partition",
     "<= 10"),
    ({"dataset": {"train": {"partition": 1}}}, "dataset.train.partition",
     "not an argument of the mnist dataset"),
    ({"model": {"weights": "imagenet", "in_channels": 1, "normalize": "mnist"}},
     "model.in_channels", "pretrained"),
    ({"model": {"in_channels": 1, "normalize": "imagenet"}}, "model.normalize", "3 channel"),
])
def test_classification_cross_checks(change, key, words):
    data = base("classification")
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert err.value.key == key and words in str(err.value)


def test_a_classification_config_names_its_dataset():
    data = base("classification")
    del data["dataset"]["name"]
    with pytest.raises(ConfigError, match="required for task classification; known: dtd, "
                                          "mnist") as err:
        config_from_dict(data)
    assert err.value.key == "dataset.name"


def test_a_key_of_the_other_task_says_so():
    with pytest.raises(ConfigError, match="a key of task: classification") as err:
        config_from_dict({**base(), "model": {"weights": "imagenet"}})
    assert err.value.key == "model.weights"
    with pytest.raises(ConfigError, match="a key of task: segmentation"):
        config_from_dict({**base("classification"), "model": {"encoder_name": "resnet18"}})


def test_classification_defaults_round_trip_through_yaml():
    import yaml

    cfg = config_from_dict(base("classification"))
    assert cfg.task == "classification" and cfg.model.arch == "resnet18"
    assert cfg.training.scheduler == "none" and not cfg.evaluation.confusion_matrix
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean training.lr"):
        config_from_dict({"training": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="did you mean privacy"):
        config_from_dict({"privay": {}})


@pytest.mark.parametrize("text, key, value", [
    ("training.lr=0.1", "training.lr", 0.1),
    ("privacy.crop=[505,505]", "privacy.crop", [505, 505]),
    ("privacy.delta=null", "privacy.delta", None),
    ("dataset.root=", "dataset.root", None),
    ("privacy.reproducible_noise=true", "privacy.reproducible_noise", True),
    ("dataset.val={split: val, num_samples: 4}", "dataset.val", {"split": "val",
                                                                 "num_samples": 4}),
    ("name=a=b", "name", "a=b"),
])
def test_overrides_are_yaml_typed(text, key, value):
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["training.lr", "=1", "training..lr=1", "a b=1",
                                  "privacy.crop=[1,"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_overrides_reach_nested_mappings_and_do_not_touch_the_input():
    data = {"dataset": {"train": {"num_samples": 8}}}
    out = apply_overrides(data, [("dataset.train.num_samples", 4), ("training.lr", 0.3)])
    assert out == {"dataset": {"train": {"num_samples": 4}}, "training": {"lr": 0.3}}
    assert data == {"dataset": {"train": {"num_samples": 8}}}
    with pytest.raises(ConfigError) as err:
        apply_overrides({"training": {"lr": 0.1}}, [("training.lr.x", 1)])
    assert err.value.key == "training.lr"
