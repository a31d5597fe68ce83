"""Experiment configuration: a YAML file read into nested dataclasses, every key checked first.

One config format for both tasks of ``patchdp train``: ``task: segmentation`` (the default) or
``task: classification``.  The sections ``dataset``, ``privacy``, ``training`` and
``evaluation`` are shared; ``model`` has one dataclass per task (:data:`TASK_SECTIONS`), and
the registries behind ``dataset.name`` / ``model.arch`` are the task's.

Sizes are ``(height, width)`` in pixels; ``epsilon`` in nats; ``delta`` per run (default 1/N);
``max_grad_norm`` is the clip norm C; ``noise_multiplier`` z gives noise std z * C; ``lr`` is the
SGD step size; ``seed`` seeds the model's initialisation (and, only when asked for with
``privacy.reproducible_noise`` / ``privacy.reproducible_sampling``, the noise / the batches and
crops — a public seed then makes them predictable, which voids the privacy claim).

Validation is table-driven: :data:`CHECKS` maps each dotted key to a check that returns the
(normalised) value or raises ``ValueError`` with what it expected (:data:`TASK_CHECKS` holds the
rows that differ per task, :data:`DATASET_ARGUMENT_CHECKS` the arguments of each data set's
``dataset.train`` / ``dataset.val`` mapping); :data:`CROSS_CHECKS` holds the rules between
keys.  A key without a row is type-checked against its default.  Every error is a
:class:`ConfigError` naming the key (``training.lr: expected a positive number ...``), raised
before anything is built.  Command-line overrides (``--set training.lr=0.1``) are applied to the
raw mapping with :func:`apply_overrides` before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml


TASKS = ("segmentation", "classification")


@dataclass
class DatasetConfig:
    name: Optional[str] = "synthetic"   # classification: required (dtd, mnist)
    root: Optional[str] = None
    train: dict = field(default_factory=lambda: {"split": "train"})
    val: dict = field(default_factory=lambda: {"split": "val"})
    # applied to training samples before the loader's crop (segmentation.augment), inspected
    transforms: list = field(default_factory=list)


@dataclass
class ClassificationDatasetConfig(DatasetConfig):
    name: Optional[str] = None


@dataclass
class ModelConfig:
    """Segmentation model (segmentation-models-pytorch)."""

    arch: str = "deeplabv3plus"
    encoder_name: str = "resnet101"
    encoder_weights: Optional[str] = None
    num_classes: int = 19
    output_stride: int = 8
    norm: str = "group"
    aspp_rates: list = field(default_factory=lambda: [12, 24, 36])
    extra: dict = field(default_factory=dict)


@dataclass
class ClassificationModelConfig:
    """Classification model (torchvision ResNet-18 / VGG-11 through
    :func:`patchdp_opacus.classification.build_classifier`)."""

    arch: str = "resnet18"
    weights: Optional[str] = None        # None (random init) or "imagenet" (torchvision's)
    num_classes: int = 10
    norm: str = "none"                   # frozen | none (BatchNorm removed) | group
    in_channels: int = 3
    small_input: bool = False            # stems for ~10x10 inputs (MNIST crops)
    normalize: Optional[str] = "imagenet"  # statistics in pixel units, inside the model


@dataclass
class PrivacyConfig:
    # which claim calibrates the noise: patch | record | gaussian_augmentation, or none
    # (non-private training: no clipping, no noise, no claim)
    accounting: str = "patch"
    epsilon: Optional[float] = 8.0       # target epsilon; None with noise_multiplier set
    noise_multiplier: Optional[float] = None
    delta: Optional[float] = None        # default 1 / N
    # what the model sees (height, width); null (no crop) only with accounting none
    crop: Optional[list] = field(default_factory=lambda: [505, 505])
    padding: list = field(default_factory=lambda: [0, 0])
    pad_if_needed: bool = False
    # loader-owned resampling before/with the crop, e.g. {kind: random_scale_crop,
    # scale_range: [0.5, 2.0], scale_step: 0.25}; see privacy.geometric.geometry_from_config
    transform: Optional[dict] = None
    # applied by the loader to each crop (segmentation.augment): may read the whole crop
    post_crop_transforms: list = field(default_factory=list)
    private_region: dict = field(default_factory=lambda: {"shape": "rectangle", "size": [10, 10]})
    max_grad_norm: float = 2.0
    secure_sampling: bool = False
    # Gaussian-noise augmentation: std in pixel units (0-255) of the noise the loader adds to
    # every training sample (needed by accounting gaussian_augmentation)
    sigma_aug: Optional[float] = None
    reproducible_noise: bool = False     # noise from training.seed: NOT private if it is known
    reproducible_sampling: bool = False  # batches/crops from training.seed: idem


@dataclass
class TrainingConfig:
    epochs: int = 100
    batch_size: int = 200                # logical batch B (fixed size, without replacement)
    max_physical_batch_size: int = 16    # BatchMemoryManager chunk
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    scheduler: str = "none"              # none | cosine (lr decays over the epochs)
    grad_sample_mode: str = "hooks"     # Opacus' hooks/ghost/... or "bk" (patchdp_opacus.fast)
    fast_options: dict = field(default_factory=dict)  # options of a fast mode, e.g. storage
    num_workers: int = 0
    seed: int = 0
    eval_every: int = 5                  # epochs
    eval_batch_size: int = 2
    max_eval_images: Optional[int] = None
    device: str = "auto"
    max_steps: Optional[int] = None      # stop early after this many logical steps (smoke runs)
    log_train_loss: bool = False         # un-noised statistic of private data: NOT covered by ε


@dataclass
class EvaluationConfig:
    confusion_matrix: bool = False       # write the confusion matrix into final_metrics.json


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    task: str = "segmentation"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig | ClassificationModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict:
        """Plain mapping (lists, dicts, scalars): the YAML/JSON form of the config."""
        return _plain(dataclasses.asdict(self))


#: The sections of each task's config (the model section differs).
TASK_SECTIONS = {
    "segmentation": {"dataset": DatasetConfig, "model": ModelConfig, "privacy": PrivacyConfig,
                     "training": TrainingConfig, "evaluation": EvaluationConfig},
    "classification": {"dataset": ClassificationDatasetConfig,
                       "model": ClassificationModelConfig, "privacy": PrivacyConfig,
                       "training": TrainingConfig, "evaluation": EvaluationConfig},
}
_SECTION_NAMES = ("dataset", "model", "privacy", "training", "evaluation")


class ConfigError(ValueError):
    """A config value that cannot be used; ``key`` is the dotted key (or None for the file)."""

    def __init__(self, key: Optional[str], message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- value checks
# A check takes the YAML value and returns it normalised, or raises ValueError(what it expected).

def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _number(kind: type, *, low=None, low_open=False, high=None, high_open=False, unit=""):
    def bound_text():
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        return " and ".join(parts)

    what = ("an integer" if kind is int else "a number") + (f" {bound_text()}" if
                                                             bound_text() else "")
    what += f" ({unit})" if unit else ""

    def check(value):
        if isinstance(value, bool):
            raise ValueError(f"expected {what}, got {value}")
        if kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError(f"expected {what}, got {_shown(value)}")
        else:
            if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string; 1/2975 too
                try:
                    value = float(Fraction(value.strip()))
                except (ValueError, ZeroDivisionError):
                    raise ValueError(f"expected {what}, got {_shown(value)}") from None
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"expected {what}, got {_shown(value)}")
            value = float(value)
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"expected {what}, got {value}")
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(f"expected {what}, got {value}")
        return value
    return check


def _optional(check):
    def wrapped(value):
        return None if value is None else check(value)
    return wrapped


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_shown(value)}")
    return value


def _string(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_shown(value)}")
    return value


def _mapping(value):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as {{key: value}}, got {_shown(value)}")
    return dict(value)


def _one_of(*choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}; got "
                             f"{_shown(value)}")
        return value
    return check


def _registry(module: str, attribute: str, what: str):
    """Name registered in ``module.attribute`` (imported only when the check runs)."""
    def check(value):
        import importlib

        names = sorted(getattr(importlib.import_module(module), attribute))
        if not isinstance(value, str) or value.lower() not in names:
            raise ValueError(f"unknown {what} {_shown(value)}; known: {', '.join(names)}")
        return value.lower()
    return check


def _int_list(minimum: int, length: Optional[int], unit: str):
    item = _number(int, low=minimum, unit=unit)
    shape = f"[{', '.join(['n'] * length)}]" if length else "a list of integers"

    def check(value):
        if not isinstance(value, (list, tuple)) or (length and len(value) != length) \
                or not value:
            raise ValueError(f"expected {shape} ({unit}, each >= {minimum}), got {_shown(value)}")
        try:
            return [item(v) for v in value]
        except ValueError:
            raise ValueError(f"expected {shape} ({unit}, each >= {minimum}), got "
                             f"{_shown(value)}") from None
    return check


def _torchvision_weights(value):
    value = _string(value)
    return "imagenet" if value.lower() == "imagenet" else value


def _encoder_name(value):
    value = _string(value)
    if value.startswith("tu-"):  # timm encoders through smp
        return value
    from segmentation_models_pytorch.encoders import encoders

    if value not in encoders:
        close = difflib.get_close_matches(value, list(encoders), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown segmentation-models-pytorch encoder {value!r}{hint}")
    return value


def _private_region(value):
    from patchdp_opacus.privacy import region_from_dict

    value = _mapping(value)
    try:
        region_from_dict(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{exc}; expected e.g. {{shape: rectangle, size: [10, 10]}}, "
                         f"{{shape: circle, diameter: 21}}") from None
    return value


def _device(value):
    value = _string(value)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _grad_sample_mode(value):
    from patchdp_opacus.fast import FAST_MODES

    return _one_of("hooks", "functorch", "ew", "ghost", *sorted(FAST_MODES))(value)


_pixels, _pixels0 = _int_list(1, 2, "pixels, height and width"), \
    _int_list(0, 2, "pixels, height and width")
_positive = _number(float, low=0, low_open=True)
_count = _number(int, low=1)

def _transform_list(value):
    """A list of ``{tv.Name: {kwargs}}`` / ``{A.Name: {kwargs}}`` items (segmentation.augment);
    every item is built once here, so a bad name or argument is a config error."""
    from patchdp_opacus.segmentation.augment import build_transforms

    if value is None:
        return []
    build_transforms(value)
    return list(value)


#: dotted key -> check.  A new config key is one row (a key without a row is type-checked
#: against its default value).
CHECKS: dict[str, Callable[[Any], Any]] = {
    "name": _string,
    "task": _one_of(*TASKS),
    "dataset.name": _registry("patchdp_opacus.segmentation.datasets", "DATASETS", "dataset"),
    "dataset.root": _optional(_string),
    "dataset.train": _mapping,
    "dataset.val": _mapping,
    "dataset.transforms": _transform_list,
    "model.arch": _registry("patchdp_opacus.segmentation.models", "ARCHITECTURES",
                            "architecture"),
    "model.encoder_name": _encoder_name,
    "model.encoder_weights": _optional(_string),
    "model.num_classes": _count,
    "model.output_stride": _one_of(8, 16, 32),
    "model.norm": _one_of("group", "frozen"),
    "model.aspp_rates": _int_list(1, None, "dilation rates"),
    "model.extra": _mapping,
    "model.weights": _optional(_torchvision_weights),
    "model.in_channels": _count,
    "model.small_input": _boolean,
    "model.normalize": _optional(_registry("patchdp_opacus.classification.models",
                                           "NORMALIZATIONS", "normalisation")),
    "privacy.accounting": _one_of("patch", "record", "gaussian_augmentation", "none"),
    "privacy.epsilon": _optional(_number(float, low=0, low_open=True, unit="nats")),
    "privacy.noise_multiplier": _optional(_number(float, low=0, low_open=True,
                                                  unit="noise std = z*C")),
    "privacy.delta": _optional(_number(float, low=0, low_open=True, high=1, high_open=True,
                                       unit="per run")),
    "privacy.crop": _optional(_pixels),
    "privacy.padding": _pixels0,
    "privacy.pad_if_needed": _boolean,
    "privacy.transform": _optional(_mapping),
    "privacy.post_crop_transforms": _transform_list,
    "privacy.private_region": _private_region,
    "privacy.max_grad_norm": _number(float, low=0, low_open=True, unit="clip norm C"),
    "privacy.sigma_aug": _optional(_number(float, low=0, low_open=True,
                                           unit="noise std in pixel units 0-255")),
    "privacy.secure_sampling": _boolean,
    "privacy.reproducible_noise": _boolean,
    "privacy.reproducible_sampling": _boolean,
    "training.epochs": _count,
    "training.batch_size": _count,
    "training.max_physical_batch_size": _count,
    "training.lr": _number(float, low=0, low_open=True, unit="learning rate"),
    "training.momentum": _number(float, low=0, high=1, high_open=True),
    "training.weight_decay": _number(float, low=0),
    "training.optimizer": _one_of("sgd"),
    "training.scheduler": _one_of("none", "cosine"),
    "training.grad_sample_mode": _grad_sample_mode,
    "training.fast_options": _mapping,
    "training.num_workers": _number(int, low=0),
    "training.seed": _number(int, low=0),
    "training.eval_every": _number(int, low=1, unit="epochs"),
    "training.eval_batch_size": _count,
    "training.max_eval_images": _optional(_count),
    "training.device": _device,
    "training.max_steps": _optional(_number(int, low=1, unit="logical steps")),
    "training.log_train_loss": _boolean,
    "evaluation.confusion_matrix": _boolean,
}

#: Rows that differ per task (they replace the row of :data:`CHECKS` for that task).
TASK_CHECKS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "segmentation": {},
    "classification": {
        "dataset.name": _registry("patchdp_opacus.classification.datasets", "DATASETS",
                                  "classification dataset"),
        "model.arch": _registry("patchdp_opacus.classification.models", "ARCHITECTURES",
                                "classification architecture"),
        "model.norm": _one_of("frozen", "none", "group"),
    },
}


def check_for(key: str, task: str) -> Optional[Callable[[Any], Any]]:
    """The check of dotted ``key`` in a ``task`` config (None: type-checked by default)."""
    return TASK_CHECKS.get(task, {}).get(key) or CHECKS.get(key)


_split = _string
#: ``(dataset name, argument) -> check`` for the ``dataset.train`` / ``dataset.val`` mappings
#: (an argument without a row is passed to the data set as it is; its class checks it).
DATASET_ARGUMENT_CHECKS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("dtd", "split"): _one_of("train", "val", "test"),
    ("dtd", "partition"): _number(int, low=1, high=10, unit="DTD's label partition"),
    ("dtd", "image_size"): _optional(_pixels),
    ("dtd", "min_side"): _number(int, low=1, unit="pixels"),
    ("mnist", "split"): _one_of("train", "val", "test"),
    ("mnist", "val_size"): _number(int, low=0, unit="training images held out as val"),
}


def dataset_registry(task: str) -> dict:
    """``dataset.name -> class`` of ``task``."""
    import importlib

    module = "patchdp_opacus.classification.datasets" if task == "classification" else \
        "patchdp_opacus.segmentation.datasets"
    return importlib.import_module(module).DATASETS


def _validation_is_not_training(cfg: "ExperimentConfig"):
    train = cfg.dataset.train.get("split", "train")
    if cfg.dataset.val.get("split", "val") == train:
        raise ConfigError("dataset.val.split", f"the validation split is the training split "
                          f"({train!r}): its metrics (mIoU or accuracy, per class) and "
                          f"prediction images would be statistics of the private training data, "
                          f"released without noise; evaluate on a held-out split")


def _augmentations_of_the_task(cfg: "ExperimentConfig"):
    """The config-built augmentations (segmentation.augment) transform ``(image, mask)``
    samples; a classifier's samples are ``(image, label)``."""
    if cfg.task == "classification":
        for key in ("dataset.transforms", "privacy.post_crop_transforms"):
            section, _, name = key.partition(".")
            if getattr(getattr(cfg, section), name):
                raise ConfigError(key, "not supported for task classification yet (these "
                                       "augmentations transform (image, mask) samples)")


