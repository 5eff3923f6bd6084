"""Typed configuration: schema dataclasses, YAML loading, overrides, validation."""

from megalm.config.errors import ConfigError
from megalm.config.load import apply_override, config_from_dict, load_config, save_config, to_dict
from megalm.config.schema import (
    Config,
    DataConfig,
    DistConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainingConfig,
    ZeroConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RunConfig",
    "TrainingConfig",
    "ZeroConfig",
    "apply_override",
    "config_from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
