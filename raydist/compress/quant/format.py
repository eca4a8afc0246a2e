"""Compressed artifacts on disk: ``save_compressed`` writes the canonical quantized data (so the bytes shrink with
the scheme) beside a Hugging Face config and tokenizer; ``load_compressed`` rebuilds the model from it and reloads
to the same logits."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from raydist.compress.quant.layer import Device, QuantizedLinear, check_scheme
from raydist.compress.quant.quantize import quantized_layers
from raydist.core.artifact import write_manifest
from raydist.core.models import count_parameters, make_shareable

QUANT_FORMAT = 1  # version of the on-disk layout written by save_compressed
# Not "model.safetensors": plain from_pretrained must fail loudly on a quantized artifact (transformers only
# warns about an unknown quantization_config and would fill the missing float weights with random ones).
WEIGHTS_FILE = "model.raydist-quantized.safetensors"


# --------------------------------------------------------------------------------------------------
# Compressed artifacts
# --------------------------------------------------------------------------------------------------


def _distinct_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (safetensors refuses shared storage) and made contiguous;
    the reload re-ties them through the config, as transformers does."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().cpu().contiguous()
    return out


def save_compressed(
    model: nn.Module,
    tokenizer: Any,
    out_dir: Union[str, Path],
    report: Optional[dict[str, Any]] = None,
    *,
    stage: str = "compress",
    config: Optional[dict[str, Any]] = None,
    parent: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write a compressed artifact: HF config + tokenizer + ``model.safetensors`` + ``raydist.json``.

    Format: a float model (dense, structurally pruned, or unstructured-sparse) is a plain
    ``save_pretrained`` directory (sparse weights are stored dense: the bytes do not shrink, and the
    manifest says so). A quantized model stores each ``QuantizedLinear``'s canonical data
    (``<layer>.qweight`` int8 [N, K] or uint8 [N, K/2], ``<layer>.scale`` fp32, ``<layer>.zero`` fp32
    for int4, ``<layer>.bias``) and everything else in float; ``raydist.json`` carries a ``quantization``
    block (scheme, format version, per-layer scheme/group size) that ``load_compressed`` reads.
    The quantized tensors go to ``model.raydist-quantized.safetensors`` (not ``model.safetensors``), so
    plain ``from_pretrained`` refuses the directory instead of filling the missing ``.weight`` tensors with
    random values; ``config.json`` also names the loader in ``quantization_config`` (quant_method
    ``raydist``). ``load_compressed`` loads every artifact, float or quantized.

    Args:
        model: the model to save (float, or after ``quantize_model``), on any device.
        tokenizer: saved alongside (may be None).
        out_dir: target directory; must not exist or be empty. Written to a temporary sibling first and
            renamed into place.
        report: the compression report (``quantize_model``'s, or a pruning/sparsity report) kept in the
            manifest under ``compression``.
        stage / config / parent / metrics: manifest fields (see ``artifact.write_manifest``).

    Returns:
        The manifest written to ``raydist.json``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
    """

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    qlayers = quantized_layers(model)
    quant_block: Optional[dict[str, Any]] = None
    if not qlayers:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        schemes = sorted({m.scheme for m in qlayers.values()})
        quant_block = {
            "format": QUANT_FORMAT,
            "scheme": schemes[0] if len(schemes) == 1 else "+".join(schemes),
            "layers": {
                n: {
                    "scheme": m.scheme,
                    "group_size": m.group_size,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "smoothed": m.smooth is not None,
                }
                for n, m in qlayers.items()
            },
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        }
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {
            "quant_method": "raydist",
            "scheme": quant_block["scheme"],
            "load_with": "raydist.load_compressed",
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_file(
            _distinct_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "raydist": "quantized"}
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    extra: dict[str, Any] = {"compression": _jsonable(report or {})}
    if quant_block is not None:
        extra["quantization"] = quant_block
    elif report and any(k in report for k in ("sparsity", "pattern")):
        extra["compression"]["bytes_shrink"] = False  # unstructured zeros are stored dense

    # Logical parameter count: a quantized layer's weight is a buffer, but it still stands for N*K weights.
    n_params = count_parameters(model) + sum(m.in_features * m.out_features for m in qlayers.values())
    manifest = write_manifest(
        tmp,
        stage=stage,
        config=config or {},
        parent=parent or {},
        metrics=metrics or {},
        num_parameters=n_params,
        extra=extra,
    )
    make_shareable(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return manifest


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def load_compressed(
    path: Union[str, Path], device: Device = None, *, dtype: torch.dtype = torch.float32, kernel: Optional[str] = None
) -> nn.Module:
    """Load any raydist artifact (float or quantized) as an eval-mode causal LM on ``device``.

    A quantized artifact is rebuilt from its config, its quantized layers are replaced by empty
    ``QuantizedLinear`` modules of the recorded scheme/group size, the stored tensors are loaded strictly,
    and each layer builds the device's kernel (or ``kernel``) from the canonical data — so the logits equal
    those of the model that was saved when the kernel is the same.

    Args:
        path: artifact directory (``save_compressed`` output, or any HF model directory).
        device: where to run (None = CPU).
        dtype: dtype of the float parameters (embeddings, norms, unquantized layers); quantized layers keep
            their stored data and compute in the activations' dtype.
        kernel: force a kernel for every quantized layer (see ``KERNELS``).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: no config.json in ``path``.
        ValueError: an unknown quantization format/scheme in the manifest, tensors that do not match it,
            or a device the scheme cannot run on.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    manifest_path = path / "raydist.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    quant = manifest.get("quantization")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not quant:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(dev).eval()
    if quant.get("format") != QUANT_FORMAT:
        raise ValueError(
            f"{path}: quantization format {quant.get('format')!r} is not supported (expected {QUANT_FORMAT})"
        )
    for name, spec in quant["layers"].items():
        check_scheme(spec["scheme"], spec["group_size"] if spec["scheme"] == "int4_weight_only" else None, dev)
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):  # our marker; the rebuilt model is float until layers swap
        delattr(config, "quantization_config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Built directly in ``dtype`` (as from_pretrained(dtype=...) does): casting afterwards would also
        # round fp32-only buffers such as the rotary inv_freq, and the logits would differ from the saved model.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in quant["layers"].items():
        model.set_submodule(
            name,
            QuantizedLinear(
                spec["in_features"],
                spec["out_features"],
                spec["scheme"],
                spec["group_size"],
                bias=spec["bias"],
                smoothed=spec.get("smoothed", False),
            ),
        )
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{path}: stored tensors do not match the recorded layout "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if tied:
        model.tie_weights()
    model.to(dev).eval()
    for m in quantized_layers(model).values():
        m.prepare(kernel)
    return model