def _dataset_named(cfg: "ExperimentConfig"):
    if cfg.dataset.name is None:
        raise ConfigError("dataset.name", f"required for task {cfg.task}; known: "
                          f"{', '.join(sorted(dataset_registry(cfg.task)))}")


def _dataset_arguments(cfg: "ExperimentConfig"):
    """dataset.train / dataset.val keys must be arguments of the dataset class, and those with
    a row in :data:`DATASET_ARGUMENT_CHECKS` pass it."""
    import inspect

    name = cfg.dataset.name
    params = inspect.signature(dataset_registry(cfg.task)[name]).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [n for n in params if n not in ("self", "root")]
    for split in ("train", "val"):
        mapping = getattr(cfg.dataset, split)
        for key, value in mapping.items():
            if key not in known and not open_ended:
                raise ConfigError(f"dataset.{split}.{key}",
                                  f"not an argument of the {name} dataset; known: "
                                  f"{', '.join(known)}")
            check = DATASET_ARGUMENT_CHECKS.get((name, key))
            if check is not None:
                try:
                    mapping[key] = check(value)
                except ValueError as exc:
                    raise ConfigError(f"dataset.{split}.{key}", str(exc)) from None


def _same_holdout(cfg: "ExperimentConfig"):
    """MNIST's val split is cut from its training file: train and val must cut it alike, or
    validation images would also be training images."""
    if cfg.dataset.name != "mnist":
        return
    train, val = cfg.dataset.train, cfg.dataset.val
    if val.get("split", "val") == "val" and train.get("val_size") != val.get("val_size"):
        raise ConfigError("dataset.val.val_size", f"must equal dataset.train.val_size "
                          f"({train.get('val_size')}): both splits cut the same training file")


