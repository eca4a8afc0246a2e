"""One compression candidate, applied: structured pruning → unstructured / N:M pruning → recovery → quantization.

The sweep stage calls :func:`apply_candidate` in every Ray Tune trial; the benchmark's naive loop calls it
too, so both compress identically. Order matters and follows the literature: remove structure first
(Minitron), then zero weights within what is left (Wanda / SparseGPT measure the activations of the model
they prune), then recover the damage with a short distillation from the uncompressed model (sparsity
masks kept), and quantize last. With ``recovery: qat`` the int4 grids are chosen first and the
distillation trains against them (quantization-aware training, ``raydist.compress.quant.qat``).

Pure torch (no Ray). The building blocks are ``pruning`` (structured), ``sparsity`` (unstructured) and
``quantization``; this module only composes them and adds the recovery loop.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional

import torch
from torch import nn

from raydist.compress import unstructured as sparsity
from raydist.compress.quant.qat import fake_quantized, int4_grids
from raydist.compress.quant.quantize import quantize_model
from raydist.compress.structured import Importance, collect_importance, prune_model
from raydist.compress.unstructured import prunable_linears
from raydist.config.sweep import DEFAULT_INT4_ALGORITHM
from raydist.distill.losses import kd_loss_on_rows


class CandidateError(ValueError):
    """A candidate that cannot be built for this model (e.g. removes more than the MLP holds)."""


def block_parameter_split(config) -> dict[str, int]:
    """Per-layer parameter counts of a Llama-layout config: ``attention``, ``mlp``, ``block`` (their sum)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * h * config.intermediate_size  # gate, up, down
    return {"attention": attention, "mlp": mlp, "block": attention + mlp}


