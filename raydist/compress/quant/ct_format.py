"""Quantized layers in the compressed-tensors format: what vLLM, SGLang and transformers (with the
``compressed-tensors`` package) load, written and read with that package's own compressors.

raydist's schemes map onto compressed-tensors schemes exactly:

=================  ==============================================================  =====================
raydist            compressed-tensors (``weights`` / ``input_activations``)        on disk
=================  ==============================================================  =====================
int4_weight_only   int 4-bit, asymmetric, strategy ``group`` (the smallest group    ``pack-quantized``
                   size of the model's int4 layers; larger ones repeat their        (int32-packed codes and
                   scales: the same grid)                                           zero points)
int8_weight_only   int 8-bit, symmetric, strategy ``channel``                       ``pack-quantized``
int8_dynamic       as int8_weight_only / int 8-bit, symmetric, ``token``, dynamic   ``int-quantized``
=================  ==============================================================  =====================

raydist's int4 grid ``(q - 8) * scale + zero`` with ``zero = (8 - z) * scale`` (``codes.int4_minmax_qparams``) is
compressed-tensors' ``(q' - z') * scale`` with ``q' = q - 8`` and ``z' = z - 8``. SmoothQuant vectors have no
place in the format (it stores none), so they are folded into the module in front, as llm-compressor does:
q/k/v's into the input RMSNorm weight, gate/up's into the post-attention RMSNorm, lm_head's into the final norm,
down_proj's into up_proj's row scales and o_proj's into v_proj's row scales (exact: per-row int8 scales; o_proj's
vector is one per value channel, ``quantize._per_kv_group``). A layer whose vector cannot be folded is refused
with the reason.

compressed-tensors quantizes activations symmetrically per token where raydist's fbgemm kernel quantizes each row
on its own asymmetric 8-bit grid, so W8A8 logits of the two loaders agree to activation-rounding noise, the
weight-only schemes to float rounding (tests/unit/compress/test_ct_format.py states the tolerances).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from raydist.compress.quant.codes import int4_zero, int4_zero_points, pack_int4
from raydist.compress.quant.layer import QuantizedLinear

QUANT_METHOD = "compressed-tensors"


def checkpoint_config(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The ``quantization_config`` of the compressed-tensors checkpoint at ``path``; None for anything else."""
    config = Path(path) / "config.json"
    qconfig = (json.loads(config.read_text()).get("quantization_config") or {}) if config.is_file() else {}
    return qconfig if qconfig.get("quant_method") == QUANT_METHOD else None


