"""The quantized layer: schemes, the kernels each device has for them, and ``QuantizedLinear``.

Schemes (``SCHEMES``):

* ``int8_weight_only`` — int8 weights, symmetric per output row; activations stay float.
* ``int8_dynamic``     — int8 weights (as above) and int8 activations quantized per token at run time.
* ``int4_weight_only`` — 4-bit weights in groups of ``group_size`` input channels, asymmetric (a float
                         scale and a float zero per group, the "tinygemm" convention of PyTorch's int4
                         kernels): ``w ≈ (q - 8) * scale + zero`` with ``q`` in [0, 15]; ``zero`` is
                         ``(8 - z) * scale`` for an integer zero point ``z``, so the grid is also
                         compressed-tensors' (``ct_format``).

Only the ``nn.Linear`` modules inside the decoder blocks (``model.model.layers``: q/k/v/o, gate/up/down)
are quantized; embeddings and the (often tied) ``lm_head`` stay float unless ``include_lm_head=True``
(int8 on SmolLM2's tied lm_head costs a lot of perplexity without SmoothQuant; DESIGN.md).

A ``QuantizedLinear`` holds the *canonical* quantized data (``qweight`` int8, or two int4 values packed per
uint8; ``scale`` and for int4 ``zero``, fp32): what ``format.save_compressed`` writes, so the bytes on disk
shrink with the scheme, and what ``format.load_compressed`` reads back. From it each layer builds the fastest
*kernel* the device has for its scheme (``KERNELS``, ``preferred_kernel``), chosen by measurement on the
machines this project ran on (torch 2.13 CPU build on 2-core x86; torch 2.11 on an H200):

================  ===============================================  ======================================
scheme            CPU                                              CUDA (bf16, eager)
================  ===============================================  ======================================
int8_dynamic      ``torch.ao`` dynamic quantized Linear (fbgemm/   ``dequantized``: torchao's
                  x86 ``quantized::linear_dynamic``, what          ``Int8Tensor`` int8 x int8 path was
                  ``quantize_dynamic`` installs) with per-token    far slower than bf16 dense
                  activation scales: faster than dense.            (selectable: ``torchao.int8_dynamic``)
                  Without VNNI: raydist's own AVX2 kernel
                  (``raydist.int8_avx2``, ``native.py``), exact
                  int32 sums, one byte per weight; where it
                  cannot be built, fbgemm with each weight
                  packed as two codes (``SPLIT_INT8``).
int8_weight_only  ``dequantized``: torchao's                       torchao ``Int8Tensor`` (weight-only;
                  ``Int8WeightOnlyConfig`` and                     casts the int8 weight per call in
                  ``aten._weight_int8pack_mm`` with fp32           eager, no speedup expected)
                  activations were slower than dense
int4_weight_only  ``dequantized``: torchao's CPU int4 layout       ``aten._weight_int4pack_mm`` (tinygemm,
                  (``Int4OpaqueTensor``) works but was far         bf16): a little faster than dense at
                  slower than dense                                batch 1 (SmolLM2 shape)
================  ===============================================  ======================================

The slow CPU kernels stay selectable (``quantize_model(..., kernel=...)``) for machines where they win.
When a kernel cannot take a layer (or its library is missing) the layer falls back to ``dequantized``:
the canonical weights are expanded to a float matrix once and used with ``F.linear``. The quality is that
of the scheme, but there is no speedup, and the report says so (``speedup_expected: False``).

Int4 group sizes that do not divide a layer's ``in_features`` (SmolLM2: 576 = 4.5 x 128) are handled per
layer: the largest supported group size <= the requested one that divides ``in_features`` is used and
recorded; a layer that no supported group size divides stays float and is recorded as skipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from raydist.compress.quant import native
from raydist.compress.quant.codes import (
    INT4_GROUP_SIZES,
    int4_dequant,
    quantize_int4_groupwise,
    quantize_int8_per_row,
    unpack_int4,
)

SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_weight_only")
DEFAULT_INT4_GROUP_SIZE = 64
# How int4 scales/zeros are chosen. "minmax": each group's range (instant). "hqq": torchao's HQQ proximal solver,
# its zero moved to the integer grid (better than minmax, much slower). "gptq": second-order
# error compensation on calibration text (compress.quant.gptq). Measured: BENCHMARKS.md, Compression.
INT4_ALGORITHMS = ("minmax", "hqq", "gptq")

# kernel name -> (device type, whether it is expected to be faster than the dense float matmul)
KERNELS: dict[str, tuple[str, bool]] = {
    "raydist.int8_avx2": ("cpu", True),  # raydist's own kernel (native.py): AVX2 CPUs without VNNI
    "torch.ao.dynamic_int8": ("cpu", True),
    "aten.int8pack_mm": ("cpu", False),  # with fp32 activations: slower than dense on the CPU build
    "torchao.int4_opaque_cpu": ("cpu", False),  # slower than dense on the CPU build
    "torchao.int8_dynamic": ("cuda", False),  # slower than bf16 dense in eager (H200)
    "torchao.int8_weight_only": ("cuda", False),  # eager: casts the int8 weight to float every call
    "aten.int4pack_mm_cuda": ("cuda", True),  # a little faster than bf16 dense at batch 1 (H200)
    "dequantized": ("any", False),
}

Device = Union[str, torch.device, None]


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# fbgemm without VNNI multiplies u8 x s8 pairs into saturating int16 sums: 8-bit activations (up to 255) times
# 8-bit weights overflow there, and 7-bit activations (fbgemm's reduce_range) cost several percent perplexity
# (BENCHMARKS.md, Serving). So on such CPUs each int8 weight q is packed as two codes, q = 2*h + l with h in
# [-64, 63] and l in {0, 1}: 255*64*2 < 2**15, so no pair saturates, one fbgemm call over [h; l] (2N output
# rows, twice the weight bytes of int8, half of fp32) gives y_h and y_l, and 2*y_h + y_l is the exact product of
# the 8-bit activations and the 8-bit weights. With VNNI the accumulation is int32 and one code is exact.
SPLIT_INT8 = not _cpu_has_vnni()

Packed = torch.classes.quantized.LinearPackedParamsBase  # fbgemm's packed int8 weight (TorchScript class)


def pack_int8_dynamic(qweight: torch.Tensor, scale: torch.Tensor, split: bool = SPLIT_INT8) -> Packed:
    """fbgemm's packed weight (``quantized::linear_dynamic``) for per-row int8 ``qweight`` [N, K] and ``scale`` [N].

    ``split``: pack the two codes of ``SPLIT_INT8`` (2N rows); :func:`int8_dynamic_matmul` recombines them.
    Uses PyTorch's dynamic quantized Linear (what ``torch.ao.quantization.quantize_dynamic`` installs), fed our
    per-channel int8 weights instead of re-quantizing them. torch.ao's quantized tensors are deprecated upstream
    (pytorch#184982); if they disappear, ``prepare`` falls back to the dequantized kernel and the report says so.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    q, s = qweight.cpu(), scale.cpu()
    if split:
        high = torch.div(q, 2, rounding_mode="floor")
        q, s = torch.cat([high, q - 2 * high]), torch.cat([s, s])
    n, k = q.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(n, dtype=torch.long), 0)
    mod = DynamicQuantLinear(k, n, bias_=False, dtype=torch.qint8)
    mod.set_weight_bias(qw, None)
    packed = mod._packed_params._packed_params
    int8_dynamic_matmul(torch.zeros(1, k), packed, split)  # fail here if the kernel refuses the shape
    return packed


