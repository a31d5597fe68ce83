"""The experiment configuration moved to :mod:`patchdp_opacus.app.config` (shared by the
segmentation and classification tasks); this module re-exports it for existing imports."""

from patchdp_opacus.app.config import *  # noqa: F401,F403
from patchdp_opacus.app.config import (  # noqa: F401 - names without an __all__ entry
    CHECKS,
    CROSS_CHECKS,
    ConfigError,
    DatasetConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    TrainingConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    known_keys,
    load_config,
    loader_geometry,
    parse_override,
    read_yaml,
)
