"""The artifact contract: a plain Hugging Face model directory plus ``raydist.json`` (lineage + metrics).

Every stage ends by writing one such directory; the next stage (or plain ``transformers``) loads it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from raydist.core import storage

MANIFEST = "raydist.json"
_LIBRARIES = ("raydist", "torch", "transformers", "deepspeed", "ray", "peft", "datasets", "pyarrow", "pydantic")


def library_versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def bytes_on_disk(path: str | Path) -> int:
    """Total size of the files under ``path`` (the manifest itself excluded)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != MANIFEST)


def weight_bytes(path: str | Path) -> int:
    """Bytes of the model weight files directly in ``path`` (adapters and tokenizer excluded)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_manifest(
    artifact_dir: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    parent: dict[str, Any],
    metrics: dict[str, Any],
    num_parameters: int,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write ``raydist.json`` into ``artifact_dir`` and return it.

    Args:
        stage: which stage produced the artifact (``finetune``, ...).
        config: the fully resolved stage config (JSON-serialisable).
        parent: ``{"path": ..., "hash": ..., "kind": ...}`` of the model the stage started from.
        metrics: final metrics (eval loss/perplexity, tokens/s, ...).
        num_parameters: distinct parameters of the exported model.
    """
    d = Path(artifact_dir)
    manifest = {
        "format": 1,
        "stage": stage,
        "created_unix": time.time(),
        "config": config,
        "parent": parent,
        "metrics": metrics,
        "num_parameters": num_parameters,
        "bytes_on_disk": bytes_on_disk(d),
        "weight_bytes": weight_bytes(d),
        "versions": library_versions(),
        **(extra or {}),
    }
    write_json_atomic(d / MANIFEST, manifest)
    return manifest


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """``raydist.json`` of an artifact directory (a path or a storage URI).

    Raises:
        FileNotFoundError: the directory is not a raydist artifact.
    """

    if storage.is_uri(artifact_dir):
        loc = storage.join(artifact_dir, MANIFEST)
        if not storage.is_file(loc):
            raise FileNotFoundError(f"{artifact_dir} is not a raydist artifact (no {MANIFEST})")
        return json.loads(storage.read_text(loc))
    p = Path(artifact_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a raydist artifact (no {MANIFEST})")
    return json.loads(p.read_text())
