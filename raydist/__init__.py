"""raydist: a causal LM from base to fine-tuned artifact as Ray programs (Ray Train + DeepSpeed).

The public API is exactly ``__all__`` below plus ``raydist.config``; everything else is internal.
"""

from raydist.components.artifact import read_manifest
from raydist.components.models import ModelSourceError, convert_gguf, load_model, load_tokenizer
from raydist.config import ConfigError, FinetuneConfig, load_config
from raydist.stages.finetune import run_finetune

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FinetuneConfig",
    "ModelSourceError",
    "__version__",
    "convert_gguf",
    "load_config",
    "load_model",
    "load_tokenizer",
    "read_manifest",
    "run_finetune",
]
