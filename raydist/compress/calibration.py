"""Calibration capture shared by SparseGPT, Wanda and GPTQ: calibration batches, the inputs of the first
decoder block, the block-by-block sequential pass (each block sees the already-compressed blocks' outputs), and
the Hessian algebra (``X^T X``, dampened upper Cholesky of its inverse).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from raydist.core.layout import decoder_layers, layer_linears

# Rows of a [n, seq] calibration tensor run through a block at once: bounds activation memory
# (rows * seq * intermediate_size floats) without a Python loop per sequence.
_CALIB_ROWS = 8

Calibration = Union[torch.Tensor, Mapping[str, Any], Iterable[Union[torch.Tensor, Mapping[str, Any]]]]


def calibration_batches(
    model: nn.Module, calibration: Calibration, device: torch.device
) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Normalise calibration input to ``[(input_ids [B, T], attention_mask [B, T] or None), ...]``."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration if calibration.ndim != 1 else calibration[None]
        items: list[Any] = list(ids.split(_CALIB_ROWS)) if ids.ndim == 2 else [ids]
    elif isinstance(calibration, Mapping):
        items = [calibration]
    else:
        try:
            items = list(calibration)
        except TypeError:
            raise ValueError(
                f"calibration must be a LongTensor [n, seq] or an iterable of dicts with input_ids, "
                f"got {type(calibration).__name__}"
            ) from None
    vocab = model.get_input_embeddings().num_embeddings
    batches = []
    for j, item in enumerate(items):
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"calibration batch {j} has no 'input_ids' (keys: {sorted(item)})")
            ids, mask = torch.as_tensor(item["input_ids"]), item.get("attention_mask")
        elif isinstance(item, torch.Tensor):
            ids, mask = item, None
        else:
            raise ValueError(f"calibration batch {j} is a {type(item).__name__}; expected a tensor or a dict")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(
                f"calibration batch {j}: input_ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"calibration batch {j}: token ids must be in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise ValueError(
                    f"calibration batch {j}: attention_mask {tuple(mask.shape)} does not match "
                    f"input_ids {tuple(ids.shape)}"
                )
            mask = mask.to(device)
        if ids.numel():
            batches.append((ids.to(device), mask))
    tokens = sum(ids.numel() if mask is None else int(mask.sum()) for ids, mask in batches)
    if tokens == 0:
        raise ValueError("calibration holds no (unmasked) tokens")
    return batches


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded: the rest of the forward is not needed."""


@dataclass
class BlockInput:
    hidden: torch.Tensor  # [B, T, hidden] hidden states entering the current block
    args: tuple  # any further positional args the model passed to its blocks
    kwargs: dict  # attention mask (4-D), position embeddings, position ids, ...
    tokens: Optional[torch.Tensor]  # [B, T] bool, real (non-padding) tokens; None = all real


