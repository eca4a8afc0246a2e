import subprocess
import sys

import raydist


def test_public_api_is_pinned():
    assert sorted(raydist.__all__) == [
        "ConfigError", "FinetuneConfig", "ModelSourceError", "__version__", "convert_gguf", "load_config",
        "load_model", "load_tokenizer", "read_manifest", "run_finetune",
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
