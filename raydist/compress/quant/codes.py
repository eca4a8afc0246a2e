"""Canonical integer codes of quantized weights (what an artifact stores): int8 per output row, int4 per group of
input channels (asymmetric, PyTorch's tinygemm convention), and the int4 packing. Shared by the quantized layer,
GPTQ and QAT, which is why it is its own module (no import cycle between them).
"""

from __future__ import annotations

from typing import Optional

import torch

INT4_GROUP_SIZES = (32, 64, 128)  # what PyTorch's tinygemm int4 kernels (CPU and CUDA) accept


@torch.no_grad()
def quantize_int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``w ≈ qweight * scale[:, None]``.

    Args:
        w: [N, K] float weight.

    Returns:
        ``qweight`` [N, K] int8 in [-127, 127] and ``scale`` [N] fp32 (``max|w_row| / 127``).
    """
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int, algorithm: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit in PyTorch's tinygemm convention, ``w ≈ (q - 8) * scale + zero``, with the zero
    point on the integer grid: ``zero = (8 - z) * scale`` for an integer ``z`` in [0, 15], so ``w ≈ (q - z) * scale``,
    the convention of GPTQ and of compressed-tensors (which vLLM and transformers load; ``compress.quant.ct_format``).

    Args:
        w: [N, K] float weight; ``K % group_size == 0``.
        group_size: input channels sharing one (scale, zero).
        algorithm: ``"minmax"`` (group range) or ``"hqq"`` (torchao's half-quadratic optimisation of scale and zero;
            its float zero is then moved to the nearest integer zero point and the codes re-rounded).

    Returns:
        ``qweight`` [N, K // 2] uint8 (column 2j in the low nibble, 2j+1 in the high nibble),
        ``scale`` [N, K // group_size] fp32, ``zero`` [N, K // group_size] fp32.
    """
    w = w.detach().float()
    n, k = w.shape
    if algorithm == "hqq":
        _choose_qparams_and_quantize_affine_hqq = _torchao_hqq_solver()
        q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            w, nbits=4, group_size=group_size, axis=1, compute_dtype=torch.float32, device=str(w.device)
        )
        scale = scale.reshape(n, -1).float().contiguous()
        zero = integer_zero(scale, zero.reshape(n, -1).float())
        return pack_int4(int4_codes_on_grid(w, scale, zero)), scale, zero
    if algorithm != "minmax":
        raise ValueError(
            f"unknown int4 algorithm {algorithm!r}; choose from ('minmax', 'hqq') (GPTQ: compress.quant.gptq)"
        )
    scale, zero = int4_minmax_qparams(w, group_size)
    return pack_int4(int4_codes_on_grid(w, scale, zero)), scale, zero


def int4_minmax_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max qparams of ``w`` [N, K]: ``scale``, ``zero`` [N, K // group_size], zero point on the integer grid.

    Each group's range, with 0 in it, over the 16 codes; the zero point ``z = round(-min / scale)``: what
    compressed-tensors' ``calculate_qparams`` computes for asymmetric int4 groups (a unit test compares them).
    """
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)  # [N, G, g]
    lo, hi = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)  # [N, G]
    scale = ((hi - lo) / 15.0).clamp(min=1e-6)
    z = torch.clamp(torch.round(-lo / scale), 0, 15)
    return scale.contiguous(), int4_zero(scale, z)


def int4_zero(scale: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``zero`` (the value of code 8) of the grid whose integer zero point is ``z``: ``(8 - z) * scale``."""
    return ((8 - z) * scale).contiguous()


def int4_zero_points(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The integer zero points ``z`` (int64) of a grid with ``zero = (8 - z) * scale``; the nearest one for a
    float ``zero``."""
    return torch.round(8 - zero / scale).to(torch.int64)


def integer_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """A float ``zero`` moved to the nearest integer zero point in [0, 15]."""
    return int4_zero(scale, int4_zero_points(scale, zero).clamp(0, 15).to(scale.dtype))


# torchao has no public HQQ solver for the tinygemm layout; its private one is used only with the torchao versions it
# was tested with (tests/unit/compress/test_quantization.py runs it); outside them ``hqq`` is refused with a message.
HQQ_TORCHAO_VERSIONS = ("0.12", "0.19")  # [first tested, first untested)


def _torchao_hqq_solver():
    import torchao
    from packaging.version import Version

    v = Version(torchao.__version__.split("+")[0])
    lo, hi = HQQ_TORCHAO_VERSIONS
    if not Version(lo) <= v < Version(hi):
        raise RuntimeError(
            f"int4 algorithm 'hqq' uses a private torchao function tested with torchao >={lo},<{hi}; "
            f"torchao {torchao.__version__} is installed: use int4_algorithm 'minmax' or 'gptq', or that torchao"
        )
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    return _choose_qparams_and_quantize_affine_hqq


def int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (float) of ``w`` on the grid ``(scale, zero)`` (broadcast elementwise): the rounding of
    torchao's ``_quantize_affine_tinygemm``, ``round((w - (zero - 8 * scale)) / scale)`` clamped."""
    return torch.clamp(torch.round((w - (zero - 8 * scale)) / scale), 0, 15)


def int4_dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The value codes ``q`` stand for on the grid ``(scale, zero)`` (broadcast elementwise)."""
    return (q - 8) * scale + zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes in [0, 15] -> [N, K // 2] uint8, column 2j in the low nibble, 2j+1 in the high."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def int4_codes_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round ``w`` [N, K] to a given group grid (``scale`` / ``zero`` [N, K // g]): codes [N, K] in [0, 15].

    ``w ≈ (code - 8) * scale + zero``, the rounding of torchao's ``_quantize_affine_tinygemm``.
    """
    n, k = w.shape
    g = k // scale.shape[1]
    return int4_round(w.detach().float().reshape(n, -1, g), scale[..., None], zero[..., None]).reshape(n, k)


def int4_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to the grid and dequantized (same shape and dtype as ``w``): the fake-quantized weight."""
    n, k = w.shape
    g = k // scale.shape[1]
    q = int4_codes_on_grid(w, scale, zero).reshape(n, -1, g)
    return int4_dequant(q, scale[..., None], zero[..., None]).reshape(n, k).to(w.dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 values in [0, 15] (inverse of the packing above)."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def pick_group_size(in_features: int, requested: int) -> Optional[int]:
    """The largest supported int4 group size <= ``requested`` that divides ``in_features``, else None."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return None