def capture_block_inputs(model: nn.Module, batches) -> list[BlockInput]:
    """Run the embedding part of the model and record what decoder block 0 receives, per batch.

    Whatever the model passes to its blocks (the causal mask it built, rotary embeddings, ...) is kept
    as is and replayed, so this does not depend on a transformers version's block signature.
    """
    layers = decoder_layers(model)
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden, tuple(args[1:]), kwargs, None))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in batches:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            captured[-1].tokens = None if mask is None else mask.bool()
    finally:
        handle.remove()
    return captured


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def real_tokens(x: torch.Tensor, tokens: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, T, C] activations -> [N, C] float32 rows of the real tokens."""
    x = x[tokens] if tokens is not None else x.reshape(-1, x.shape[-1])
    return x.float()


# Linears of one block that read the same input tensor in the Llama layout (q/k/v read the attention
# norm's output, gate/up the MLP norm's output), in execution order: one statistic (input norms or
# Hessian) serves a whole group, and SparseGPT runs a group's stacked rows through one column sweep.
_INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@torch.no_grad()
def run_block_sequential(
    model: nn.Module,
    calibration: Calibration,
    new_stat: Callable[[nn.Linear], Any],
    prune_group: Callable[[list[str], list[nn.Linear], Any], None],
    true_sequential: bool,
) -> int:
    """Block by block: collect statistics on each block's inputs, prune its linears, then recompute the
    block's outputs with the pruned weights as the next block's inputs.

    Args:
        new_stat: makes an empty statistic for a group from its first linear; ``stat.add(x [N, in])``.
        prune_group: prunes one ``_INPUT_GROUPS`` group given (qualified names, linears, statistic).
        true_sequential: also go group by group inside a block (q/k/v, then o_proj measured with the
            pruned q/k/v, then gate/up, then down_proj), as GPTQ's ``--true-sequential``; otherwise
            every group of a block is measured in one pass over the block's (dense) computation, as the
            Wanda and SparseGPT reference code does.

    Returns:
        the number of (unmasked) calibration tokens.
    """
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    device = next(model.parameters()).device
    batches = calibration_batches(model, calibration, device)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, batches)
        tokens: list[Optional[torch.Tensor]] = [None]  # real-token mask of the batch being run

        for i, layer in enumerate(layers):
            linears = layer_linears(layer, i)
            groups = [[linears[short] for short in group] for group in _INPUT_GROUPS]
            for pass_groups in ([g] for g in groups) if true_sequential else [groups]:
                stats = [new_stat(group[0]) for group in pass_groups]
                last = pass_groups[-1][0]

                def hook(mod, args, st):
                    st.add(real_tokens(args[0], tokens[0]))
                    if mod is last:  # the rest of the block is not needed for this pass
                        raise _StopForward

                handles = [
                    group[0].register_forward_pre_hook(lambda mod, args, st=st: hook(mod, args, st))
                    for group, st in zip(pass_groups, stats)
                ]
                try:
                    for inp in inputs:
                        tokens[0] = inp.tokens
                        try:
                            layer(inp.hidden, *inp.args, **inp.kwargs)
                        except _StopForward:
                            pass
                finally:
                    for h in handles:
                        h.remove()
                for group, st in zip(pass_groups, stats):
                    prune_group([names[id(lin)] for lin in group], group, st)
            if i + 1 < len(layers):  # the last block's outputs feed nothing we prune
                for inp in inputs:
                    inp.hidden = first_output(layer(inp.hidden, *inp.args, **inp.kwargs))
    finally:
        model.train(was_training)
    return sum(ids.numel() if mask is None else int(mask.sum()) for ids, mask in batches)


# --------------------------------------------------------------------------------------------------
# Wanda
# --------------------------------------------------------------------------------------------------


class Hessian:
    """``X^T X`` over calibration tokens, float32 [in, in]."""

    def __init__(self, lin: nn.Linear) -> None:
        self.xtx = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:  # x: [N, in] float32
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]


def upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """``cholesky(inverse(H + damp * I), upper=True)`` with ``damp = percdamp * mean(diag H)``.

    If H is still not positive definite (e.g. a huge outlier feature with few calibration tokens), the
    dampening grows tenfold up to five times before giving up, instead of returning NaNs.
    """
    mean_diag = float(torch.diagonal(H).mean())
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
        damp = max(damp * 10, 1e-6 * mean_diag, 1e-8)
    raise RuntimeError(
        f"SparseGPT: the Hessian of {name} is not positive definite even with damping {damp:g}; "
        "use more calibration tokens or a larger percdamp"
    )


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch single-threaded on CPU for a while (restored after; the setting is process-wide).

    SparseGPT's column sweep is ~6 tiny ops per column (out x <=128 elements). Splitting such ops over
    threads costs more in synchronisation than it gains, and on a shared, oversubscribed box it is
    ruinous: a 1536x576 matrix took 22-39 s with 2 threads and 0.8-1 s with 1 on a 2-core machine.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
