"""Experiment configuration: a YAML file read into nested dataclasses with checked fields.

Sizes are ``(height, width)`` in pixels; ``epsilon`` in nats; ``delta`` per run (default 1/N);
``max_grad_norm`` is the clip norm C; ``noise_multiplier`` z gives noise std z * C.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    root: Optional[str] = None
    train: dict = field(default_factory=lambda: {"split": "train"})
    val: dict = field(default_factory=lambda: {"split": "val"})


@dataclass
class ModelConfig:
    arch: str = "deeplabv3plus"
    encoder_name: str = "resnet101"
    encoder_weights: Optional[str] = None
    num_classes: int = 19
    output_stride: int = 8
    norm: str = "group"
    aspp_rates: tuple = (12, 24, 36)
    extra: dict = field(default_factory=dict)


@dataclass
class PrivacyConfig:
    accounting: str = "patch"            # which claim calibrates the noise: patch | record
    epsilon: Optional[float] = 8.0       # target epsilon; None with noise_multiplier set
    noise_multiplier: Optional[float] = None
    delta: Optional[float] = None        # default 1 / N
    crop: tuple = (505, 505)             # the crop the model sees (height, width)
    padding: tuple = (0, 0)
    pad_if_needed: bool = False
    # loader-owned resampling before/with the crop, e.g. {kind: random_scale_crop,
    # scale_range: [0.5, 2.0], scale_step: 0.25}; see privacy.geometric.geometry_from_config
    transform: Optional[dict] = None
    private_region: dict = field(default_factory=lambda: {"shape": "rectangle", "size": [10, 10]})
    max_grad_norm: float = 2.0
    secure_sampling: bool = False


@dataclass
class TrainingConfig:
    epochs: int = 100
    batch_size: int = 200                # logical batch B (fixed size, without replacement)
    max_physical_batch_size: int = 16    # BatchMemoryManager chunk
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    grad_sample_mode: str = "hooks"     # Opacus' hooks/ghost/... or "bk" (patchdp_opacus.fast)
    fast_options: dict = field(default_factory=dict)  # options of a fast mode, e.g. storage
    num_workers: int = 0
    seed: int = 0
    eval_every: int = 5                  # epochs
    eval_batch_size: int = 2
    max_eval_images: Optional[int] = None
    device: str = "auto"
    max_steps: Optional[int] = None      # stop early after this many logical steps (smoke runs)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"dataset": DatasetConfig, "model": ModelConfig, "privacy": PrivacyConfig,
             "training": TrainingConfig}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**data)


def config_from_dict(data: dict[str, Any], where: str = "config") -> ExperimentConfig:
    data = dict(data or {})
    unknown = sorted(set(data) - {"name", *_SECTIONS})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: "
                         f"{['name', *_SECTIONS]}")
    kwargs = {"name": data.get("name", "experiment")}
    for key, cls in _SECTIONS.items():
        kwargs[key] = _build(cls, data.get(key, {}) or {}, f"{where}: {key}")
    cfg = ExperimentConfig(**kwargs)
    if cfg.privacy.accounting not in ("patch", "record"):
        raise ValueError(f"{where}: privacy.accounting must be 'patch' or 'record', got "
                         f"{cfg.privacy.accounting!r}")
    if (cfg.privacy.epsilon is None) == (cfg.privacy.noise_multiplier is None):
        raise ValueError(f"{where}: set exactly one of privacy.epsilon (calibrate the noise) and "
                         f"privacy.noise_multiplier")
    try:
        loader_geometry(cfg.privacy)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: privacy.transform / privacy.crop: {exc}") from None
    return cfg


def loader_geometry(privacy: PrivacyConfig):
    """The geometry the loader applies and the accountant uses: a crop, or the loader-owned
    transform of ``privacy.transform`` (random scale + crop, resize + crop, RandomResizedCrop)
    whose output is ``privacy.crop``."""
    from patchdp_opacus.privacy.geometric import geometry_from_config

    return geometry_from_config(privacy.crop, privacy.padding, privacy.pad_if_needed,
                                privacy.transform)


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f)
    return config_from_dict(data, where=str(path))