def _one_noise_setting(cfg: "ExperimentConfig"):
    if cfg.privacy.accounting == "none":
        for key in ("epsilon", "noise_multiplier", "sigma_aug"):
            if getattr(cfg.privacy, key) is not None:
                raise ConfigError(f"privacy.{key}", "privacy.accounting none trains without "
                                  "DP (no clipping, no noise, no claim): set it to null")
        return
    if (cfg.privacy.epsilon is None) == (cfg.privacy.noise_multiplier is None):
        raise ConfigError("privacy.epsilon", "set exactly one of privacy.epsilon (calibrate the "
                          "noise) and privacy.noise_multiplier (null for the other)")


def _augmentation_for_its_claim(cfg: "ExperimentConfig"):
    if cfg.privacy.accounting == "gaussian_augmentation" and cfg.privacy.sigma_aug is None:
        raise ConfigError("privacy.sigma_aug", "accounting gaussian_augmentation needs the "
                          "noise std (pixel units 0-255) the loader adds to every sample")


def _crop_for_a_claim(cfg: "ExperimentConfig"):
    if cfg.privacy.crop is None and cfg.privacy.accounting != "none":
        raise ConfigError("privacy.crop", "null (no crop) only with privacy.accounting none: "
                          "DP training here draws its crops (and batches) in the loader")
    if cfg.privacy.crop is None and cfg.privacy.transform is not None:
        raise ConfigError("privacy.transform", "needs privacy.crop (the output size)")


