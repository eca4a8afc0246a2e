"""Typed configs for every stage (pydantic v2, unknown keys rejected). YAML is their serialised form."""

from raydist.config.base import (
    DataConfig,
    DataSourceConfig,
    DeepSpeedSettings,
    JobSettings,
    LoraSettings,
    ModelConfig,
    OptimConfig,
    ResourceSettings,
    RunSettings,
    ScalingSettings,
    TinyModelSpec,
)
from raydist.config.distill import DistillConfig, KDSettings, PruneSettings, StudentConfig
from raydist.config.finetune import FinetuneConfig, TrainSettings
from raydist.config.generate import GenerateConfig
from raydist.config.loading import ConfigError, apply_overrides, dump_config, load_config
from raydist.config.pipeline import PipelineConfig
from raydist.config.serve import ServeConfig
from raydist.config.sweep import SweepConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "DeepSpeedSettings",
    "DistillConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "JobSettings",
    "KDSettings",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "PruneSettings",
    "ResourceSettings",
    "RunSettings",
    "ScalingSettings",
    "ServeConfig",
    "StudentConfig",
    "SweepConfig",
    "TinyModelSpec",
    "TrainSettings",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_stage_config",
    "stage_config_class",
]


def stage_config_class(stage: str):
    """The config class of a stage name (``finetune``, ``distill``, ``generate``, ``sweep``, ``serve``,
    ``pipeline``)."""
    classes = {
        "finetune": FinetuneConfig,
        "distill": DistillConfig,
        "generate": GenerateConfig,
        "serve": ServeConfig,
        "sweep": SweepConfig,
        "pipeline": PipelineConfig,
    }
    if stage not in classes:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(classes)}")
    return classes[stage]


def load_stage_config(path, overrides=(), default_stage: str = "finetune"):
    """Load a YAML config as the class its ``stage:`` field names (``default_stage`` when absent)."""
    from raydist.config.loading import config_from_dict, read_yaml

    data = apply_overrides(read_yaml(path), overrides)
    return config_from_dict(stage_config_class(data.get("stage", default_stage)), data, str(path))
