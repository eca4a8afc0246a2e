"""GPTQ (Frantar et al., 2022): int4 group-wise weights with second-order error compensation.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the columns of a weight one at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian of the layer's reconstruction loss ``H = 2 X^T X / N`` (X = the layer's calibration inputs),
so the layer's *output* on the calibration text is preserved rather than each weight. It is the same
Optimal-Brain-Surgeon sweep as SparseGPT (``raydist.compress.unstructured``), with "round to the grid"
in place of "set to zero", and it reuses that module's calibration machinery: block-by-block inputs
through the already-quantized earlier blocks, one Hessian per group of linears reading the same input,
the damped upper Cholesky factor of ``H^-1``, and the single-thread CPU sweep.

The result is in the int4 format of ``raydist.compress.quant.codes`` (PyTorch's tinygemm
convention, ``w ≈ (q - 8) * scale + zero`` per row and group of ``group_size`` input channels), so a
GPTQ model is saved, reloaded and served like any other int4 model.

``actorder`` processes columns in decreasing ``diag(H)`` order (the reference's ``--act-order``) with
*static* groups: each group's scale and zero are fixed from the original weights before the sweep
(the reference's ``--static-groups``, llm-compressor's ``actorder="static"``), so groups stay
contiguous in the stored layout and no per-column group index is needed.

Pure torch; used through ``quantize.quantize_model(..., int4_algorithm="gptq", calibration=...)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from raydist.compress.calibration import Hessian, one_cpu_thread, run_block_sequential, upper_cholesky_of_inverse
from raydist.compress.quant.codes import int4_dequant, int4_minmax_qparams, int4_round, pack_int4


def _gptq_weight(
    W: torch.Tensor, H: torch.Tensor, group_size: int, *, blocksize: int, percdamp: float, actorder: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one weight (stacked rows of linears sharing ``H`` are fine: rows never interact).

    Args:
        W: [out, in] float32 (modified).
        H: [in, in] float32 ``2 X^T X / N`` (modified).
        group_size: divides ``in``.

    Returns:
        ``codes`` [out, in] uint8 in [0, 15], ``scale`` / ``zero`` [out, in // group_size] float32 and the
        dequantized weight [out, in] (what the quantized layer computes with).
    """

    out, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = torch.zeros(out, cols // group_size, dtype=torch.float32, device=W.device)
    zero = torch.zeros_like(scale)
    if actorder:  # static groups: the qparams come from the weights before any update
        scale, zero = int4_minmax_qparams(W, group_size)
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = None
    Hinv = upper_cholesky_of_inverse(H, percdamp, name)
    codes = torch.zeros(out, cols, dtype=torch.float32, device=W.device)
    group_of = (perm if perm is not None else torch.arange(cols, device=W.device)) // group_size
    group_of = group_of.tolist()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        ErrT = torch.zeros(count, out, dtype=W.dtype, device=W.device)  # row i = column i's scaled error
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            g = group_of[col]
            if perm is None and col % group_size == 0:
                # dynamic groups: this group's qparams from its current (error-updated) weights; the part
                # of the group inside this block is in W1, the rest (if the block ends first) in W.
                end = col + group_size
                inside = W1[:, i : min(end, i2) - i1]
                rest = W[:, i2:end] if end > i2 else W1[:, :0]
                part = torch.cat([inside, rest], dim=1)
                scale[:, g : g + 1], zero[:, g : g + 1] = int4_minmax_qparams(part, part.shape[1])
            w = W1[:, i]
            q = int4_round(w, scale[:, g], zero[:, g])
            codes[:, col] = q
            deq = int4_dequant(q, scale[:, g], zero[:, g])
            err = torch.div(w - deq, Hinv1[i, i], out=ErrT[i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            W1[:, i] = deq
        W[:, i1:i2] = W1
        W[:, i2:].sub_(ErrT.T @ Hinv[i1:i2, i2:])
    if perm is not None:
        inv = torch.argsort(perm)
        codes, W = codes[:, inv], W[:, inv]
    return codes.to(torch.uint8), scale, zero, W


@torch.no_grad()
def gptq_quantize_weights(
    model: nn.Module,
    calibration,
    group_sizes: dict[str, int],
    *,
    blocksize: int = 128,
    percdamp: float = 0.1,
    actorder: bool = True,
    true_sequential: bool = True,
) -> dict[str, Any]:
    """Run GPTQ over the decoder blocks; each listed Linear's weight becomes its dequantized int4 value.

    Args:
        model: Llama-layout causal LM (modified in place: quantized weights, still float ``nn.Linear``).
        calibration: token ids as ``sparsity.wanda_prune`` takes them.
        group_sizes: {qualified linear name: group size}; linears not listed are left alone.
        blocksize: columns per lazy-update block (128, as the reference).
        percdamp: Hessian dampening as a fraction of its mean diagonal. The reference uses 0.01 with
            128 x 2048 tokens; with 16 x 128 more regularises the noisy Hessian (0.1 measured better than
            0.01 on SmolLM2-135M g64, as did act-order; BENCHMARKS.md, Compression, has the default's figure).
        actorder: columns in decreasing ``diag(H)`` order with static groups (see the module doc).
        true_sequential: o_proj's Hessian measured after q/k/v are quantized, and so on.

    Returns:
        ``{"codes": {name: (packed uint8 [N, K/2], scale [N, G], zero [N, G])}, "calibration_tokens",
        "seconds"}``: the canonical int4 data of every listed linear (``QuantizedLinear``'s buffers).
    """

    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    started = time.perf_counter()
    result: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def quantize_group(names: list[str], group: list[nn.Linear], stat: Hessian) -> None:
        todo = [(n, lin) for n, lin in zip(names, group) if n in group_sizes]
        sizes = {group_sizes[n] for n, _ in todo}
        if not todo:
            return
        H = stat.xtx.mul_(2.0 / max(stat.tokens, 1))
        for g in sorted(sizes):  # linears sharing H and group size are swept together
            part = [(n, lin) for n, lin in todo if group_sizes[n] == g]
            W = torch.cat([lin.weight.detach().float() for _, lin in part])
            with one_cpu_thread(W.device):
                codes, scale, zero, deq = _gptq_weight(
                    W,
                    H.clone(),
                    g,
                    blocksize=blocksize,
                    percdamp=percdamp,
                    actorder=actorder,
                    name="/".join(n for n, _ in part),
                )
            rows = [lin.out_features for _, lin in part]
            for (n, lin), c, s, z, d in zip(
                part, codes.split(rows), scale.split(rows), zero.split(rows), deq.split(rows)
            ):
                lin.weight.copy_(d.to(lin.weight.dtype))
                result[n] = (pack_int4(c).cpu(), s.contiguous().cpu(), z.contiguous().cpu())

    tokens = run_block_sequential(model, calibration, Hessian, quantize_group, bool(true_sequential))
    missing = sorted(set(group_sizes) - set(result))
    if missing:
        raise ValueError(f"GPTQ: {missing[0]} is not a decoder-block Linear")
    return {
        "codes": result,
        "calibration_tokens": tokens,
        "seconds": time.perf_counter() - started,
        "blocksize": blocksize,
        "percdamp": percdamp,
        "actorder": actorder,
        "true_sequential": true_sequential,
    }


__all__ = ["gptq_quantize_weights"]
