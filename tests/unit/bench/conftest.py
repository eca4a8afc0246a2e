"""Benchmark scripts (scripts/bench is not a package) loaded as modules for the tests of their pure parts."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "scripts" / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench(name)``: ``scripts/bench/<name>.py`` as a module (its top level runs, as when it starts)."""
    return _load
