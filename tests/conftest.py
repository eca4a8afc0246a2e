import os
from pathlib import Path

import pytest

# Keep tokenizer caches and Ray temp files out of $HOME on shared CI machines.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
SEED_TASKS = REPO.parent / "shared" / "data" / "seed_tasks.jsonl"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from raydist.components.models import tiny_tokenizer as build

    return build()
