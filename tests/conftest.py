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
