"""raydist: a causal LM from base to fine-tuned, distilled and compressed artifact as Ray programs
(Ray Train + DeepSpeed, Ray Data, Ray Tune, Ray Serve).

The public API is exactly ``__all__`` below plus ``raydist.config``; everything else is internal.
"""

import logging as _logging

# transformers imports torchao whenever it is installed; on torch 2.13 that import logs a deprecation per
# enum it registers and, on CPU builds, a failed load per CUDA-only extension: noise, not actionable.
for _name in ("torch.utils._pytree", "torchao"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from raydist.components.artifact import read_manifest
from raydist.components.models import ModelSourceError, convert_gguf, load_model, load_tokenizer
from raydist.components.quantization import load_compressed
from raydist.config import (
    ConfigError,
    DistillConfig,
    FinetuneConfig,
    GenerateConfig,
    PipelineConfig,
    ServeConfig,
    SweepConfig,
    load_config,
    load_stage_config,
)
from raydist.jobs.pipeline import run_pipeline
from raydist.stages.distill import run_distill
from raydist.stages.finetune import run_finetune
from raydist.stages.generate import run_generate
from raydist.serve.app import run_serve
from raydist.stages.sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DistillConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "ModelSourceError",
    "PipelineConfig",
    "ServeConfig",
    "SweepConfig",
    "__version__",
    "convert_gguf",
    "load_compressed",
    "load_config",
    "load_model",
    "load_stage_config",
    "load_tokenizer",
    "read_manifest",
    "run_distill",
    "run_finetune",
    "run_generate",
    "run_pipeline",
    "run_serve",
    "run_sweep",
]
