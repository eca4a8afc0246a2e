"""Compressed artifacts on disk: ``save_compressed`` writes the quantized data in the compressed-tensors format
(``ct_format``: the bytes shrink with the scheme, and vLLM / transformers load it) beside a Hugging Face config and
tokenizer; ``load_compressed`` rebuilds the model from it and reloads to the same logits. Artifacts written before
(raydist's own layout, ``model.raydist-quantized.safetensors``) still load, with a warning."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from raydist.compress.quant.ct_format import checkpoint_config
from raydist.compress.quant.layer import Device, QuantizedLinear, check_scheme
from raydist.compress.quant.quantize import quantized_layers
from raydist.core.artifact import write_manifest
from raydist.core.models import count_parameters, make_shareable

QUANT_FORMAT = 2  # version of the on-disk layout written by save_compressed: 2 = compressed-tensors
LEGACY_QUANT_FORMAT = 1  # raydist's own layout (before compressed-tensors), still read
# The legacy layout's file: not "model.safetensors", so that plain from_pretrained failed loudly on it.
LEGACY_WEIGHTS_FILE = "model.raydist-quantized.safetensors"
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------------
# Compressed artifacts
# --------------------------------------------------------------------------------------------------


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
    manifest says so). A quantized model is stored in the compressed-tensors format (``ct_format``):
    ``config.json`` carries its ``quantization_config`` (quant_method ``compressed-tensors``), the quantized layers
    their packed codes, scales and zero points, everything else stays float; SmoothQuant vectors are folded into
    the modules in front. vLLM and ``transformers`` (with ``compressed-tensors`` installed) load it, and so does
    ``load_compressed``. ``raydist.json`` carries a ``quantization`` block (scheme, format version, per-layer
    scheme / group size).

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

        from raydist.compress.quant.ct_format import compressed_tensors_state

        tensors, qconfig = compressed_tensors_state(model, qlayers)
        schemes = sorted({m.scheme for m in qlayers.values()})
        quant_block = {
            "format": QUANT_FORMAT,
            "layout": "compressed-tensors",
            "scheme": schemes[0] if len(schemes) == 1 else "+".join(schemes),
            "layers": {
                n: {
                    "scheme": m.scheme,
                    "group_size": m.group_size,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "smoothing_folded": m.smooth is not None,
                }
                for n, m in qlayers.items()
            },
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        }
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
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

    A quantized artifact (compressed-tensors, from raydist or from another tool in a scheme raydist runs; or
    raydist's earlier layout, with a warning) is rebuilt from its config, its quantized layers become
    ``QuantizedLinear`` modules of the stored scheme / group size, the other tensors are loaded strictly, and each
    layer builds the device's kernel (or ``kernel``) from the canonical data — so the logits equal those of the
    model that was saved when the kernel is the same (up to float rounding where SmoothQuant was folded).

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
        ValueError: an unknown quantization format/scheme, a compressed-tensors scheme raydist has no layer for,
            tensors that do not match it, or a device the scheme cannot run on.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    manifest_path = path / "raydist.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    quant = manifest.get("quantization")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    qconfig = checkpoint_config(path)
    if qconfig is not None:
        model = _load_compressed_tensors(path, qconfig, dev, dtype)
    elif not quant:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    elif quant.get("format") == LEGACY_QUANT_FORMAT:
        warnings.warn(
            f"{path} is in raydist's pre-compressed-tensors layout ({LEGACY_WEIGHTS_FILE}); it loads here, but vLLM "
            "and transformers cannot read it: load it and save_compressed it again to convert it",
            stacklevel=2,
        )
        model = _load_legacy(path, quant, dev, dtype)
    else:
        raise ValueError(
            f"{path}: quantization format {quant.get('format')!r} is not supported "
            f"(expected {QUANT_FORMAT}, compressed-tensors, or {LEGACY_QUANT_FORMAT})"
        )
    model.to(dev).eval()
    for m in quantized_layers(model).values():
        m.prepare(kernel)
    return model


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The float model of ``path``'s config, without its quantization_config (layers are swapped in after)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Built directly in ``dtype`` (as from_pretrained(dtype=...) does): casting afterwards would also
        # round fp32-only buffers such as the rotary inv_freq, and the logits would differ from the saved model.
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_rest(path: Path, model: nn.Module, state: dict[str, torch.Tensor], quantized: set[str]) -> None:
    """Load the float tensors strictly: every parameter outside ``quantized`` layers must be in ``state``."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = {k for k in missing if k not in tied and k.rsplit(".", 1)[0] not in quantized}
    if unexpected or missing:
        raise ValueError(
            f"{path}: stored tensors do not match the model's layout "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if tied:
        model.tie_weights()


def _load_compressed_tensors(path: Path, qconfig: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> nn.Module:
    from safetensors.torch import load_file

    from raydist.compress.quant.ct_format import describe, layer_from_tensors

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: a compressed-tensors config.json but no *.safetensors file")
    model = _skeleton(path, dtype)
    specs = describe(qconfig, model)
    for spec in specs.values():
        check_scheme(spec["scheme"], spec["group_size"], dev)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    for name, spec in specs.items():
        lin = model.get_submodule(name)
        model.set_submodule(name, layer_from_tensors(spec, tensors, name, lin.in_features, lin.out_features))
    prefixes = tuple(n + "." for n in specs)
    _load_rest(path, model, {k: v for k, v in tensors.items() if not k.startswith(prefixes)}, set(specs))
    return model


def _load_legacy(path: Path, quant: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> nn.Module:
    from safetensors.torch import load_file

    for spec in quant["layers"].values():
        check_scheme(spec["scheme"], spec["group_size"] if spec["scheme"] == "int4_weight_only" else None, dev)
    model = _skeleton(path, dtype)
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
    _load_rest(path, model, load_file(str(path / LEGACY_WEIGHTS_FILE)), set())
    return model
