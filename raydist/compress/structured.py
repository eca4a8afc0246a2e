"""Minitron-style structured pruning of Llama-family causal LMs: measure importance, then cut weights.

Two steps, as in NVIDIA's Minitron recipe (Muralidharan et al., 2024, "Compact Language Models via
Pruning and Knowledge Distillation"):

1. ``collect_importance`` runs forward passes over a few calibration batches with hooks and scores
   every prunable unit by its *activations* (DESIGN.md: on SmolLM2, MLP channels ranked by activation
   magnitude cost far less perplexity than the same cut ranked by weight norm):

   * layers     — block importance ``1 - mean cos(x_in, x_out)`` of each decoder layer (ShortGPT): a
                  layer that barely rotates the residual stream does little.
   * mlp        — mean ``|act_fn(gate_proj(x)) * up_proj(x)|`` per intermediate channel (down_proj input).
   * heads      — mean L2 norm of each query head's attention output (o_proj input, per head_dim slice);
                  ``kv_groups`` sums the heads that share one KV head (GQA), the unit we can remove.
   * hidden     — mean ``|norm(x)|`` per hidden channel over every RMSNorm/LayerNorm output (the input
                  of every attention/MLP block and of lm_head), averaged over the norms.

2. ``drop_layers`` / ``prune_heads`` / ``prune_mlp`` / ``prune_hidden`` really remove rows/columns,
   shrink the modules and update ``model.config``, so ``save_pretrained`` writes a smaller model that
   plain ``AutoModelForCausalLM.from_pretrained`` reloads to the same logits. ``prune_model`` applies
   them in one go from an ``Importance`` and returns a summary for the artifact manifest.

Every pruning function works **in place** on the model (whatever its device and dtype) and also returns
it. Importance is measured once on the dense model and reused after layers are dropped (one-shot, as
Minitron does); measure again on the pruned model if you prune iteratively.

The module layout expected is LlamaForCausalLM's (shared by Mistral, Qwen2/3, SmolLM, ...):
``model.embed_tokens``, ``model.layers[i].self_attn.{q,k,v,o}_proj``, ``model.layers[i].mlp.{gate,up,
down}_proj``, norms as direct children of each layer, ``model.norm``, ``lm_head`` (possibly tied).
No library does structured pruning of HF models with config updates that round-trip (torch's
``nn.utils.prune`` only masks), hence the hand-written slicing here.

One file of ~850 lines on purpose: importance scoring, the four cuts (layers, MLP channels, heads, hidden
channels) and the plan share the Llama-layout accessors and slicing primitives, and ``prune_model`` both scores
and cuts; split, each half would import the other (tried: a cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

IMPORTANCE_KINDS = ("layers", "mlp", "heads", "hidden")
_ATTN_IN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")

IndexLists = Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------------


def _base(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` for *ForCausalLM); raises when the layout is not Llama's."""
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(
            f"{type(model).__name__} does not have the Llama module layout "
            "(model.embed_tokens, model.layers, model.norm); structured pruning needs it"
        )
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            attn is None
            or mlp is None
            or not all(hasattr(attn, n) for n in (*_ATTN_IN, "o_proj"))
            or not all(hasattr(mlp, n) for n in (*_MLP_IN, "down_proj"))
        ):
            raise ValueError(f"layer {i} lacks self_attn.{{q,k,v,o}}_proj or mlp.{{gate,up,down}}_proj")
    return base


def _layer_norms(layer: nn.Module) -> list[nn.Module]:
    """The norms acting on the residual width: direct children named ``*norm*`` (not q_norm/k_norm)."""
    return [m for name, m in layer.named_children() if "norm" in name.lower() and hasattr(m, "weight")]


def _all_hidden_norms(base: nn.Module) -> list[nn.Module]:
    return [n for layer in base.layers for n in _layer_norms(layer)] + [base.norm]


def _head_dim(model: nn.Module) -> int:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None)
    return hd if hd else cfg.hidden_size // cfg.num_attention_heads