def int8_dynamic_linear(x: torch.Tensor, packed: Packed, split: bool) -> torch.Tensor:
    """``x`` [M, K] float (already divided by any SmoothQuant vector) times the int8 weight: [M, N] fp32.

    Activations are quantized per token: each row is divided by its own max before fbgemm's one scale and
    multiplied back after (per-tensor scales were far worse on SmolLM2); at one row the two are the same.
    """
    if x.shape[0] == 1:
        return int8_dynamic_matmul(x, packed, split)
    t = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
    return int8_dynamic_matmul(x / t, packed, split) * t


def int8_dynamic_matmul(x: torch.Tensor, packed: Packed, split: bool) -> torch.Tensor:
    """``x`` [M, K] float times a :func:`pack_int8_dynamic` weight: [M, N] (one activation scale for all of x)."""
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    if split:
        n = y.shape[-1] // 2
        y = torch.add(y[:, n:], y[:, :n], alpha=2)
    return y


# --------------------------------------------------------------------------------------------------
# Scheme / device checks
# --------------------------------------------------------------------------------------------------


def _device_type(device: Device) -> str:
    return torch.device(device).type if device is not None else "cpu"


def preferred_kernel(scheme: str, device: Device) -> str:
    """The kernel a layer of ``scheme`` uses on ``device`` when its shape allows it (see module doc)."""
    dev = _device_type(device)
    table = {
        ("int8_dynamic", "cpu"): "raydist.int8_avx2" if SPLIT_INT8 else "torch.ao.dynamic_int8",
        # slower than dense on the CPU build: aten.int8pack_mm / torchao.int4_opaque_cpu (module doc)
        ("int8_weight_only", "cpu"): "dequantized",
        ("int4_weight_only", "cpu"): "dequantized",
        # torchao's int8 x int8 path was far slower than bf16 dense in eager on an H200 (module doc)
        ("int8_dynamic", "cuda"): "dequantized",
        ("int8_weight_only", "cuda"): "torchao.int8_weight_only",
        ("int4_weight_only", "cuda"): "aten.int4pack_mm_cuda",
    }
    return table.get((scheme, dev), "dequantized")