def _pretrained_channels(cfg: "ExperimentConfig"):
    m = cfg.model
    if cfg.task == "classification" and m.weights is not None and m.in_channels != 3:
        raise ConfigError("model.in_channels", f"{m.in_channels} channels would replace the "
                          f"pretrained first layer of weights {m.weights!r}; use 3 or weights: "
                          f"null")
    if cfg.task == "classification" and m.normalize is not None:
        from patchdp_opacus.classification.models import NORMALIZATIONS

        if len(NORMALIZATIONS[m.normalize][0]) != m.in_channels:
            raise ConfigError("model.normalize", f"{m.normalize} statistics have "
                              f"{len(NORMALIZATIONS[m.normalize][0])} channel(s), the model "
                              f"takes {m.in_channels}")


def _secure_or_reproducible(cfg: "ExperimentConfig"):
    if cfg.privacy.secure_sampling and cfg.privacy.reproducible_sampling:
        raise ConfigError("privacy.reproducible_sampling", "cannot be true together with "
                          "privacy.secure_sampling (OS randomness cannot be replayed)")


#: Rules between keys: each raises ConfigError naming a key.
def _loader_geometry_builds(cfg: "ExperimentConfig"):
    if cfg.privacy.crop is None:
        return
    try:
        loader_geometry(cfg.privacy)
    except (TypeError, ValueError) as exc:
        key = "privacy.transform" if cfg.privacy.transform is not None else "privacy.crop"
        raise ConfigError(key, str(exc)) from None


