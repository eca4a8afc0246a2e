"""Quantization-aware training (QAT) for int4 weight-only quantization, on a fixed grid per layer.

Recipe (``apply_candidate`` with ``recovery: qat``):

1. ``int4_grids``: quantize a copy of the model as usual (min/max, HQQ or GPTQ). Each layer's per-group
   ``(scale, zero)`` becomes its *grid*, and the float model's weights start from the dequantized values
   (for GPTQ these carry its error compensation).
2. ``fake_quantized``: while training, every block Linear computes with its weight rounded to the grid
   (``codes.int4_on_grid``); the gradient passes straight through the rounding (STE, Bengio et
   al. 2013) to the float "latent" weight, so training learns which way each weight should round.
3. ``quantize.quantize_model(..., int4_grids=grids)`` rounds the trained latent weights to the same
   grids: the quantized model computes exactly what the last training step's forward did.

The grid is frozen rather than re-fit to the moving weights (as torchao's QAT does for its own layouts)
so the trained forward and the stored int4 model are the same function, in this package's storage
format, whatever algorithm chose the grid. torch's ``nn.utils.parametrize`` does the weight swap.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from raydist.compress.quant.codes import int4_on_grid
from raydist.compress.quant.quantize import quantize_model, quantized_layers

Grids = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _OnGrid(nn.Module):
    """Parametrization: the weight as the forward sees it is the latent weight rounded to a fixed grid."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = int4_on_grid(w, self.scale, self.zero)
        return w + (q - w).detach()  # value q, gradient of the identity (straight-through)


@torch.no_grad()
def int4_grids(
    model: nn.Module,
    *,
    group_size: Optional[int] = None,
    int4_algorithm: str = "minmax",
    calibration: Optional[torch.Tensor] = None,
    gptq: Optional[dict[str, Any]] = None,
) -> tuple[Grids, dict[str, Any]]:
    """Choose each block Linear's int4 grid by quantizing a copy of ``model``; start ``model`` on the grid.

    Args:
        model: float Llama-layout LM; its quantized layers' weights are set to their dequantized values.
        group_size, int4_algorithm, calibration, gptq: as ``quantize.quantize_model`` (int4).

    Returns:
        ``(grids, report)``: {layer name: (scale, zero)} and the report of that quantization.
    """
    import copy

    probe = copy.deepcopy(model)
    report = quantize_model(
        probe,
        "int4_weight_only",
        group_size=group_size,
        int4_algorithm=int4_algorithm,
        calibration=calibration,
        gptq=gptq,
        device="cpu",
    )
    grids: Grids = {}
    for name, q in quantized_layers(probe).items():
        lin = model.get_submodule(name)
        lin.weight.copy_(q.dequantized_weight().to(lin.weight.device, lin.weight.dtype))
        grids[name] = (q.scale.clone(), q.zero.clone())
    return grids, {k: v for k, v in report.items() if k != "layers"}


@contextmanager
def fake_quantized(model: nn.Module, grids: Grids) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the listed Linears compute with grid-rounded weights (straight-through gradient).

    Yields {layer name: latent weight parameter} (what the optimizer updates, and what sparsity masks
    apply to). On exit the parametrizations are removed and the latent (trained) weights stay.
    """
    latent: dict[str, torch.Tensor] = {}
    added: list[nn.Module] = []
    try:
        for name, (scale, zero) in grids.items():
            lin = model.get_submodule(name)
            dev = lin.weight.device
            parametrize.register_parametrization(lin, "weight", _OnGrid(scale.to(dev), zero.to(dev)))
            added.append(lin)
            latent[name] = lin.parametrizations.weight.original
        yield latent
    finally:
        for lin in added:
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)


__all__ = ["fake_quantized", "int4_grids"]