def check_scheme(scheme: str, group_size: Optional[int] = None, device: Device = None) -> None:
    """Reject a scheme, group size or device that ``quantize_model`` cannot honour, before any change.

    Args:
        scheme: one of ``SCHEMES``.
        group_size: int4 only: requested group size, one of ``INT4_GROUP_SIZES`` (None = 64). Must be
            None for the int8 schemes (they are per output row).
        device: where the quantized model will run (``cpu``, ``cuda``, ``cuda:1``...); None = CPU.

    Raises:
        ValueError: unknown scheme; a group size for an int8 scheme or an unsupported int4 group size;
            a device type without kernels for the scheme, or CUDA requested where it is not available.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "int4_weight_only":
        if group_size is not None and (isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES):
            raise ValueError(
                f"group_size {group_size!r} is not supported for {scheme}; choose from {INT4_GROUP_SIZES} "
                "(a layer whose in_features it does not divide gets the largest smaller one that does)"
            )
    elif group_size is not None:
        raise ValueError(f"group_size applies to int4_weight_only only; {scheme} is per output row (got {group_size})")
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"scheme {scheme!r} cannot run on device {str(dev)!r}: raydist quantizes for cpu and cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"scheme {scheme!r} was asked to run on {str(dev)!r} but CUDA is not available here")


# --------------------------------------------------------------------------------------------------
# The quantized layer
# --------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored quantized; computes ``x @ W^T + b`` with the chosen kernel.

    Persistent state (what ``state_dict`` holds, and so what is saved): ``qweight``, ``scale``, for int4
    also ``zero``, ``smooth`` [in_features] for a SmoothQuant-smoothed int8_dynamic layer (the stored
    weight is ``W * smooth`` and the input is divided by ``smooth``), and ``bias`` when the original layer
    had one. The kernel's own packed form (e.g. the fbgemm packed matrix) is rebuilt from it by
    ``prepare`` and is never saved.

    Args:
        in_features / out_features: the Linear's shape (weight [out_features, in_features]).
        scheme: one of ``SCHEMES``.
        group_size: int4 group size actually used for this layer (None for int8).
        bias: whether the layer has a bias.
        smoothed: whether the layer holds a ``smooth`` vector.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: str,
        group_size: Optional[int] = None,
        bias: bool = False,
        smoothed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        self.kernel = "dequantized"
        self.note: Optional[str] = None  # why the preferred kernel was not used, if it was not
        if scheme == "int4_weight_only":
            if group_size is None or in_features % group_size or in_features % 2:
                raise ValueError(f"int4 layer with in_features={in_features} needs an even group size that divides it")
            n_groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float32))
            self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.float32))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        if smoothed:
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32))
        else:
            self.smooth = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # Kernel state lives outside the module's registries so that state_dict stays canonical.
        self.__dict__["_impl"] = None

    @classmethod
    def from_linear(
        cls,
        lin: nn.Linear,
        scheme: str,
        group_size: Optional[int] = None,
        smooth: Optional[torch.Tensor] = None,
        int4_algorithm: str = "minmax",
        int4_data: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    ) -> "QuantizedLinear":
        """Quantize ``lin`` (any device/dtype) into a new layer on the same device; the kernel is not built.

        ``smooth`` [in_features] (int8 only): per-input-channel factors; ``W * smooth`` is quantized and
        inputs are divided by ``smooth`` at run time (SmoothQuant), which is exact before rounding.
        ``int4_data``: int4 only, the already computed ``(qweight, scale, zero)`` (GPTQ), taken as is.
        """
        if smooth is not None and scheme == "int4_weight_only":
            raise ValueError("smoothing applies to the int8 schemes only")
        q = cls(
            lin.in_features,
            lin.out_features,
            scheme,
            group_size,
            bias=lin.bias is not None,
            smoothed=smooth is not None,
        )
        device = lin.weight.device
        w = lin.weight.detach().float().cpu()
        if smooth is not None:
            q.smooth = smooth.detach().float().cpu().clone()
            w = w * q.smooth[None, :]
        if scheme == "int4_weight_only" and int4_data is not None:
            q.qweight, q.scale, q.zero = (t.detach().cpu().clone() for t in int4_data)
        elif scheme == "int4_weight_only":
            q.qweight, q.scale, q.zero = quantize_int4_groupwise(w, group_size, int4_algorithm)
        else:
            q.qweight, q.scale = quantize_int8_per_row(w)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().float().cpu().clone(), requires_grad=False)
        return q.to(device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] the quantized data stands for."""
        if self.scheme == "int4_weight_only":
            q = unpack_int4(self.qweight).float()  # [N, K]
            g = self.group_size
            w = int4_dequant(q.reshape(self.out_features, -1, g), self.scale[..., None], self.zero[..., None])
            return w.reshape(self.out_features, self.in_features).to(dtype)
        w = self.qweight.float() * self.scale[:, None]
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w.to(dtype)

    # -- kernels ---------------------------------------------------------------------------------

    def prepare(self, kernel: Optional[str] = None) -> str:
        """Build the runtime kernel for the current device from the canonical data; returns its name.

        ``kernel=None`` tries the device's preferred kernel for the scheme and falls back to
        ``dequantized`` if that kernel cannot take this layer here (the reason is kept in ``self.note``).
        """
        want = kernel or preferred_kernel(self.scheme, self.qweight.device)
        self.note = None
        try:
            self.__dict__["_impl"] = self._build(want)
            self.kernel = want
        except Exception as e:  # a kernel missing from this build / refusing this shape: fall back, say why
            if kernel is not None:
                raise
            self.note = f"{want} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            # raydist's AVX2 kernel not built here: fbgemm's (its weights as two codes), else the float matrix
            fallback = "torch.ao.dynamic_int8" if want == "raydist.int8_avx2" else "dequantized"
            try:
                self.__dict__["_impl"], self.kernel = self._build(fallback), fallback
            except Exception:  # noqa: BLE001 - fbgemm missing too
                self.__dict__["_impl"], self.kernel = self._build("dequantized"), "dequantized"
        return self.kernel

    def _build(self, kernel: str) -> Any:
        dev = self.qweight.device
        if kernel != "dequantized" and KERNELS[kernel][0] != dev.type:
            raise ValueError(f"kernel {kernel} runs on {KERNELS[kernel][0]}, the layer is on {dev.type}")
        if kernel == "dequantized":
            return self.dequantized_weight()
        if kernel == "torch.ao.dynamic_int8":  # the bias is added outside, after the per-token rescaling
            return pack_int8_dynamic(self.qweight, self.scale)
        if kernel == "raydist.int8_avx2":
            if not native.int8_kernel_available():
                raise RuntimeError(f"raydist's int8 AVX2 kernel: {native.int8_kernel_note()}")
            return native.pack_int8(self.qweight), self.scale.float().contiguous()
        if (
            kernel in ("aten.int8pack_mm", "aten.int4pack_mm_cuda", "torchao.int4_opaque_cpu")
            and self.smooth is not None
        ):
            raise ValueError(f"kernel {kernel} does not take smoothed layers")
        if kernel == "aten.int8pack_mm":
            y = torch.ops.aten._weight_int8pack_mm(torch.zeros(1, self.in_features), self.qweight, self.scale)
            assert y.shape == (1, self.out_features)
            return None
        if kernel in ("torchao.int8_dynamic", "torchao.int8_weight_only"):
            # torchao's Int8Tensor carries the activation dtype, so it is built per dtype in forward.
            import importlib

            importlib.import_module("torchao.quantization.quantize_.workflows.int8.int8_tensor")  # fail early
            return {}
        if kernel == "torchao.int4_opaque_cpu":
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor
            from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

            q = unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = pack_tinygemm_scales_and_zeros(self.scale, self.zero, torch.float32)
            w = Int4OpaqueTensor(packed, sz, [1, self.group_size], torch.Size([self.out_features, self.in_features]))
            F.linear(torch.zeros(1, self.in_features), w)  # fail here if the kernel refuses the shape
            return w
        if kernel == "aten.int4pack_mm_cuda":
            from torchao.quantization.utils import pack_tinygemm_scales_and_zeros  # noqa: F401  (fail here, not later)

            return {}  # packed lazily in forward
        raise ValueError(f"unknown kernel {kernel!r}; choose from {sorted(KERNELS)}")

    def _ensure(self) -> None:
        if self.__dict__["_impl"] is None:
            self.prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in_features] -> [..., out_features]
        self._ensure()
        impl, kernel = self.__dict__["_impl"], self.kernel
        if kernel == "dequantized":
            if impl.dtype != x.dtype:  # cast once (bf16 models on GPU), not on every call
                impl = self.__dict__["_impl"] = impl.to(x.dtype)
            return F.linear(x, impl, None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if kernel == "torch.ao.dynamic_int8":
            xf = x2.float() if self.smooth is None else x2.float() / self.smooth
            y = int8_dynamic_linear(xf, impl, SPLIT_INT8)
        elif kernel == "raydist.int8_avx2":  # per-token activation codes are made inside the op
            xf = x2.float() if self.smooth is None else x2.float() / self.smooth
            y = torch.ops.raydist.int8_linear(xf, *impl)
        elif kernel == "aten.int8pack_mm":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale.to(x.dtype))
        elif kernel == "torchao.int4_opaque_cpu":
            y = F.linear(x2, impl)
        elif kernel in ("torchao.int8_dynamic", "torchao.int8_weight_only"):
            y = F.linear(x2, self._torchao_int8(impl, x.dtype, kernel))
        elif kernel == "aten.int4pack_mm_cuda":
            y = self._int4_cuda(impl, x2)
        else:
            raise RuntimeError(f"layer has unknown kernel {kernel!r}")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _torchao_int8(self, cache: dict, dtype: torch.dtype, kernel: str):
        if dtype not in cache:
            from torchao.quantization.granularity import PerRow
            from torchao.quantization.quant_primitives import MappingType
            from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
                Int8Tensor,
                QuantizeTensorToInt8Kwargs,
            )

            act = (
                QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
                if kernel == "torchao.int8_dynamic"
                else None
            )
            pre = None if self.smooth is None else (1.0 / self.smooth).to(dtype)
            cache[dtype] = Int8Tensor(
                self.qweight,
                self.scale[:, None].to(dtype),
                [1, self.in_features],
                dtype,
                act_quant_kwargs=act,
                act_pre_scale=pre,
            )
        return cache[dtype]

    def _int4_cuda(self, cache: dict, x2: torch.Tensor) -> torch.Tensor:
        # The CUDA tinygemm kernel takes bf16 activations; inner_k_tiles is the largest of 8/4/2 whose
        # tile (inner_k_tiles * 16 input channels) divides in_features (SmolLM2's 576 needs 4).
        if "w" not in cache:
            from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

            tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            q = unpack_int4(self.qweight)
            packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()  # the CUDA packer wants high nibble first
            cache["w"] = torch.ops.aten._convert_weight_to_int4pack(packed_u8, tiles)
            cache["sz"] = pack_tinygemm_scales_and_zeros(
                self.scale.to(torch.bfloat16), self.zero.to(torch.bfloat16), torch.bfloat16
            )
        y = torch.ops.aten._weight_int4pack_mm(
            x2.to(torch.bfloat16).contiguous(), cache["w"], self.group_size, cache["sz"]
        )
        return y.to(x2.dtype)

    def __getstate__(self) -> dict[str, Any]:
        # Kernel objects (fbgemm packed params, torchao tensors) are rebuilt on first use after a copy or
        # unpickling (e.g. through Ray's object store); only the canonical data travels.
        state = self.__dict__.copy()
        state["_impl"] = None
        return state

    def _apply(self, fn, recurse=True):
        # Moving the module invalidates the kernel (it holds device-specific packed data). Scales and
        # zeros keep fp32 even under model.to(bfloat16): they are part of the stored format, and
        # rounding them would change the reloaded logits.
        keep = {n: self._buffers.pop(n) for n in ("scale", "zero", "smooth") if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, t in keep.items():
            self._buffers[n] = t.to(self.qweight.device)
        self.__dict__["_impl"] = None
        return out

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}, "
            f"kernel={self.kernel}, bias={self.bias is not None}"
        )