def _distinct_parameters(model: nn.Module) -> int:
    """Parameter count with tied weights counted once (same rule as ``models.count_parameters``)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _check_config(model: nn.Module, what: str, **changes: Any) -> None:
    """Fail before any cut when transformers would refuse to load the pruned config.

    The config class runs its own validators (transformers 5's LlamaConfig, for one, requires
    ``hidden_size % num_attention_heads == 0`` even when ``head_dim`` is explicit), so building it from
    the would-be values is the exact test that ``from_pretrained`` will later apply.
    """
    cfg = model.config
    try:
        type(cfg).from_dict({**cfg.to_dict(), **changes})
    except Exception as e:  # strict-dataclass validation errors are not ValueErrors
        raise ValueError(f"{what}: the pruned {type(cfg).__name__} {changes} would not load: {e}") from None


def kept_count(n: int, ratio: float, multiple_of: int = 1) -> int:
    """How many of ``n`` units to keep for ``ratio``: rounded to the nearest ``multiple_of``, in [1, n].

    Kernels like widths that are multiples of 8 or 64; SmolLM2's 576 hidden / 1536 intermediate are
    multiples of 64 but ``0.75 * 576 = 432`` is not a multiple of 64, so it becomes 448. Rounding never
    reaches zero (it keeps at least ``min(multiple_of, n)``) and never exceeds ``n``.

    Raises:
        ValueError: ``ratio`` outside (0, 1] or ``multiple_of < 1``.
    """
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if ratio == 1.0:  # nearest-multiple rounding could otherwise shrink e.g. 990 to 960
        return n
    k = int(round(ratio * n / multiple_of)) * multiple_of
    return min(n, max(k, min(multiple_of, n), 1))


# --------------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Activation-based importance scores (higher = more important), float32 on CPU.

    Attributes:
        layers: [L] block importance, ``1 - mean cos(layer input, layer output)`` over tokens.
        mlp: [L, I] mean ``|act_fn(gate) * up|`` per intermediate channel.
        heads: [L, n_heads] mean L2 norm of each query head's attention output (before o_proj).
        kv_groups: [L, n_kv_heads] ``heads`` summed over the query heads sharing a KV head.
        hidden: [H] mean ``|norm output|`` per hidden channel, averaged over all norms.
        num_tokens: calibration tokens seen (padding excluded).
    """

    layers: Optional[torch.Tensor] = None
    mlp: Optional[torch.Tensor] = None
    heads: Optional[torch.Tensor] = None
    kv_groups: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    num_tokens: int = 0

    def select_layers(self, keep: Sequence[int]) -> "Importance":
        """The scores of the layers in ``keep`` (in that order), e.g. after ``drop_layers``."""
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        pick = lambda t: None if t is None else t[idx].clone()  # noqa: E731
        return replace(
            self, layers=pick(self.layers), mlp=pick(self.mlp), heads=pick(self.heads), kv_groups=pick(self.kv_groups)
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON-serialisable) for manifests and logs."""
        out: dict[str, Any] = {"num_tokens": self.num_tokens}
        for k in ("layers", "mlp", "heads", "kv_groups", "hidden"):
            t = getattr(self, k)
            out[k] = None if t is None else t.tolist()
        return out


class _MaskedMean:
    """Accumulates per-channel sums over the real (non-padding) tokens of [B, T, ...] activations."""

    def __init__(self) -> None:
        self.sum: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        # x: [B, T, *C] -> [N, *C] with N = real tokens; accumulate in fp32 (bf16 sums drift).
        x = x.detach().float()
        x = x[mask] if mask is not None else x.reshape(-1, *x.shape[2:])
        s = x.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).cpu()


def _as_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(f"a calibration batch is a [B, T] tensor or a dict with input_ids, got {type(batch)}")
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids[None]
    return ids.to(device), None if mask is None else torch.as_tensor(mask).to(device)


@torch.no_grad()
def collect_importance(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    what: Sequence[str] = IMPORTANCE_KINDS,
) -> Importance:
    """Score layers, MLP channels, attention heads and hidden channels on calibration data.

    Runs one no-grad forward pass per batch in eval mode (the model's training mode is restored) with
    forward hooks; padding positions (``attention_mask == 0``) are left out of every average.

    Args:
        model: a Llama-layout causal LM on any device/dtype.
        batches: iterable of ``input_ids`` tensors [B, T] (or [T]), or dicts with ``input_ids`` and an
            optional ``attention_mask`` [B, T]. A few hundred to a few thousand tokens are enough.
        what: subset of ``("layers", "mlp", "heads", "hidden")`` to measure.

    Returns:
        ``Importance`` with the requested fields set (``heads`` also sets ``kv_groups``).

    Raises:
        ValueError: unknown kind in ``what``, non-Llama layout, or no calibration tokens.
    """
    what = (what,) if isinstance(what, str) else tuple(what)
    unknown = set(what) - set(IMPORTANCE_KINDS)
    if unknown:
        raise ValueError(f"unknown importance kinds {sorted(unknown)}; choose from {IMPORTANCE_KINDS}")
    base = _base(model)
    layers = list(base.layers)
    n_heads, head_dim = model.config.num_attention_heads, _head_dim(model)
    device = next(model.parameters()).device
    state: dict[str, Optional[torch.Tensor]] = {"mask": None}

    acc_layers = [_MaskedMean() for _ in layers]
    acc_mlp = [_MaskedMean() for _ in layers]
    acc_heads = [_MaskedMean() for _ in layers]
    norms = _all_hidden_norms(base)
    acc_hidden = [_MaskedMean() for _ in norms]
    handles = []
    # Every hook below returns None: a value returned by a hook would replace the module's input/output.

    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    if "layers" in what:
        for layer, acc in zip(layers, acc_layers):

            def hook(mod, args, kwargs, out, acc=acc):
                x_in = args[0] if args else kwargs["hidden_states"]
                cos = nn.functional.cosine_similarity(x_in.float(), first(out).float(), dim=-1)  # [B, T]
                acc.add(cos, state["mask"])

            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    if "mlp" in what:
        for layer, acc in zip(layers, acc_mlp):
            # down_proj's input is exactly act_fn(gate_proj(x)) * up_proj(x): [B, T, I]
            handles.append(
                layer.mlp.down_proj.register_forward_pre_hook(
                    lambda mod, args, acc=acc: acc.add(args[0].abs(), state["mask"])
                )
            )
    if "heads" in what:
        for layer, acc in zip(layers, acc_heads):

            def hook(mod, args, acc=acc):
                x = args[0]  # [B, T, n_heads * head_dim], heads concatenated in order
                acc.add(x.reshape(*x.shape[:-1], n_heads, head_dim).norm(dim=-1), state["mask"])  # [B, T, nH]

            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    if "hidden" in what:
        for norm, acc in zip(norms, acc_hidden):
            handles.append(
                norm.register_forward_hook(lambda mod, args, out, acc=acc: acc.add(first(out).abs(), state["mask"]))
            )

    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            ids, mask = _as_batch(batch, device)
            state["mask"] = None if mask is None else mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += int(ids.numel() if mask is None else mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("collect_importance got no calibration tokens")

    imp = Importance(num_tokens=tokens)
    if "layers" in what:
        imp.layers = 1.0 - torch.stack([a.mean() for a in acc_layers])
    if "mlp" in what:
        imp.mlp = torch.stack([a.mean() for a in acc_mlp])
    if "heads" in what:
        imp.heads = torch.stack([a.mean() for a in acc_heads])  # [L, nH]
        n_kv = model.config.num_key_value_heads
        # Query head h reads KV head h // (nH / n_kv) (repeat_kv repeats each KV head consecutively).
        imp.kv_groups = imp.heads.reshape(len(layers), n_kv, n_heads // n_kv).sum(-1)
    if "hidden" in what:
        imp.hidden = torch.stack([a.mean() for a in acc_hidden]).mean(0)
    return imp


# --------------------------------------------------------------------------------------------------
# Weight surgery
# --------------------------------------------------------------------------------------------------


def _keep_param(p: nn.Parameter, dim: int, idx: torch.Tensor) -> nn.Parameter:
    # A fresh Parameter (not a view) so the old storage is freed and the saved tensor is contiguous.
    return nn.Parameter(p.data.index_select(dim, idx.to(p.device)).contiguous(), requires_grad=p.requires_grad)


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, *, outputs: bool) -> None:
    """Keep output rows (``outputs=True``, bias too) or input columns of ``lin`` listed in ``idx``."""
    if outputs:
        lin.weight = _keep_param(lin.weight, 0, idx)
        if lin.bias is not None:
            lin.bias = _keep_param(lin.bias, 0, idx)
        lin.out_features = len(idx)
    else:
        lin.weight = _keep_param(lin.weight, 1, idx)
        lin.in_features = len(idx)


def _slice_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    norm.weight = _keep_param(norm.weight, 0, idx)
    if getattr(norm, "bias", None) is not None:
        norm.bias = _keep_param(norm.bias, 0, idx)
    if hasattr(norm, "normalized_shape"):  # nn.LayerNorm
        norm.normalized_shape = (len(idx),)


def _rescale_rms_norm(norm: nn.Module, scale: float) -> bool:
    """Multiply an RMSNorm's output by ``scale`` through its weight; False (untouched) for other norms.

    Probes the norm with an all-ones input (RMS 1) to read its gain: ``w`` (Llama) or ``1 + w``
    (Gemma-style offset). Mean-centring norms (LayerNorm, or any with a bias) are left alone: dropping
    channels moves their mean too, and no single scale undoes that.
    """
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        return False
    w = norm.weight
    gain = norm(torch.ones(1, 1, w.numel(), dtype=w.dtype, device=w.device)).reshape(-1)
    if torch.allclose(gain, w, rtol=1e-3, atol=1e-5):
        w.mul_(scale)
    elif torch.allclose(gain, 1 + w, rtol=1e-3, atol=1e-5):
        w.copy_((1 + w) * scale - 1)
    else:
        return False
    return True


def _set_if_present(module: nn.Module, names: Sequence[str], value: int) -> None:
    # Some architectures cache sizes on modules (LlamaMLP.intermediate_size, Qwen2's num_heads, ...).
    for n in names:
        if isinstance(getattr(module, n, None), int):
            setattr(module, n, value)


def _check_index_lists(lists: IndexLists, num_layers: int, n: int, what: str) -> list[torch.Tensor]:
    if len(lists) != num_layers:
        raise ValueError(f"{what}: got {len(lists)} index lists for {num_layers} layers")
    out = []
    for i, ix in enumerate(lists):
        t = torch.as_tensor(list(ix), dtype=torch.long)
        if t.numel() == 0:
            raise ValueError(f"{what}: layer {i} would keep nothing")
        if t.unique().numel() != t.numel() or t.min() < 0 or t.max() >= n:
            raise ValueError(f"{what}: layer {i} indices must be distinct and in [0, {n})")
        out.append(t.sort().values)  # original order: keeps the surviving units where they were
    if len({t.numel() for t in out}) != 1:
        raise ValueError(f"{what}: every layer must keep the same number (one config value serves all layers)")
    return out


def _top_k(scores: Optional[torch.Tensor], k: int, n: int, what: str, field_name: str) -> list[torch.Tensor]:
    if scores is None:
        raise ValueError(
            f"{what} with a count needs importance.{field_name}: run collect_importance(..., what=[...]) first "
            "(activation importance; weight norms destroy the model, see DESIGN.md)"
        )
    if not (1 <= k <= n):
        raise ValueError(f"{what}: cannot keep {k} of {n}; keep between 1 and {n}")
    if scores.shape[-1] != n:
        raise ValueError(f"{what}: importance.{field_name} has {scores.shape[-1]} entries, model has {n}")
    return [row.topk(k).indices.sort().values for row in scores.float()]


def drop_layers(model: nn.Module, layer_indices: Sequence[int]) -> nn.Module:
    """Remove whole decoder layers in place; returns the model.

    Re-numbers ``layer_idx`` on the surviving layers (the KV cache is indexed by it) and updates
    ``config.num_hidden_layers`` and, when present, ``config.layer_types``.

    Raises:
        ValueError: an index out of range or repeated, or every layer would be dropped.
    """
    base = _base(model)
    n = len(base.layers)
    drop = sorted(set(int(i) for i in layer_indices))
    if len(drop) != len(list(layer_indices)) or any(i < 0 or i >= n for i in drop):
        raise ValueError(f"layer indices {list(layer_indices)} must be distinct and in [0, {n})")
    if len(drop) >= n:
        raise ValueError(f"cannot drop all {n} layers")
    if not drop:
        return model
    keep = [i for i in range(n) if i not in drop]
    cfg = model.config
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    if getattr(cfg, "layer_types", None) is not None:
        changes["layer_types"] = [cfg.layer_types[i] for i in keep]
    _check_config(model, "drop_layers", **changes)
    base.layers = nn.ModuleList([base.layers[i] for i in keep])
    for new_idx, layer in enumerate(base.layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    for k, v in changes.items():
        setattr(cfg, k, v)
    return model


_drop_layer_indices = drop_layers  # prune_model's ``drop_layers`` argument shadows the function


def prune_mlp(
    model: nn.Module,
    keep: Union[int, IndexLists],
    *,
    importance: Optional[Importance] = None,
) -> nn.Module:
    """Keep ``keep`` intermediate channels per layer (gate/up rows, down_proj columns), in place.

    Args:
        keep: a count (the top-``keep`` channels of each layer by ``importance.mlp``) or one list of
            channel indices per layer, all of the same length (``config.intermediate_size`` is one value).
        importance: needed when ``keep`` is a count; ``importance.mlp`` is [L, I].

    Returns:
        The model, with ``config.intermediate_size == keep``.

    Raises:
        ValueError: no importance for a count, keep outside [1, I], uneven or invalid index lists.
    """
    base = _base(model)
    n, num_layers = model.config.intermediate_size, len(base.layers)
    if isinstance(keep, int):
        scores = importance.mlp if importance is not None else None
        if scores is not None and scores.shape[0] != num_layers:
            raise ValueError(f"prune_mlp: importance.mlp covers {scores.shape[0]} layers, model has {num_layers}")
        idx = _top_k(scores, keep, n, "prune_mlp", "mlp")
    else:
        idx = _check_index_lists(keep, num_layers, n, "prune_mlp")
    _check_config(model, "prune_mlp", intermediate_size=len(idx[0]))
    with torch.no_grad():
        for layer, ix in zip(base.layers, idx):
            mlp = layer.mlp
            for name in _MLP_IN:
                _slice_linear(getattr(mlp, name), ix, outputs=True)  # [I, H] -> [k, H]
            _slice_linear(mlp.down_proj, ix, outputs=False)  # [H, I] -> [H, k]
            _set_if_present(mlp, ("intermediate_size",), len(ix))
    model.config.intermediate_size = len(idx[0])
    return model


def prune_heads(
    model: nn.Module,
    keep_kv_groups: Union[int, IndexLists],
    *,
    importance: Optional[Importance] = None,
) -> nn.Module:
    """Remove whole GQA groups (one KV head and the query heads reading it) per layer, in place.

    Keeps the query/KV ratio, so ``num_key_value_groups`` is unchanged. q/k/v lose the rows of the
    removed heads, o_proj the matching columns. ``config.head_dim`` is written explicitly because
    ``hidden_size / num_attention_heads`` no longer gives it.

    Args:
        keep_kv_groups: a count (top groups of each layer by ``importance.kv_groups``) or one list of KV
            head indices per layer, all of the same length.
        importance: needed when ``keep_kv_groups`` is a count; ``importance.kv_groups`` is [L, n_kv].

    Returns:
        The model, with ``config.num_key_value_heads == keep`` and ``num_attention_heads`` scaled alike.

    Raises:
        ValueError: no importance for a count, keep outside [1, n_kv], uneven or invalid index lists.
    """
    base = _base(model)
    cfg = model.config
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(model)
    rep, num_layers = n_heads // n_kv, len(base.layers)
    if isinstance(keep_kv_groups, int):
        scores = importance.kv_groups if importance is not None else None
        if scores is not None and scores.shape[0] != num_layers:
            raise ValueError(f"prune_heads: importance covers {scores.shape[0]} layers, model has {num_layers}")
        groups = _top_k(scores, keep_kv_groups, n_kv, "prune_heads", "kv_groups")
    else:
        groups = _check_index_lists(keep_kv_groups, num_layers, n_kv, "prune_heads")
    k = len(groups[0])
    _check_config(model, "prune_heads", num_attention_heads=k * rep, num_key_value_heads=k, head_dim=hd)
    ar = torch.arange(hd)
    with torch.no_grad():
        for layer, g in zip(base.layers, groups):
            attn = layer.self_attn
            # KV head g owns rows [g*hd, (g+1)*hd) of k/v; its query heads g*rep .. g*rep+rep-1 own
            # rows [h*hd, (h+1)*hd) of q and the same columns of o_proj.
            kv_rows = (g[:, None] * hd + ar).reshape(-1)
            q_heads = (g[:, None] * rep + torch.arange(rep)).reshape(-1)
            q_rows = (q_heads[:, None] * hd + ar).reshape(-1)
            _slice_linear(attn.q_proj, q_rows, outputs=True)
            _slice_linear(attn.k_proj, kv_rows, outputs=True)
            _slice_linear(attn.v_proj, kv_rows, outputs=True)
            _slice_linear(attn.o_proj, q_rows, outputs=False)
            _set_if_present(attn, ("num_heads", "num_attention_heads"), len(q_heads))
            _set_if_present(attn, ("num_key_value_heads", "num_kv_heads"), len(g))
    cfg.head_dim = hd
    cfg.num_key_value_heads = k
    cfg.num_attention_heads = k * rep
    return model


def prune_hidden(
    model: nn.Module,
    keep: Union[int, Sequence[int]],
    *,
    importance: Optional[Importance] = None,
    rescale_norms: bool = True,
) -> nn.Module:
    """Keep ``keep`` channels of the residual stream (embedding width) everywhere, in place.

    Slices embed_tokens columns, every norm weight, the input columns of q/k/v/gate/up, the output rows
    of o_proj/down_proj, model.norm and lm_head columns; tied embeddings stay tied. RMSNorm then
    averages over ``k`` kept channels instead of ``H``: if the removed channels carried no energy its
    RMS grows by ``sqrt(H / k)`` and every normalised activation shrinks by that factor. With
    ``rescale_norms`` the RMSNorm gains are multiplied by ``sqrt(H / k)`` to undo it, so removing silent
    channels leaves the logits unchanged (up to the norm's epsilon); on SmolLM2-135M it roughly halved the
    perplexity increase of a width cut (a calibrated per-norm factor did no better). What the removed channels
    did carry is lost; distillation recovers it.

    Args:
        keep: a count (top channels by ``importance.hidden``) or the channel indices to keep.
        importance: needed when ``keep`` is a count; ``importance.hidden`` is [H].
        rescale_norms: compensate RMSNorm gains for the narrower statistic (see above).

    Returns:
        The model, with ``config.hidden_size`` updated.

    Raises:
        ValueError: no importance for a count, keep outside [1, H], invalid indices.
    """
    base = _base(model)
    cfg = model.config
    n = cfg.hidden_size
    if isinstance(keep, int):
        scores = importance.hidden if importance is not None else None
        idx = _top_k(None if scores is None else scores[None], keep, n, "prune_hidden", "hidden")[0]
    else:
        idx = _check_index_lists([keep], 1, n, "prune_hidden")[0]
    _check_config(model, "prune_hidden", hidden_size=len(idx), head_dim=_head_dim(model))
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb_out is not None and emb_out.weight is emb_in.weight
    with torch.no_grad():
        emb_in.weight = _keep_param(emb_in.weight, 1, idx)  # [V, H] -> [V, k]
        emb_in.embedding_dim = len(idx)
        for layer in base.layers:
            for norm in _layer_norms(layer):
                _slice_norm(norm, idx)
            for name in _ATTN_IN:
                _slice_linear(getattr(layer.self_attn, name), idx, outputs=False)
            _slice_linear(layer.self_attn.o_proj, idx, outputs=True)
            for name in _MLP_IN:
                _slice_linear(getattr(layer.mlp, name), idx, outputs=False)
            _slice_linear(layer.mlp.down_proj, idx, outputs=True)
            for m in (layer, layer.self_attn, layer.mlp):
                _set_if_present(m, ("hidden_size",), len(idx))
        _slice_norm(base.norm, idx)
        if rescale_norms and len(idx) < n:
            for norm in _all_hidden_norms(base):
                _rescale_rms_norm(norm, math.sqrt(n / len(idx)))
        if emb_out is not None:
            if tied:
                emb_out.weight = emb_in.weight  # same Parameter: stays tied
                emb_out.in_features = len(idx)
            else:
                _slice_linear(emb_out, idx, outputs=False)
    # Width was hidden_size // num_heads before; it must not follow hidden_size from now on.
    cfg.head_dim = _head_dim(model)
    cfg.hidden_size = len(idx)
    return model


# --------------------------------------------------------------------------------------------------
# One entry point + planning
# --------------------------------------------------------------------------------------------------


@dataclass
class PrunePlan:
    """Resolved sizes of a pruning request (what ``prune_model`` will do), before any weight moves."""

    drop: list[int] = field(default_factory=list)
    num_layers: int = 0
    intermediate_size: int = 0
    num_kv_heads: int = 0
    num_heads: int = 0
    hidden_size: int = 0


def plan_pruning(
    model: nn.Module,
    importance: Optional[Importance] = None,
    *,
    drop_layers: Union[int, Sequence[int]] = 0,
    mlp_keep_ratio: float = 1.0,
    kv_groups_keep: Optional[int] = None,
    hidden_keep_ratio: float = 1.0,
    multiple_of: int = 1,
) -> PrunePlan:
    """Validate a request and resolve it to concrete sizes (see ``prune_model`` for the arguments).

    A count for ``drop_layers`` picks the layers with the lowest ``importance.layers``.

    Raises:
        ValueError: impossible requests (ratios outside (0, 1], zero or too many KV groups, dropping
            every layer, missing importance for a count of layers).
    """
    cfg = model.config
    n_layers = len(_base(model).layers)
    if isinstance(drop_layers, int):
        if not (0 <= drop_layers < n_layers):
            raise ValueError(f"drop_layers={drop_layers}: can drop between 0 and {n_layers - 1} of {n_layers} layers")
        if drop_layers and (importance is None or importance.layers is None):
            raise ValueError("drop_layers as a count needs importance.layers (collect_importance what=['layers'])")
        if drop_layers and importance.layers.numel() != n_layers:
            raise ValueError(f"importance.layers covers {importance.layers.numel()} layers, model has {n_layers}")
        drop = sorted(importance.layers.topk(drop_layers, largest=False).indices.tolist()) if drop_layers else []
    else:
        drop = sorted(int(i) for i in drop_layers)
        if len(set(drop)) != len(drop) or any(i < 0 or i >= n_layers for i in drop):
            raise ValueError(f"drop_layers {list(drop_layers)} must be distinct indices in [0, {n_layers})")
        if len(drop) >= n_layers:
            raise ValueError(f"cannot drop all {n_layers} layers")
    n_kv = cfg.num_key_value_heads
    if kv_groups_keep is not None and not (1 <= kv_groups_keep <= n_kv):
        raise ValueError(f"kv_groups_keep={kv_groups_keep}: keep between 1 and {n_kv} KV groups")
    k_kv = n_kv if kv_groups_keep is None else kv_groups_keep
    n_heads = k_kv * (cfg.num_attention_heads // n_kv)
    intermediate = kept_count(cfg.intermediate_size, mlp_keep_ratio, multiple_of)
    # transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0, so the hidden width
    # moves in steps of lcm(multiple_of, heads): SmolLM2 (9 heads) with multiple_of=8 steps by 72.
    step = math.lcm(multiple_of, n_heads)  # multiple_of >= 1: kept_count above checked it
    hidden = kept_count(cfg.hidden_size, hidden_keep_ratio, step)
    if hidden_keep_ratio < 1.0 and step >= cfg.hidden_size:
        raise ValueError(
            f"hidden_keep_ratio={hidden_keep_ratio}: hidden_size must stay a multiple of lcm(multiple_of="
            f"{multiple_of}, num_attention_heads={n_heads}) = {step}, so {cfg.hidden_size} cannot shrink; "
            "use a smaller multiple_of or keep fewer KV groups"
        )
    plan = PrunePlan(
        drop=drop,
        num_layers=n_layers - len(drop),
        intermediate_size=intermediate,
        num_kv_heads=k_kv,
        num_heads=n_heads,
        hidden_size=hidden,
    )
    changes: dict[str, Any] = {
        "num_hidden_layers": plan.num_layers,
        "intermediate_size": intermediate,
        "num_key_value_heads": k_kv,
        "num_attention_heads": n_heads,
        "hidden_size": hidden,
        "head_dim": _head_dim(model),
    }
    if getattr(cfg, "layer_types", None) is not None:
        changes["layer_types"] = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
    _check_config(model, "prune_model", **changes)
    return plan


def estimate_parameters(model: nn.Module, plan: PrunePlan) -> int:
    """Exact parameter count (tied weights once) the model would have after ``plan``; moves no weights.

    Lets a sweep pick ratios for a target size without pruning copies of the model. Counts the Llama
    layout's tensors from their current shapes (biases and extra norms included); parameters outside
    it (none in Llama) are carried over unchanged.
    """
    base = _base(model)
    cfg = model.config
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, _head_dim(model)
    h, i, nq, nkv = plan.hidden_size, plan.intermediate_size, plan.num_heads * hd, plan.num_kv_heads * hd
    layer0 = base.layers[0]
    attn, mlp = layer0.self_attn, layer0.mlp

    def lin(m: nn.Linear, n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if m.bias is not None else 0)

    per_layer = (
        lin(attn.q_proj, h, nq)
        + lin(attn.k_proj, h, nkv)
        + lin(attn.v_proj, h, nkv)
        + lin(attn.o_proj, nq, h)
        + lin(mlp.gate_proj, h, i)
        + lin(mlp.up_proj, h, i)
        + lin(mlp.down_proj, i, h)
        + sum(p.numel() // H * h for n in _layer_norms(layer0) for p in n.parameters(recurse=False))
    )
    layer_now = sum(p.numel() for p in layer0.parameters())
    counted_now = (
        lin(attn.q_proj, H, attn.q_proj.out_features)
        + lin(attn.k_proj, H, attn.k_proj.out_features)
        + lin(attn.v_proj, H, attn.v_proj.out_features)
        + lin(attn.o_proj, attn.o_proj.in_features, H)
        + lin(mlp.gate_proj, H, I)
        + lin(mlp.up_proj, H, I)
        + lin(mlp.down_proj, I, H)
        + sum(p.numel() for n in _layer_norms(layer0) for p in n.parameters(recurse=False))
    )
    per_layer += layer_now - counted_now  # e.g. q_norm/k_norm of Qwen3: per head_dim, unchanged
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    V = emb_in.weight.shape[0]
    total = plan.num_layers * per_layer + V * h + sum(p.numel() // H * h for p in base.norm.parameters())
    if emb_out is not None and emb_out.weight is not emb_in.weight:
        total += emb_out.weight.shape[0] * h + (emb_out.bias.numel() if emb_out.bias is not None else 0)
    layout = {
        id(p)
        for m in (*base.layers, emb_in, base.norm, *([emb_out] if emb_out is not None else []))
        for p in m.parameters()
    }
    total += sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in layout)
    return total


def prune_model(
    model: nn.Module,
    importance: Importance,
    *,
    drop_layers: Union[int, Sequence[int]] = 0,
    mlp_keep_ratio: float = 1.0,
    kv_groups_keep: Optional[int] = None,
    hidden_keep_ratio: float = 1.0,
    multiple_of: int = 1,
    rescale_norms: bool = True,
) -> dict[str, Any]:
    """Prune depth and width in place from one ``Importance`` measured on the dense model.

    Order: layers first (the width scores of the survivors are then selected by layer), then attention
    groups, MLP channels and hidden channels, each ranked by its own activation importance.

    Args:
        model: Llama-layout causal LM; modified in place.
        importance: from ``collect_importance`` on this (dense) model; needs the fields the request uses.
        drop_layers: how many layers to drop (lowest block importance) or which layer indices.
        mlp_keep_ratio: fraction of intermediate channels kept, in (0, 1].
        kv_groups_keep: KV groups (GQA KV heads with their query heads) kept per layer; None keeps all.
        hidden_keep_ratio: fraction of hidden (embedding) channels kept, in (0, 1].
        multiple_of: kept MLP/hidden widths are rounded to the nearest multiple of this (never to zero);
            the hidden width also stays a multiple of the number of attention heads, which
            transformers' LlamaConfig requires.
        rescale_norms: see ``prune_hidden``.

    Returns:
        Summary: ``params_before``, ``params_after``, ``param_fraction``, ``dropped_layers`` (original
        indices), ``removed_kv_groups`` (per surviving layer, original KV head indices), and
        ``before``/``after`` dicts of the config sizes.

    Raises:
        ValueError: impossible requests (see ``plan_pruning``) or missing importance fields.
    """
    plan = plan_pruning(
        model,
        importance,
        drop_layers=drop_layers,
        mlp_keep_ratio=mlp_keep_ratio,
        kv_groups_keep=kv_groups_keep,
        hidden_keep_ratio=hidden_keep_ratio,
        multiple_of=multiple_of,
    )
    cfg = model.config
    # Check every importance field the request needs before the first cut, so an error never leaves a
    # half-pruned model behind.
    needs = {
        "kv_groups": plan.num_kv_heads < cfg.num_key_value_heads,
        "mlp": plan.intermediate_size < cfg.intermediate_size,
        "hidden": plan.hidden_size < cfg.hidden_size,
    }
    missing = [k for k, needed in needs.items() if needed and getattr(importance, k) is None]
    if missing:
        raise ValueError(f"the request needs importance.{missing} (collect_importance with what=...)")

    def sizes() -> dict[str, int]:
        return {
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": _head_dim(model),
        }

    before, params_before = sizes(), _distinct_parameters(model)
    n_layers = len(_base(model).layers)
    imp = importance
    if plan.drop:
        _drop_layer_indices(model, plan.drop)
        imp = importance.select_layers([i for i in range(n_layers) if i not in plan.drop])
    removed_groups: list[list[int]] = []
    if plan.num_kv_heads < cfg.num_key_value_heads:
        n_kv = cfg.num_key_value_heads
        prune_heads(model, plan.num_kv_heads, importance=imp)
        kept = [set(row.topk(plan.num_kv_heads).indices.tolist()) for row in imp.kv_groups.float()]
        removed_groups = [sorted(set(range(n_kv)) - k) for k in kept]
    if plan.intermediate_size < cfg.intermediate_size:
        prune_mlp(model, plan.intermediate_size, importance=imp)
    if plan.hidden_size < cfg.hidden_size:
        prune_hidden(model, plan.hidden_size, importance=imp, rescale_norms=rescale_norms)
    params_after = _distinct_parameters(model)
    return {
        "params_before": params_before,
        "params_after": params_after,
        "param_fraction": params_after / params_before,
        "dropped_layers": plan.drop,
        "removed_kv_groups": removed_groups,
        "before": before,
        "after": sizes(),
    }


__all__ = [
    "IMPORTANCE_KINDS",
    "Importance",
    "PrunePlan",
    "collect_importance",
    "drop_layers",
    "estimate_parameters",
    "kept_count",
    "plan_pruning",
    "prune_heads",
    "prune_hidden",
    "prune_mlp",
    "prune_model",
]
