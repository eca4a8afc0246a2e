"""Typed configs for every stage (pydantic v2, unknown keys rejected). YAML is their serialised form."""

from raydist.config.base import (
    DataConfig,
    DataSourceConfig,
    DeepSpeedSettings,
    LoraSettings,
    ModelConfig,
    OptimConfig,
    RunSettings,
    ScalingSettings,
    TinyModelSpec,
)
from raydist.config.finetune import FinetuneConfig, TrainSettings
from raydist.config.loading import ConfigError, apply_overrides, dump_config, load_config

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "DeepSpeedSettings",
    "FinetuneConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "RunSettings",
    "ScalingSettings",
    "TinyModelSpec",
    "TrainSettings",
    "apply_overrides",
    "dump_config",
    "load_config",
]
