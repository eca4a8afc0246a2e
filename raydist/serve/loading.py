"""Loading what a replica serves: the artifact's model (plain, pruned or quantized), an optional LoRA
adapter, the tokenizer, and the model id. No Ray here.

All weight loading goes through ``raydist.load_compressed`` (quantized artifacts with their scheme, plain fp32
directories alike), the one place that knows how artifacts are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from raydist.compress.quant.ct_format import checkpoint_config
from raydist.compress.quant.format import load_compressed
from raydist.core import storage
from raydist.core.artifact import MANIFEST


class ArtifactError(ValueError):
    """The artifact directory cannot be served; the message says what is missing."""


def adapter_base(path: Path) -> Optional[str]:
    """The base model an adapter-only directory names (None when ``path`` is a full model directory)."""
    if (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return None
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ArtifactError(
            f"{path} is a LoRA adapter without base_model_name_or_path; give the base as "
            "`artifact` and this directory as `adapter`"
        )
    return base


def check_artifact(artifact: str, adapter: Optional[str] = None):
    """Cheap checks before anything starts: the directory exists and holds a model (or adapter + base).

    Returns:
        The resolved artifact path (a URI is returned as given: each replica reads it through a local copy).

    Raises:
        ArtifactError: a path is missing or holds neither config.json nor adapter_config.json.
    """
    if storage.is_uri(artifact):
        try:
            ok = storage.is_file(storage.join(artifact, "config.json"))
        except (ValueError, OSError) as e:
            raise ArtifactError(f"artifact {artifact!r} cannot be read: {e}") from None
        if not ok:
            raise ArtifactError(f"artifact {artifact!r} holds no config.json (not a model directory)")
        if adapter is not None:
            check_artifact_adapter(adapter)
        return artifact
    p = Path(storage.on_this_node(artifact)).expanduser().resolve()  # shipped with a job, read on another node
    if not p.is_dir():
        raise ArtifactError(f"artifact {artifact!r} is not a directory")
    base = adapter_base(p)
    if base is not None:
        if not Path(base).is_dir():
            raise ArtifactError(f"{p} is a LoRA adapter whose base {base!r} is not a local directory")
    elif not (p / "config.json").is_file():
        raise ArtifactError(f"{p} holds no config.json (not a Hugging Face model directory or raydist artifact)")
    if adapter is not None:
        check_artifact_adapter(adapter)
    return p


def check_artifact_adapter(adapter: str) -> None:
    a = Path(adapter).expanduser().resolve()
    if not (a / "adapter_config.json").is_file():
        raise ArtifactError(f"adapter {adapter!r} holds no adapter_config.json (not a peft adapter directory)")


def default_model_id(artifact: str) -> str:
    """The id clients use: the run name for ``runs/<name>/artifact``, else the directory name."""
    if storage.is_uri(artifact):
        name = storage.name_of(artifact)
        return storage.name_of(storage.parent_of(artifact)) if name == "artifact" else name
    p = Path(artifact).expanduser().resolve()
    return p.parent.name if p.name == "artifact" and p.parent.name else p.name


def load_served_model(artifact: str, adapter: Optional[str], device: str, dtype: str):
    """Model and tokenizer for serving, in eval mode on ``device``.

    Args:
        artifact: model directory (or adapter-only directory with a local base).
        adapter: optional peft adapter directory merged onto the model.
        device: ``cpu`` or ``cuda``.
        dtype: ``auto`` (bfloat16 on CUDA, as loaded on CPU; a quantized artifact keeps its scheme) or a torch
            dtype name.

    Returns:
        ``(model, tokenizer, manifest_or_None)``.
    """
    from transformers import AutoTokenizer

    p = check_artifact(artifact, adapter)
    if storage.is_uri(p):
        p = storage.local_copy(p)  # this replica's copy (cached per machine)
    base = adapter_base(p)
    manifest_file = p / MANIFEST
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    # raydist's manifest, or a compressed-tensors checkpoint from another tool
    quantized = bool((manifest or {}).get("quantization")) or checkpoint_config(p) is not None
    adapters = [str(p)] if base is not None else []
    if adapter is not None:
        adapters.append(str(Path(adapter).expanduser().resolve()))
    if quantized and adapters:
        raise ArtifactError(
            f"{p} is quantized; a LoRA adapter cannot be merged into quantized weights (merge it before quantizing)"
        )
    if quantized and dtype != "auto":
        raise ArtifactError(f"{p} is quantized with its own scheme; resources.dtype must stay 'auto'")
    # Adapters merge on the CPU copy; the merged model then moves to the device once.
    model = load_compressed(base or str(p), device=None if adapters else device)
    if adapters:
        from peft import PeftModel

        for a in adapters:  # merged, so serving costs nothing extra per token
            model = PeftModel.from_pretrained(model, a).merge_and_unload()
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    elif device == "cuda" and not quantized and next(model.parameters()).dtype == torch.float32:
        model = model.to(torch.bfloat16)
    model = model.to(device).eval()
    tok_dir = next((d for d in [str(p), adapter, base] if d and (Path(d) / "tokenizer_config.json").is_file()), None)
    if tok_dir is None:
        raise ArtifactError(f"no tokenizer found in {p}{' or its base' if base else ''}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, manifest