def structured_plan(config, fraction: float, structure: str, *, multiple_of: int = 32) -> dict[str, Any]:
    """``prune_model`` arguments that remove ``fraction`` of the transformer-block parameters.

    Args:
        config: the model's (Llama-layout) config.
        fraction: share of the decoder blocks' parameters to remove, in (0, 1).
        structure: ``"mlp"`` (intermediate channels only), ``"layers"`` (whole layers, the least important
            first) or ``"mlp+heads"`` (up to half of the budget as whole KV groups, the rest MLP channels).
        multiple_of: kept MLP widths are rounded to a multiple of this (kernel-friendly shapes).

    Raises:
        CandidateError: the request cannot be met with that structure (e.g. more than the MLP holds).
    """
    if not 0 < fraction < 1:
        raise CandidateError(f"structured fraction must be in (0, 1), got {fraction}")
    split = block_parameter_split(config)
    n_layers = config.num_hidden_layers
    if structure == "layers":
        drop = max(1, round(fraction * n_layers))
        if drop >= n_layers:
            raise CandidateError(f"removing {fraction:.0%} of {n_layers} layers leaves none")
        return {"drop_layers": drop}
    budget = fraction * split["block"]  # parameters to remove per layer
    kv_keep = None
    if structure == "mlp+heads":
        n_kv = config.num_key_value_heads
        per_group = split["attention"] / n_kv
        groups = min(n_kv - 1, int((budget / 2) // per_group))
        if groups > 0:
            kv_keep = n_kv - groups
            budget -= groups * per_group
    elif structure != "mlp":
        raise CandidateError(f"unknown structure {structure!r}; expected mlp, layers or mlp+heads")
    keep = 1.0 - budget / split["mlp"]
    if keep <= 0.05:
        raise CandidateError(
            f"removing {fraction:.0%} of the block parameters through '{structure}' would leave "
            f"{max(keep, 0):.0%} of the MLP; use a smaller fraction or structure 'layers'"
        )
    return {"mlp_keep_ratio": keep, "kv_groups_keep": kv_keep, "multiple_of": multiple_of}


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Boolean masks of the exact zeros of every block Linear weight (what recovery must keep zero)."""

    return {
        name: lin.weight.detach() == 0 for name, lin in prunable_linears(model).items() if bool((lin.weight == 0).any())
    }


def distill_recover(
    model: nn.Module,
    teacher: nn.Module,
    token_ids: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    temperature: float = 1.0,
    seed: int = 0,
    grids: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
) -> dict[str, Any]:
    """A short knowledge-distillation recovery: ``model`` learns ``teacher``'s next-token distributions.

    Forward KL on every position, AdamW at a constant ``lr``; weights that are exactly zero before
    (unstructured / N:M sparsity) are zeroed again after every step, so the sparsity pattern survives.
    With ``grids`` it is quantization-aware training: the listed Linears compute with their weights
    rounded to those int4 grids (``raydist.compress.quant.qat``).

    Args:
        model: the compressed float model (trained in place; left in eval mode).
        teacher: the uncompressed model (frozen), same vocabulary.
        token_ids: [N, T] training sequences (cycled).
        steps, batch_size, lr, temperature, seed: the loop's settings.
        grids: {layer name: (scale, zero)} int4 grids to train against (QAT), from ``qat.int4_grids``.

    Returns:
        ``{"steps", "first_loss", "last_loss", "seconds"}`` (+ ``"qat_layers"`` with grids).
    """
    from contextlib import nullcontext

    if token_ids.dim() != 2 or token_ids.size(0) == 0:
        raise ValueError(f"token_ids must be a non-empty [N, T] tensor, got {list(token_ids.shape)}")
    masks = _zero_masks(model)
    with fake_quantized(model, grids) if grids else nullcontext({}) as latent:
        report = _kd_steps(
            model,
            teacher,
            token_ids,
            masks,
            latent,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            temperature=temperature,
            seed=seed,
        )
    if grids:
        report["qat_layers"] = len(grids)
    return report


def _kd_steps(model, teacher, token_ids, masks, latent, *, steps, batch_size, lr, temperature, seed) -> dict[str, Any]:

    device = next(model.parameters()).device
    linears = prunable_linears(model)
    weights = {name: latent[name] if name in latent else linears[name].weight for name in masks}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(token_ids.size(0), generator=gen)
    teacher.eval()
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(order)]
        ids = token_ids[idx].to(device)  # [b, T]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[:, :-1].reshape(-1, teacher.config.vocab_size)
        s_logits = model(input_ids=ids).logits[:, :-1]
        s_logits = s_logits.reshape(-1, s_logits.size(-1))  # [b*(T-1), V]
        loss = kd_loss_on_rows(s_logits, t_logits, kind="forward_kl", temperature=temperature) / s_logits.size(0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for name, mask in masks.items():
                weights[name].masked_fill_(mask, 0.0)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"recovery diverged at step {step + 1} (loss {losses[-1]})")
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "seconds": time.time() - t0}


def apply_candidate(
    model: nn.Module,
    candidate: dict[str, Any],
    *,
    calibration: torch.Tensor,
    importance: Optional[Importance] = None,
    teacher: Optional[nn.Module] = None,
    recovery_ids: Optional[torch.Tensor] = None,
    recovery: Optional[dict[str, Any]] = None,
    device: Optional[str] = None,
) -> dict[str, Any]:
    """Compress ``model`` in place as ``candidate`` says; return what was done, step by step.

    Args:
        model: float Llama-layout causal LM (modified in place).
        candidate: ``method`` (none|magnitude|wanda|sparsegpt), ``sparsity``, ``pattern`` ("N:M" or None),
            ``structured`` (fraction, 0 = none), ``structure``, ``quantization`` (none or a scheme of
            ``compress.quant.layer.SCHEMES``), ``group_size``, ``int4_algorithm`` (minmax|hqq|gptq; default
            gptq, as the sweep's ``search_space.int4_algorithm``: it needs ``calibration``),
            ``recovery`` (none|distill|qat: distillation, or distillation against the int4 grids
            the candidate's quantization chose, before rounding to them) — see
            ``raydist.config.sweep.SearchSpace``.
        calibration: [n, T] token ids for the data-aware methods.
        importance: structured-pruning importance measured on the dense model (needed when
            ``structured > 0``; measured here from ``calibration`` when None).
        teacher: the uncompressed model, for ``recovery: distill``.
        recovery_ids: [N, T] recovery text; recovery: ``steps``, ``batch_size``, ``lr``, ``temperature``.
        device: where the quantized model will run (picks the kernels); None = where it is.

    Returns:
        ``{"structured": ..., "sparsity": ..., "recovery": ..., "quantization": ...}`` (absent steps omitted),
        plus ``seconds`` per step.

    Raises:
        CandidateError / ValueError: the candidate cannot be applied (nothing is half-applied silently:
        the caller discards the model).
    """

    report: dict[str, Any] = {"candidate": dict(candidate), "seconds": {}}
    t = time.time()
    if candidate.get("structured", 0.0) > 0:
        plan = structured_plan(model.config, candidate["structured"], candidate["structure"])
        if importance is None:
            importance = collect_importance(model, [calibration])
        report["structured"] = {"plan": plan, **prune_model(model, importance, **plan)}
        report["seconds"]["structured"] = time.time() - t
    method = candidate.get("method", "none")
    if method != "none":
        t = time.time()
        pattern = candidate.get("pattern")
        amount = None if pattern else candidate["sparsity"]
        if method == "magnitude":
            rep = sparsity.magnitude_prune(model, amount, pattern=pattern)
        elif method == "wanda":
            rep = sparsity.wanda_prune(model, calibration, amount, pattern=pattern)
        elif method == "sparsegpt":
            rep = sparsity.sparsegpt_prune(model, calibration, amount, pattern=pattern)
        else:
            raise CandidateError(f"unknown pruning method {method!r}")
        report["sparsity"] = {k: v for k, v in rep.items() if k != "per_layer"}
        report["seconds"]["sparsity"] = time.time() - t
    scheme = candidate.get("quantization", "none")
    # the sweep's default (config.sweep.SearchSpace), so a candidate means the same from the CLI and from Python
    int4_algorithm = candidate.get("int4_algorithm") or DEFAULT_INT4_ALGORITHM
    recovery_kind = candidate.get("recovery", "none")
    grids = None
    if recovery_kind in ("distill", "qat"):
        if teacher is None or recovery_ids is None or recovery is None:
            raise CandidateError(
                f"recovery {recovery_kind!r} needs the uncompressed teacher, recovery text and settings"
            )
        if recovery_kind == "qat" and scheme != "int4_weight_only":
            raise CandidateError(f"recovery 'qat' trains against int4 grids; quantization is {scheme!r}")
        t = time.time()
        if recovery_kind == "qat":
            grids, report["qat_grid"] = int4_grids(
                model,
                group_size=candidate.get("group_size"),
                int4_algorithm=int4_algorithm,
                calibration=calibration if int4_algorithm == "gptq" else None,
            )
        report["recovery"] = distill_recover(model, teacher, recovery_ids, grids=grids, **recovery)
        report["seconds"]["recovery"] = time.time() - t
    elif recovery_kind != "none":
        raise CandidateError(f"unknown recovery {recovery_kind!r}; expected none, distill or qat")
    if scheme != "none":
        t = time.time()
        if grids is not None:  # QAT: round the trained weights to the grids they were trained against
            extra: dict[str, Any] = {"int4_grids": grids}
        elif scheme == "int8_dynamic":
            # calibrates the per-channel activation smoothing (SmoothQuant) on the same text: on SmolLM2 it cut
            # int8_dynamic's perplexity cost several-fold (BENCHMARKS.md, Serving, has the winner's figure).
            alpha = candidate.get("smoothing_alpha")
            extra = {"calibration": calibration, "smoothing_alpha": 0.5 if alpha is None else alpha}
        elif scheme == "int4_weight_only":
            extra = {
                "int4_algorithm": int4_algorithm,
                **({"calibration": calibration} if int4_algorithm == "gptq" else {}),
            }
        else:
            extra = {}
        rep = quantize_model(
            model,
            scheme,
            group_size=candidate.get("group_size"),
            device=device,
            include_lm_head=bool(candidate.get("quantize_lm_head")),
            **extra,
        )
        report["quantization"] = {k: v for k, v in rep.items() if k != "layers"}
        report["seconds"]["quantization"] = time.time() - t
    model.eval()
    return report


def token_rows(ids: Iterable[int], seq_len: int, n: Optional[int] = None) -> torch.Tensor:
    """``[rows, seq_len]`` from a token stream (the tail that does not fill a row is dropped)."""
    ids = list(ids)
    rows = len(ids) // seq_len if n is None else min(n, len(ids) // seq_len)
    if rows == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one row of {seq_len}")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