def transformers_load_kwargs(qconfig: dict[str, Any]) -> dict[str, Any]:
    """What ``AutoModelForCausalLM.from_pretrained`` needs beside the path to load a checkpoint with this config.

    int4: ``CompressedTensorsConfig(dequantize=True)``. compressed-tensors 0.20 builds a checkpoint's packed
    asymmetric zero points unpacked on the meta device, so transformers' default (compressed) load of any asymmetric
    pack-quantized checkpoint fails on their shape (vllm-project/llm-compressor#1618); dequantizing at load reads
    them right. vLLM loads the files as they are.
    """
    if any((g.get("weights") or {}).get("num_bits") == 4 for g in qconfig.get("config_groups", {}).values()):
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def _scheme(layer: QuantizedLinear, group_size: Optional[int] = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if layer.scheme == "int4_weight_only":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
        return QuantizationScheme(targets=["Linear"], weights=weights)
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    acts = None
    if layer.scheme == "int8_dynamic":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def _scheme_key(scheme) -> str:
    return scheme.model_dump_json(exclude={"targets"})


# --------------------------------------------------------------------------------------------------
# SmoothQuant folding
# --------------------------------------------------------------------------------------------------

# smoothed Linear suffix -> (where its vector goes, how): "norm" divides that RMSNorm's weight, "rows" divides the
# row scales of that (int8) Linear's output rows.
_FOLD = {
    "self_attn.q_proj": ("input_layernorm", "norm"),
    "self_attn.k_proj": ("input_layernorm", "norm"),
    "self_attn.v_proj": ("input_layernorm", "norm"),
    "mlp.gate_proj": ("post_attention_layernorm", "norm"),
    "mlp.up_proj": ("post_attention_layernorm", "norm"),
    "mlp.down_proj": ("mlp.up_proj", "rows"),
    "self_attn.o_proj": ("self_attn.v_proj", "rows"),
}


def _fold_target(name: str) -> tuple[str, str]:
    if name == "lm_head":
        return "model.norm", "norm"
    for suffix, (target, how) in _FOLD.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + target, how
    raise ValueError(f"cannot fold the SmoothQuant vector of {name}: no module in front of it takes it")


def fold_smoothing(
    model: nn.Module, layers: dict[str, QuantizedLinear]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The folded form of every smoothed layer, without touching ``model``.

    Returns ``(norm weights, row scales)``: ``{norm module name: its new weight}`` and ``{Linear name: its new
    per-row scale}`` (int8 layers whose output rows absorbed a downstream vector).

    Raises:
        ValueError: a vector with nowhere to go exactly (layers reading one norm with different vectors, an o_proj
            vector that differs between query heads sharing a value head, a row fold into a non-int8 layer).
    """
    norms: dict[str, torch.Tensor] = {}
    by_norm: dict[str, tuple[str, torch.Tensor]] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if layer.smooth is None:
            continue
        target, how = _fold_target(name)
        s = layer.smooth.detach().float().cpu()
        if how == "norm":
            if target in by_norm:
                if not torch.equal(by_norm[target][1], s):
                    raise ValueError(
                        f"cannot fold SmoothQuant into {target}: {by_norm[target][0]} and {name} read it with "
                        "different vectors (an artifact smoothed layer by layer; re-quantize it)"
                    )
                continue
            by_norm[target] = (name, s)
            norms[target] = model.get_submodule(target).weight.detach().float().cpu() / s
            continue
        up = layers.get(target)
        if up is None or up.scheme == "int4_weight_only":
            raise ValueError(f"cannot fold the SmoothQuant vector of {name} into {target}: it is not an int8 layer")
        if name.endswith("self_attn.o_proj"):
            s = _per_value_channel(model, name, s)
        base = scales.get(target, up.scale.detach().float().cpu())
        scales[target] = base / s
    return norms, scales


def _per_value_channel(model: nn.Module, name: str, s: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    grouped = s.reshape(kv, heads // kv, -1)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ValueError(
            f"cannot fold the SmoothQuant vector of {name} into v_proj: it differs between query heads that share a "
            "value head (an artifact quantized before raydist made it one per value channel; re-quantize it)"
        )
    return grouped[:, 0].reshape(-1)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _targets(names: list[str], all_layers: list[str]) -> list[str]:
    """compressed-tensors targets for ``names``: ``re:`` on a suffix every decoder layer shares, exact names else."""
    out, left = [], list(names)
    per_suffix: dict[str, list[str]] = {}
    for n in all_layers:
        m = re.match(r"^(.*\.layers\.)\d+\.(.+)$", n)
        if m:
            per_suffix.setdefault(m.group(2), []).append(n)
    for suffix, members in sorted(per_suffix.items()):
        if all(m in names for m in members):
            out.append("re:.*\\.layers\\.\\d+\\." + re.escape(suffix) + "$")
            left = [n for n in left if n not in members]
    return out + sorted(left)


def compressed_tensors_state(
    model: nn.Module, layers: dict[str, QuantizedLinear]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the ``quantization_config`` that store ``model`` (with its ``QuantizedLinear`` ``layers``)
    in the compressed-tensors format; ``model`` is not changed.

    Returns:
        ``(tensors, quantization_config)``: every float tensor of the model (tied ones once) plus each quantized
        layer compressed by compressed-tensors' compressor for its scheme; the dict for ``config.json``.
    """
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    norms, row_scales = fold_smoothing(model, layers)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    skip = tuple(n + "." for n in layers)
    for k, t in model.state_dict().items():
        if k.startswith(skip):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[k] = t.detach().cpu().contiguous()
    for norm, w in norms.items():
        tensors[norm + ".weight"] = w.to(tensors[norm + ".weight"].dtype).contiguous()

    groups: dict[str, tuple[Any, list[str]]] = {}
    formats = set()
    # One int4 group size for the whole artifact: a layer quantized with a larger one (SmolLM2's down_proj at 128
    # where 128 does not divide the 576-wide layers, which took 64) is written at the smallest, its scale and zero
    # point repeated per sub-group -- the same grid, exactly. transformers' dequantizing load applies one scheme to
    # every dense layer, so mixed group sizes would not load there; vLLM takes either.
    int4_sizes = [m.group_size for m in layers.values() if m.scheme == "int4_weight_only"]
    g_out = min(int4_sizes) if int4_sizes else None
    for name, layer in layers.items():
        scheme = _scheme(layer, g_out)
        fmt = infer_module_format(nn.Linear, scheme)
        formats.add(fmt.value)
        groups.setdefault(_scheme_key(scheme), (scheme, []))[1].append(name)
        scale = row_scales.get(name, layer.scale.detach().float().cpu())
        sd: dict[str, torch.Tensor] = {}
        if layer.scheme == "int4_weight_only":  # (no row fold reaches an int4 layer: fold_smoothing refuses it)
            zero = layer.zero.detach().float().cpu()
            sd["weight"] = layer.dequantized_weight().cpu()
            rep = layer.group_size // g_out
            sd["weight_scale"] = scale.repeat_interleave(rep, dim=1).contiguous()
            sd["weight_zero_point"] = (int4_zero_points(scale, zero) - 8).to(torch.int8).repeat_interleave(rep, dim=1)
        else:
            sd["weight"] = layer.qweight.cpu().float() * scale[:, None]
            sd["weight_scale"] = scale[:, None].contiguous()
            sd["weight_zero_point"] = torch.zeros(scale.shape[0], 1, dtype=torch.int8)
        out = BaseCompressor.get_value_from_registry(fmt.value).compress(sd, scheme)
        for k2, t in out.items():
            tensors[f"{name}.{k2}"] = t.contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()

    all_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        scheme = scheme.model_copy(update={"targets": _targets(names, all_linear)})
        config_groups[f"group_{i}"] = scheme
    ignore = [n for n in all_linear if n not in layers]
    qconfig = QuantizationConfig(
        config_groups=config_groups,
        ignore=ignore,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    block = {
        "version": compressed_tensors.__version__,
        "quant_method": QUANT_METHOD,
        "sparsity_config": {},
        "transform_config": {},
        **qconfig.model_dump(exclude=["quant_method"]),
    }
    return tensors, block


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def describe(qconfig: dict[str, Any], model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{Linear name: {"scheme", "group_size", "format"}}`` for every module a compressed-tensors
    ``quantization_config`` quantizes in ``model`` (a float skeleton).

    Raises:
        ValueError: a scheme raydist has no layer for (floats, other bit widths, static or asymmetric activations,
            block or tensor strategies), named.
    """
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_named_modules

    cfg = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k != "version"})
    out: dict[str, dict[str, Any]] = {}
    for gname, scheme in cfg.config_groups.items():
        w, a = scheme.weights, scheme.input_activations
        fmt = scheme.format or cfg.format
        what = f"group {gname!r} ({w.num_bits if w else None}-bit {w.type if w else ''} weights)"
        if w is None or w.type != "int" or w.num_bits not in (4, 8) or scheme.output_activations is not None:
            raise ValueError(f"compressed-tensors {what}: raydist loads int4 and int8 weights only")
        if w.num_bits == 4:
            if w.strategy != "group" or a is not None:
                raise ValueError(f"compressed-tensors {what}: int4 needs strategy group and no activation quantization")
            spec = {"scheme": "int4_weight_only", "group_size": int(w.group_size)}
        else:
            if w.strategy != "channel" or not w.symmetric:
                raise ValueError(f"compressed-tensors {what}: int8 needs symmetric per-channel weights")
            if a is None:
                spec = {"scheme": "int8_weight_only", "group_size": None}
            elif a.type == "int" and a.num_bits == 8 and a.dynamic is True and a.strategy == "token":
                spec = {"scheme": "int8_dynamic", "group_size": None}
            else:
                raise ValueError(f"compressed-tensors {what}: activations must be dynamic int8 per token")
        for name, module in match_named_modules(model, scheme.targets, cfg.ignore):
            if isinstance(module, nn.Linear):
                out[name] = {**spec, "format": fmt}
    return out


def layer_from_tensors(
    spec: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, in_features: int, out_features: int
) -> QuantizedLinear:
    """A ``QuantizedLinear`` from one module's compressed-tensors tensors (``name.weight_packed`` etc.)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    def get(key: str) -> Optional[torch.Tensor]:
        return tensors.get(f"{name}.{key}")

    bias = get("bias")
    layer = QuantizedLinear(in_features, out_features, spec["scheme"], spec["group_size"], bias=bias is not None)
    scale = get("weight_scale")
    if scale is None:
        raise ValueError(f"{name}: no weight_scale in the checkpoint")
    scale = scale.float()
    if spec["scheme"] == "int4_weight_only":
        packed, zp = get("weight_packed"), get("weight_zero_point")
        if packed is not None:  # pack-quantized: 8 codes per int32, zero points packed along the rows
            shape = torch.Size(get("weight_shape").tolist())
            codes = unpack_from_int32(packed, 4, shape)
            if zp is not None:
                zp = unpack_from_int32(zp, 4, torch.Size([shape[0], scale.shape[-1]]), packed_dim=0)
        else:  # naive-quantized: one int8 per code
            codes = get("weight")
        codes = codes.to(torch.int16) + 8  # [0, 15]
        # no zero point: symmetric int4 (e.g. llm-compressor's W4A16), code 8 is 0
        z = torch.full_like(scale, 8.0) if zp is None else zp.float() + 8
        layer.qweight = pack_int4(codes)
        layer.scale, layer.zero = scale.contiguous(), int4_zero(scale, z)
    else:
        if get("weight_packed") is not None:
            shape = torch.Size(get("weight_shape").tolist())
            q = unpack_from_int32(get("weight_packed"), 8, shape)
        else:
            q = get("weight")
        layer.qweight, layer.scale = q.to(torch.int8).contiguous(), scale.reshape(-1).contiguous()
    if bias is not None:
        layer.bias = nn.Parameter(bias.float(), requires_grad=False)
    return layer
