import os
from pathlib import Path

import pytest

# Keep tokenizer caches and Ray temp files out of $HOME on shared CI machines.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The S3 tests talk to a moto server on loopback; it accepts any credentials. Set here, before any Ray starts,
# so every Ray worker of the session inherits them (the endpoint travels in the URIs).
for _k, _v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SEED_TASKS = REPO.parent / "shared" / "data" / "seed_tasks.jsonl"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from raydist.components.models import tiny_tokenizer as build

    return build()
