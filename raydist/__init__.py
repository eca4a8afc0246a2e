"""raydist: a causal LM from base to fine-tuned and distilled artifact as Ray programs
(Ray Train + DeepSpeed, Ray Data).

The public API is exactly ``__all__`` below plus ``raydist.config``; everything else is internal.
"""

from raydist.components.artifact import read_manifest
from raydist.components.models import ModelSourceError, convert_gguf, load_model, load_tokenizer
from raydist.config import (
    ConfigError,
    DistillConfig,
    FinetuneConfig,
    GenerateConfig,
    load_config,
    load_stage_config,
)
from raydist.stages.distill import run_distill
from raydist.stages.finetune import run_finetune
from raydist.stages.generate import run_generate

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DistillConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "ModelSourceError",
    "__version__",
    "convert_gguf",
    "load_config",
    "load_model",
    "load_stage_config",
    "load_tokenizer",
    "read_manifest",
    "run_distill",
    "run_finetune",
    "run_generate",
]
