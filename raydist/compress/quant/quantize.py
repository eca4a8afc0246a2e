"""Quantize a causal LM's decoder blocks in place: choose the targets, calibrate SmoothQuant (int8 dynamic; one
vector shared by the layers that read the same input) or GPTQ (int4), and swap each ``nn.Linear`` for a
``QuantizedLinear``; ``quantized_layers`` lists them."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from raydist.compress.quant.codes import (
    int4_codes_on_grid,
    pack_int4,
    pick_group_size,
)
from raydist.compress.quant.gptq import gptq_quantize_weights
from raydist.compress.quant.layer import (
    DEFAULT_INT4_GROUP_SIZE,
    INT4_ALGORITHMS,
    KERNELS,
    SPLIT_INT8,
    Device,
    QuantizedLinear,
    check_scheme,
)
from raydist.core.layout import decoder_layers

# --------------------------------------------------------------------------------------------------
# Model-level quantization
# --------------------------------------------------------------------------------------------------


def target_linears(model: nn.Module, include_lm_head: bool = False) -> list[str]:
    """Qualified names of the Linears ``quantize_model`` targets: every ``nn.Linear`` in the decoder
    blocks (q/k/v/o, gate/up/down for Llama), plus ``lm_head`` when asked; already-quantized layers too."""
    decoder_layers(model)
    names = [
        n
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and isinstance(m, (nn.Linear, QuantizedLinear))
    ]
    if include_lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def _module_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameters and persistent buffers (what a state dict would hold)."""
    seen: dict[int, torch.Tensor] = {}
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def quantize_model(
    model: nn.Module,
    scheme: str,
    *,
    group_size: Optional[int] = None,
    device: Device = None,
    include_lm_head: bool = False,
    kernel: Optional[str] = None,
    calibration: Union[torch.Tensor, Iterable[torch.Tensor], None] = None,
    smoothing_alpha: float = 0.5,
    int4_algorithm: str = "minmax",
    gptq: Optional[dict[str, Any]] = None,
    int4_grids: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
) -> dict[str, Any]:
    """Quantize the decoder blocks' Linears of ``model`` in place (see the module doc for kernels).

    Args:
        model: a causal LM with decoder blocks at ``model.model.layers`` (Llama family), any dtype.
        scheme: one of ``SCHEMES``.
        group_size: int4 only; requested group size (default 64). A layer whose ``in_features`` it does
            not divide gets the largest supported smaller one that does; the report says which.
        device: where the model runs; None = where its parameters are. The model is moved there first.
        include_lm_head: also quantize ``lm_head`` (a tied lm_head is untied: the embedding stays float).
        kernel: force one kernel of ``KERNELS`` for every layer instead of the device's measured best.
        calibration: ``int4_weight_only`` with ``int4_algorithm="gptq"`` (required there): the text
            GPTQ measures each layer's Hessian on. ``int8_dynamic``: token ids [B, T] (or an iterable of
            them) to measure each
            layer's input-channel maxima for SmoothQuant (Xiao et al., 2023): per input channel,
            ``s = max|x|^alpha / max|W|^(1-alpha)``; ``W * s`` is quantized and inputs are divided by
            ``s``, moving activation outliers into the (per-row quantized) weights (on SmolLM2 it cut
            int8_dynamic's perplexity cost several-fold). None = no smoothing.
        smoothing_alpha: SmoothQuant's migration strength in [0, 1].
        int4_algorithm: ``int4_weight_only``: how scales/zeros are chosen, ``INT4_ALGORITHMS`` (see there:
            ``"hqq"`` is markedly better on SmolLM2 but takes seconds per layer on CPU; ``"gptq"``
            compensates each column's rounding error on the calibration text, ``raydist.compress.quant.gptq``).
        int4_grids: int4 only: a fixed ``(scale, zero)`` grid per layer name (what quantization-aware
            training trained against, ``raydist.compress.quant.qat``): each weight is rounded to its layer's
            grid instead of choosing one. Every quantized layer must have one, with this group size.
        gptq: options for ``gptq.gptq_quantize_weights`` (``percdamp``, ``actorder``, ``blocksize``,
            ``true_sequential``).

    Returns:
        The report (JSON-serialisable): ``scheme``, ``group_size`` (requested), ``device``, ``kernel``
        (the kernels used, ``"a"`` or ``"a+b"``), ``speedup_expected`` (False when any layer runs a kernel
        no faster than dense), ``include_lm_head``, ``quantized_layers`` / ``skipped_layers`` (counts),
        ``layers`` ({qualified name: {in_features, out_features, kernel, group_size[, note]}} or
        {…, skipped: reason}), ``bytes_before`` / ``bytes_after`` (parameters + buffers in memory).

    Raises:
        ValueError: see ``check_scheme``; an unknown ``kernel`` or one for another device; a model
            without decoder blocks; a model that is already quantized; ``calibration`` for a scheme other
            than int8_dynamic, or ``smoothing_alpha`` outside [0, 1].
    """
    if device is None:
        device = next(model.parameters()).device
    check_scheme(scheme, group_size, device)
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {sorted(KERNELS)}")
    dev = torch.device(device)
    if kernel is not None and KERNELS[kernel][0] not in ("any", dev.type):
        raise ValueError(f"kernel {kernel!r} runs on {KERNELS[kernel][0]}, not on {dev.type}")
    names = target_linears(model, include_lm_head)
    already = [n for n in names if isinstance(model.get_submodule(n), QuantizedLinear)]
    if already:
        raise ValueError(f"model is already quantized ({already[0]} is a QuantizedLinear); quantize a float model")
    if int4_algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"unknown int4_algorithm {int4_algorithm!r}; choose from {INT4_ALGORITHMS}")
    use_gptq = scheme == "int4_weight_only" and int4_algorithm == "gptq"
    if calibration is not None and scheme != "int8_dynamic" and not use_gptq:
        raise ValueError(
            f"calibration applies to int8_dynamic (SmoothQuant) and int4 GPTQ only, not {scheme}"
            + (f" with int4_algorithm={int4_algorithm!r}" if scheme == "int4_weight_only" else "")
        )
    if use_gptq and calibration is None:
        raise ValueError("int4_algorithm='gptq' needs calibration token ids (GPTQ measures each layer's Hessian)")
    if gptq and not use_gptq:
        raise ValueError("gptq options apply to int4_algorithm='gptq' only")
    if int4_grids is not None and (scheme != "int4_weight_only" or use_gptq):
        raise ValueError("int4_grids apply to int4_weight_only with a min/max or hqq algorithm (not gptq) only")
    if not 0.0 <= smoothing_alpha <= 1.0:
        raise ValueError(f"smoothing_alpha must be in [0, 1], got {smoothing_alpha}")
    if scheme == "int4_weight_only" and group_size is None:
        group_size = DEFAULT_INT4_GROUP_SIZE
    for name in names if int4_grids is not None else ():
        lin = model.get_submodule(name)
        g = pick_group_size(lin.in_features, group_size)
        if g is not None and (
            name not in int4_grids or tuple(int4_grids[name][0].shape) != (lin.out_features, lin.in_features // g)
        ):
            raise ValueError(
                f"int4_grids has no [{lin.out_features}, {lin.in_features // g}] grid (group size {g}) for {name}"
            )
    model.to(dev)
    bytes_before = _module_bytes(model)
    act_max, n_cal = (
        _input_channel_maxima(model, names, calibration, dev) if calibration is not None and not use_gptq else ({}, 0)
    )
    # Per input channel max |W| of every smoothed layer, taken before any layer is replaced.
    w_maxima = {n: model.get_submodule(n).weight.detach().float().abs().amax(dim=0).cpu() for n in act_max}
    gptq_report: dict[str, Any] = {}
    if use_gptq:
        # lm_head (include_lm_head) is outside the blocks GPTQ walks: it gets min/max rounding.
        sizes = {n: pick_group_size(model.get_submodule(n).in_features, group_size) for n in names if n != "lm_head"}
        gptq_report = gptq_quantize_weights(
            model, calibration, {n: g for n, g in sizes.items() if g is not None}, **(gptq or {})
        )
    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        lin = model.get_submodule(name)
        entry: dict[str, Any] = {"in_features": lin.in_features, "out_features": lin.out_features}
        g = None
        if scheme == "int4_weight_only":
            g = pick_group_size(lin.in_features, group_size)
            if g is None:
                entry["skipped"] = (
                    f"no supported group size <= {group_size} divides in_features={lin.in_features}; kept float"
                )
                layers[name] = entry
                continue
        smooth = None
        if name in act_max:
            # Layers that read the same input (q/k/v, gate/up) share one vector, as in SmoothQuant, where it
            # is folded into the norm before them; so the serving engine can also fuse them into one matmul.
            w_max = torch.stack([w_maxima[n] for n in _same_input(name) if n in w_maxima]).amax(dim=0)
            w_max, a_max = _per_kv_group(model, name, w_max.clamp(min=1e-5)), _per_kv_group(model, name, act_max[name])
            smooth = (a_max.clamp(min=1e-5) ** smoothing_alpha / w_max ** (1 - smoothing_alpha)).clamp(min=1e-5)
        codes = gptq_report.get("codes", {}).get(name)
        if int4_grids is not None:
            scale, zero = (t.detach().float().cpu() for t in int4_grids[name])
            codes = (pack_int4(int4_codes_on_grid(lin.weight.detach().cpu(), scale, zero)), scale, zero)
        q = QuantizedLinear.from_linear(
            lin, scheme, g, smooth=smooth, int4_data=codes, int4_algorithm="minmax" if use_gptq else int4_algorithm
        )
        used = q.prepare(kernel)
        model.set_submodule(name, q)
        entry.update(kernel=used, group_size=g)
        if q.note:
            entry["note"] = q.note
        layers[name] = entry
    if include_lm_head and "lm_head" in layers and getattr(model.config, "tie_word_embeddings", False):
        # The embedding stays float; the config must no longer promise tied weights, or a reload through
        # from_config/tie_weights would try to share one tensor between a float and a quantized module.
        model.config.tie_word_embeddings = False
    report = _report(model, scheme, group_size, dev, include_lm_head, layers, bytes_before)
    if scheme == "int4_weight_only":
        report["int4_algorithm"] = int4_algorithm
        if use_gptq:
            report["gptq"] = {k: v for k, v in gptq_report.items() if k != "codes"}
    if scheme == "int8_dynamic":
        if report["kernel"] == "torch.ao.dynamic_int8":
            report["activations"] = "int8 per token" + (
                " (weights packed as two codes: CPU without VNNI)" if SPLIT_INT8 else ""
            )
        elif report["kernel"] in ("raydist.int8_avx2", "torchao.int8_dynamic"):
            report["activations"] = "int8 per token"
        else:  # the dequantized kernel multiplies float activations by the int8 weights' float values
            report["activations"] = "not quantized (kernel " + str(report["kernel"]) + ")"
        report["smoothing"] = {"alpha": smoothing_alpha, "calibration_tokens": n_cal} if act_max else None
    return report


_SAME_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _per_kv_group(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """For o_proj of a grouped-query attention: ``t`` [heads * head_dim] averaged over the query heads that share a
    key/value head, so its smoothing vector is one per value channel and folds exactly into v_proj's output rows
    (what the compressed-tensors export does; ``compress.quant.ct_format``). The mean of the per-head maxima kept
    SmolLM2's int8_dynamic perplexity closer to dense than their max (BENCHMARKS.md, Serving). Any other layer:
    ``t`` unchanged."""
    cfg = getattr(model, "config", None)
    if not name.endswith("self_attn.o_proj") or cfg is None:
        return t
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if kv == heads or heads % kv or t.numel() % heads:
        return t
    grouped = t.reshape(kv, heads // kv, t.numel() // heads)
    return grouped.mean(dim=1, keepdim=True).expand_as(grouped).reshape(-1).contiguous()


def _same_input(name: str) -> list[str]:
    """The Linears of a Llama block that read the same input as ``name`` (itself included)."""
    for group in _SAME_INPUT:
        for member in group:
            if name.endswith("." + member):
                prefix = name[: -len(member)]
                return [prefix + m for m in group]
    return [name]


@torch.no_grad()
def _input_channel_maxima(
    model: nn.Module, names: list[str], calibration, dev: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    """Per target Linear, the max |input| per input channel over the calibration tokens ([K], CPU fp32)."""
    batches = list(calibration.split(4) if isinstance(calibration, torch.Tensor) else calibration)
    maxima: dict[str, torch.Tensor] = {}

    def hook(mod, args, name):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).cpu()
        maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for b in batches:
            b = torch.as_tensor(b)
            b = b[None] if b.dim() == 1 else b
            model(input_ids=b.to(dev), use_cache=False)
            tokens += b.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not tokens:
        raise ValueError("calibration holds no tokens")
    return maxima, tokens


def _report(model, scheme, group_size, dev, include_lm_head, layers, bytes_before) -> dict[str, Any]:
    kernels = sorted({e["kernel"] for e in layers.values() if "kernel" in e})
    return {
        "scheme": scheme,
        "group_size": group_size,
        "device": str(dev),
        "kernel": "+".join(kernels) if kernels else None,
        "speedup_expected": bool(kernels) and all(KERNELS[k][1] for k in kernels),
        "include_lm_head": include_lm_head,
        "quantized_layers": sum("kernel" in e for e in layers.values()),
        "skipped_layers": sum("skipped" in e for e in layers.values()),
        "layers": layers,
        "bytes_before": bytes_before,
        "bytes_after": _module_bytes(model),
    }


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The model's ``QuantizedLinear`` modules by qualified name (empty for a float model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
