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
    assert set(raydist.__all__) <= set(dir(raydist))


def test_import_and_help_load_neither_torch_nor_ray():
    """`import raydist` and `raydist --help` stay fast: the public names are imported on first use."""
    code = (
        "import sys, contextlib, io, raydist, raydist.cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    raydist.cli.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))\n"
        "from raydist import run_finetune, FinetuneConfig\n"
        "print(run_finetune.__module__, FinetuneConfig.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "raydist.train.finetune FinetuneConfig"]


# The building blocks (models, data, losses, compression, training plumbing) are pure torch/transformers: a
# stage's driver is the only place that knows both Ray and the model.
PURE_PACKAGES = ("raydist.core", "raydist.compress")
PURE_MODULES = (
    "raydist.train.plumbing",
    "raydist.train.export",
    "raydist.distill.losses",
    "raydist.distill.teacher_cache",
    "raydist.distill.generation",
)


def test_building_blocks_never_import_ray():
    code = (
        "import sys, pkgutil, importlib\n"
        f"for p in {PURE_PACKAGES!r}:\n"
        "    for m in pkgutil.walk_packages(importlib.import_module(p).__path__, p + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"for m in {PURE_MODULES!r}: importlib.import_module(m)\n"
        "print(sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