def loader_geometry(privacy: PrivacyConfig):
    """The geometry the loader applies and the accountant uses: a crop, or the loader-owned
    transform of ``privacy.transform`` (random scale + crop, resize + crop, RandomResizedCrop)
    whose output is ``privacy.crop``; None without a crop (``privacy.crop: null``)."""
    from patchdp_opacus.privacy.geometric import geometry_from_config

    if privacy.crop is None:
        return None
    return geometry_from_config(privacy.crop, privacy.padding, privacy.pad_if_needed,
                                privacy.transform)


def evaluation_geometry(privacy: PrivacyConfig):
    """What evaluation applies to a full image: the deterministic resize of a ``resize``
    transform (same size and kernel, no crop: the paper evaluates classifiers on whole resized
    images), else nothing (None: full stored images)."""
    from patchdp_opacus.privacy.geometric import Resize

    geometry = loader_geometry(privacy)
    if not isinstance(geometry, Resize):
        return None
    return Resize(geometry.size, interpolation=geometry.interpolation)


CROSS_CHECKS: list[Callable[["ExperimentConfig"], None]] = [
    _validation_is_not_training, _augmentations_of_the_task, _dataset_named, _one_noise_setting,
    _augmentation_for_its_claim, _crop_for_a_claim,
    _secure_or_reproducible, _dataset_arguments, _same_holdout, _pretrained_channels,
    _loader_geometry_builds]


