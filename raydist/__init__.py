"""raydist: a causal LM from base to fine-tuned, distilled and compressed artifact as Ray programs
(Ray Train + DeepSpeed, Ray Data, Ray Tune, Ray Serve).

The public API is exactly ``__all__`` below plus ``raydist.config``; everything else is internal.
"""

import logging as _logging

from raydist._lazy import lazy_attributes

# transformers imports torchao whenever it is installed; on torch 2.13 that import logs a deprecation per
# enum it registers and, on CPU builds, a failed load per CUDA-only extension: noise, not actionable.
for _name in ("torch.utils._pytree", "torchao"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# Each public name is imported on first use (PEP 562), so `import raydist` and `raydist --help` load neither
# torch nor Ray; `from raydist import run_finetune` works as before.
_PUBLIC = {  # name -> the module it is imported from
    "read_manifest": "raydist.core.artifact",
    "ModelSourceError": "raydist.core.models",
    "convert_gguf": "raydist.core.models",
    "load_model": "raydist.core.models",
    "load_tokenizer": "raydist.core.models",
    "load_compressed": "raydist.compress.quant.format",
    "ConfigError": "raydist.config",
    "DistillConfig": "raydist.config",
    "FinetuneConfig": "raydist.config",
    "GenerateConfig": "raydist.config",
    "PipelineConfig": "raydist.config",
    "ServeConfig": "raydist.config",
    "SweepConfig": "raydist.config",
    "load_config": "raydist.config",
    "load_stage_config": "raydist.config",
    "run_pipeline": "raydist.jobs.pipeline",
    "run_distill": "raydist.distill.distill",
    "run_finetune": "raydist.train.finetune",
    "run_generate": "raydist.distill.generate",
    "run_serve": "raydist.serve.app",
    "run_sweep": "raydist.sweep.sweep",
}
__getattr__, __dir__ = lazy_attributes(globals(), _PUBLIC)


__version__ = "0.1.0"

__all__ = sorted([*_PUBLIC, "__version__"])
