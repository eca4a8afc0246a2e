import subprocess
import sys

import raydist


def test_public_api_is_pinned():
    assert sorted(raydist.__all__) == [
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
    for name in raydist.__all__:
        assert getattr(raydist, name) is not None


def test_components_never_import_ray():
    code = (
        "import sys, pkgutil, importlib, raydist.components as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('raydist.components.' + m.name)\n"
        "print(sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