# --------------------------------------------------------------------------- building

def known_keys(task: Optional[str] = None) -> list[str]:
    """Every dotted key a ``task`` config may set (``name``, ``task`` and ``section.field``);
    without ``task``, the keys of every task."""
    keys = ["name", "task"]
    for name in (TASKS if task is None else (task,)):
        for section, cls in TASK_SECTIONS[name].items():
            keys += [k for k in (f"{section}.{f.name}" for f in dataclasses.fields(cls))
                     if k not in keys]
    return keys


def _default_check(default):
    """Type check for a key without a row in :data:`CHECKS`, from its default value."""
    if isinstance(default, bool):
        return _boolean
    if isinstance(default, (int, float)):
        return _number(type(default))
    if isinstance(default, str):
        return _string
    if isinstance(default, dict):
        return _mapping
    return lambda value: value


def _unknown(key: str, known: Iterable[str]) -> ConfigError:
    """Unknown ``key``: the closest known key, and the keys its section knows."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    section = key.rpartition(".")[0]
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
    where = f"{section} keys" if section else "sections"
    return ConfigError(key, f"unknown key{hint} ({where}: {', '.join(siblings)})")


def _build(section: str, cls, data, task: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(section, f"expected a mapping of settings, got {_shown(data)}")
    defaults = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        dotted = f"{section}.{key}"
        if key not in names:
            error = _unknown(dotted, known_keys(task))
            other = [t for t in TASKS if t != task and dotted in known_keys(t)]
            if other:
                error = ConfigError(dotted, f"a key of task: {other[0]} configs, not of task: "
                                            f"{task} ({error.detail})")
            raise error
        check = check_for(dotted, task) or _default_check(getattr(defaults, key))
        try:
            values[key] = check(value)
        except ValueError as exc:
            raise ConfigError(dotted, str(exc)) from None
    return cls(**values)


def config_from_dict(data: Optional[dict], where: str = "config") -> ExperimentConfig:
    """Check every key of ``data`` and build the config; raises :class:`ConfigError`.

    ``where`` is kept for callers that prefix errors themselves (the message names the key)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(None, f"expected a mapping of sections (name, task, dataset, model, "
                                f"privacy, training, evaluation), got {type(data).__name__}")
    unknown = [k for k in data if k not in ("name", "task") and k not in _SECTION_NAMES]
    if unknown:
        raise _unknown(str(unknown[0]), ["name", "task", *_SECTION_NAMES])
    top = {}
    for key, default in (("name", "experiment"), ("task", "segmentation")):
        try:
            top[key] = CHECKS[key](data.get(key, default))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    task = top["task"]
    kwargs = {key: _build(key, cls, data.get(key) or {}, task)
              for key, cls in TASK_SECTIONS[task].items()}
    cfg = ExperimentConfig(**top, **kwargs)
    for rule in CROSS_CHECKS:
        rule(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.lr=0.1"`` -> ``("training.lr", 0.1)``: the value is read as YAML
    (``[505, 505]``, ``null``, ``true``, ``{split: val}``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(None, f"--set {text}: expected KEY=VALUE with a dotted key, e.g. "
                                f"training.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(None, f"--set {text}: the value is not valid YAML "
                                f"({_yaml_problem(exc)})") from None
    return key, value


def apply_overrides(data: Optional[dict], overrides: Iterable[tuple[str, Any]]) -> dict:
    """A copy of ``data`` with each ``(dotted key, value)`` set (inner mappings created)."""
    import copy

    data = copy.deepcopy(data) if data is not None else {}
    if not isinstance(data, dict):
        return data  # config_from_dict reports it
    for key, value in overrides:
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[:i + 1]), f"is {_shown(child)}, not a mapping: "
                                                           f"cannot set {key}")
            node = child
        node[parts[-1]] = value
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{problem}{where}"


def read_yaml(path: str | Path) -> Any:
    """The raw YAML of a config file; a missing or malformed file raises one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(None, f"not valid YAML: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(None, "not a YAML text file") from None


def load_config(path: str | Path, overrides: Iterable[tuple[str, Any]] = ()) -> ExperimentConfig:
    """Read, override (``(dotted key, value)`` pairs) and check a YAML config."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides), where=str(path))


def dump_config(cfg: ExperimentConfig, header: str = "") -> str:
    """The config as YAML text (``header`` lines become comments)."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
