"""Weight quantization of a causal LM's decoder blocks, and compressed artifacts that reload exactly.

Schemes (``SCHEMES``):

* ``int8_weight_only`` — int8 weights, symmetric per output row; activations stay float.
* ``int8_dynamic``     — int8 weights (as above) and int8 activations quantized per token at run time.
* ``int4_weight_only`` — 4-bit weights in groups of ``group_size`` input channels, asymmetric (a float
                         scale and a float zero per group, the "tinygemm" convention of PyTorch's int4
                         kernels): ``w ≈ (q - 8) * scale + zero`` with ``q`` in [0, 15].

Only the ``nn.Linear`` modules inside the decoder blocks (``model.model.layers``: q/k/v/o, gate/up/down)
are quantized; embeddings and the (often tied) ``lm_head`` stay float unless ``include_lm_head=True``
(measured on SmolLM2-135M: int8 on its tied lm_head triples perplexity).

How it works: a quantized layer becomes a ``QuantizedLinear`` that holds the *canonical* quantized data
(``qweight`` int8, or two int4 values packed per uint8; ``scale`` and for int4 ``zero``, fp32). That data
is what ``save_compressed`` writes, so the bytes on disk shrink with the scheme, and what
``load_compressed`` reads back. From the canonical data each layer builds the fastest *kernel* the device
has for its scheme (``KERNELS``, ``preferred_kernel``), chosen by measurement:

================  ===============================================  ======================================
scheme            CPU (torch 2.13 CPU build, 2-core AVX512 x86)    CUDA (torch 2.11, H200, bf16, eager)
================  ===============================================  ======================================
int8_dynamic      ``torch.ao`` dynamic quantized Linear (fbgemm/   ``dequantized``: torchao's
                  x86 ``quantized::linear_dynamic``, what          ``Int8Tensor`` int8 x int8 path ran a
                  ``quantize_dynamic`` installs) with per-token    SmolLM2-shaped forward in 335 ms vs
                  activation scales: ~2x dense generation speed.   25 ms dense (selectable:
                  torchao's CPU int8x8 path is extremely slow.     ``torchao.int8_dynamic``)
int8_weight_only  ``dequantized`` — the fastest measured: torchao  torchao ``Int8Tensor`` (weight-only;
                  ``Int8WeightOnlyConfig`` ran at 0.7x dense and   casts the int8 weight per call in
                  ``aten._weight_int8pack_mm`` at ~0.01x (a        eager, no speedup expected)
                  [1, 576] x [576, 1536] matmul: 3.6 ms vs 46 us)
int4_weight_only  ``dequantized`` — torchao's CPU int4 layout      ``aten._weight_int4pack_mm`` (tinygemm,
                  (``Int4OpaqueTensor``, tinygemm CPU kernel)      bf16): 1.1x dense generation at
                  works but ran ~100x slower than dense            batch 1 (SmolLM2 shape)
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

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from raydist.compress.quant.codes import (  # noqa: F401 - re-exported: the layer's public helpers
    INT4_GROUP_SIZES,
    quantize_int8_per_row,
    quantize_int4_groupwise,
    int4_minmax_qparams,
    int4_round,
    int4_dequant,
    pack_int4,
    int4_codes_on_grid,
    int4_on_grid,
    unpack_int4,
    pick_group_size,
)
from raydist.compress.quant.gptq import gptq_quantize_weights
from raydist.core.layout import decoder_layers

SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_weight_only")
DEFAULT_INT4_GROUP_SIZE = 64
# How int4 scales/zeros are chosen. "minmax": each group's range (tinygemm's default; instant). "hqq":
# torchao's HQQ proximal solver, same storage format. SmolLM2-135M g64, 2 windows: dense 14.24, minmax
# 18.92 (+33 %), hqq 16.80 (+18 %); hqq took ~400 s for the 210 block layers on a busy 2-core box.
INT4_ALGORITHMS = ("minmax", "hqq", "gptq")
QUANT_FORMAT = 1  # version of the on-disk layout written by save_compressed
# Not "model.safetensors": plain from_pretrained must fail loudly on a quantized artifact (transformers only
# warns about an unknown quantization_config and would fill the missing float weights with random ones).
WEIGHTS_FILE = "model.raydist-quantized.safetensors"

# kernel name -> (device type, whether it is expected to be faster than the dense float matmul)
KERNELS: dict[str, tuple[str, bool]] = {
    "torch.ao.dynamic_int8": ("cpu", True),
    "aten.int8pack_mm": ("cpu", False),  # measured ~0.01x dense on the CPU build here
    "torchao.int4_opaque_cpu": ("cpu", False),  # measured ~0.01x dense on the CPU build here
    "torchao.int8_dynamic": ("cuda", False),  # measured 13x slower than bf16 dense in eager (H200)
    "torchao.int8_weight_only": ("cuda", False),  # eager: casts the int8 weight to float every call
    "aten.int4pack_mm_cuda": ("cuda", True),  # measured 1.1x bf16 dense generation at batch 1 (H200)
    "dequantized": ("any", False),
}

Device = Union[str, torch.device, None]


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# fbgemm without VNNI multiplies u8 x s8 pairs into saturating int16 sums; reduce_range (7-bit activations)
# avoids that overflow at a measured cost (SmolLM2, per-token: ppl +4.6 % with it, +3.7 % without). With
# VNNI the accumulation is int32 and the full 8-bit range is safe.
REDUCE_RANGE = not _cpu_has_vnni()


# --------------------------------------------------------------------------------------------------
# Scheme / device checks
# --------------------------------------------------------------------------------------------------


def _device_type(device: Device) -> str:
    return torch.device(device).type if device is not None else "cpu"


def preferred_kernel(scheme: str, device: Device) -> str:
    """The kernel a layer of ``scheme`` uses on ``device`` when its shape allows it (see module doc)."""
    dev = _device_type(device)
    table = {
        ("int8_dynamic", "cpu"): "torch.ao.dynamic_int8",
        # measured slower than dense here: aten.int8pack_mm / torchao.int4_opaque_cpu (module doc)
        ("int8_weight_only", "cpu"): "dequantized",
        ("int4_weight_only", "cpu"): "dequantized",
        # torchao's int8 x int8 path measured 13x slower than bf16 dense in eager on an H200 (module doc)
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
            self.__dict__["_impl"] = self._build("dequantized")
            self.kernel = "dequantized"
        return self.kernel

    def _build(self, kernel: str) -> Any:
        dev = self.qweight.device
        if kernel != "dequantized" and KERNELS[kernel][0] != dev.type:
            raise ValueError(f"kernel {kernel} runs on {KERNELS[kernel][0]}, the layer is on {dev.type}")
        if kernel == "dequantized":
            return self.dequantized_weight()
        if kernel == "torch.ao.dynamic_int8":
            # PyTorch's dynamic quantized Linear (what torch.ao.quantization.quantize_dynamic installs),
            # fed our per-channel int8 weights instead of re-quantizing them.
            from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    self.qweight.cpu(), self.scale.double().cpu(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
            # torch.ao's quantized tensors are deprecated upstream (pytorch#184982); if they disappear,
            # prepare() falls back to the dequantized kernel and the report shows it.
            # The bias is added outside the kernel, after the per-token rescaling in forward.
            mod = DynamicQuantLinear(self.in_features, self.out_features, bias_=False, dtype=torch.qint8)
            mod.set_weight_bias(qw, None)
            packed = mod._packed_params._packed_params
            torch.ops.quantized.linear_dynamic(torch.zeros(1, self.in_features), packed, reduce_range=REDUCE_RANGE)
            return packed
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
            return {}  # packed lazily per activation dtype in forward
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
            # fbgemm quantizes the whole activation matrix with one scale; dividing each token (row) by its
            # own max first makes that one scale a per-token scale (measured on SmolLM2, 2 windows: ppl
            # 36.1 per-tensor vs 14.8 per-token, dense 14.2), and the row maxima are multiplied back.
            xf = x2.float() if self.smooth is None else x2.float() / self.smooth
            t = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # [M, 1]
            y = torch.ops.quantized.linear_dynamic(xf / t, impl, reduce_range=REDUCE_RANGE) * t
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


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


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
            ``s``, moving activation outliers into the (per-row quantized) weights. Measured on SmolLM2
            (2 windows): ppl +3.7 % without, +1.0 % with alpha 0.5. None = no smoothing.
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
            w_max = w_max.clamp(min=1e-5)  # [K]
            smooth = (act_max[name].clamp(min=1e-5) ** smoothing_alpha / w_max ** (1 - smoothing_alpha)).clamp(min=1e-5)
        codes = gptq_report.get("codes", {}).get(name)
        if int4_grids is not None:
            scale, zero = (t.detach().float().cpu() for t in int4_grids[name])
            codes = (pack_int4(int4_codes_on_grid(lin.weight.detach().cpu(), scale, zero)), scale, zero)
        q = QuantizedLinear.from_linear(
            lin, scheme, g, smooth=smooth, int4_data=codes, int4_algorithm="minmax" if use_gptq else int4_algorithm
        )
        used = q.prepare(kernel)
        _set_module(model, name, q)
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
            report["activations"] = "int8 per token" + (", 7-bit (reduce_range)" if REDUCE_RANGE else "")
        elif report["kernel"] == "torchao.int8_dynamic":
            report["activations"] = "int8 per token"
        else:  # the dequantized kernel multiplies float activations by the int8 weights' float values
            report["activations"] = "not quantized (kernel " + str(report["kernel"]) + ")"
        report["smoothing"] = {"alpha": smoothing_alpha, "calibration_tokens": n_cal} if act_max else None
    return report


_SAME_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


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


# --------------------------------------------------------------------------------------------------
# Compressed artifacts
# --------------------------------------------------------------------------------------------------


def _distinct_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (safetensors refuses shared storage) and made contiguous;
    the reload re-ties them through the config, as transformers does."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().cpu().contiguous()
    return out


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
    manifest says so). A quantized model stores each ``QuantizedLinear``'s canonical data
    (``<layer>.qweight`` int8 [N, K] or uint8 [N, K/2], ``<layer>.scale`` fp32, ``<layer>.zero`` fp32
    for int4, ``<layer>.bias``) and everything else in float; ``raydist.json`` carries a ``quantization``
    block (scheme, format version, per-layer scheme/group size) that ``load_compressed`` reads.
    The quantized tensors go to ``model.raydist-quantized.safetensors`` (not ``model.safetensors``), so
    plain ``from_pretrained`` refuses the directory instead of filling the missing ``.weight`` tensors with
    random values; ``config.json`` also names the loader in ``quantization_config`` (quant_method
    ``raydist``). ``load_compressed`` loads every artifact, float or quantized.

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
    from raydist.core.artifact import write_manifest
    from raydist.core.models import make_shareable

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

        schemes = sorted({m.scheme for m in qlayers.values()})
        quant_block = {
            "format": QUANT_FORMAT,
            "scheme": schemes[0] if len(schemes) == 1 else "+".join(schemes),
            "layers": {
                n: {
                    "scheme": m.scheme,
                    "group_size": m.group_size,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "smoothed": m.smooth is not None,
                }
                for n, m in qlayers.items()
            },
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        }
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {
            "quant_method": "raydist",
            "scheme": quant_block["scheme"],
            "load_with": "raydist.compress.quant.quantization.load_compressed",
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_file(
            _distinct_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "raydist": "quantized"}
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    extra: dict[str, Any] = {"compression": _jsonable(report or {})}
    if quant_block is not None:
        extra["quantization"] = quant_block
    elif report and any(k in report for k in ("sparsity", "pattern")):
        extra["compression"]["bytes_shrink"] = False  # unstructured zeros are stored dense
    from raydist.core.models import count_parameters

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

    A quantized artifact is rebuilt from its config, its quantized layers are replaced by empty
    ``QuantizedLinear`` modules of the recorded scheme/group size, the stored tensors are loaded strictly,
    and each layer builds the device's kernel (or ``kernel``) from the canonical data — so the logits equal
    those of the model that was saved when the kernel is the same.

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
        ValueError: an unknown quantization format/scheme in the manifest, tensors that do not match it,
            or a device the scheme cannot run on.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    manifest_path = path / "raydist.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    quant = manifest.get("quantization")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not quant:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(dev).eval()
    if quant.get("format") != QUANT_FORMAT:
        raise ValueError(
            f"{path}: quantization format {quant.get('format')!r} is not supported (expected {QUANT_FORMAT})"
        )
    for name, spec in quant["layers"].items():
        check_scheme(spec["scheme"], spec["group_size"] if spec["scheme"] == "int4_weight_only" else None, dev)
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):  # our marker; the rebuilt model is float until layers swap
        delattr(config, "quantization_config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Built directly in ``dtype`` (as from_pretrained(dtype=...) does): casting afterwards would also
        # round fp32-only buffers such as the rotary inv_freq, and the logits would differ from the saved model.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in quant["layers"].items():
        _set_module(
            model,
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
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{path}: stored tensors do not match the recorded layout "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if tied:
        model.tie_weights()
    model.to(dev).eval()
    for m in quantized_layers(model).values():
        m.prepare(kernel)
    return model


__all__ = [
    "DEFAULT_INT4_GROUP_SIZE",
    "INT4_ALGORITHMS",
    "INT4_GROUP_SIZES",
    "KERNELS",
    "QuantizedLinear",
    "SCHEMES",
    "check_scheme",
    "int4_codes_on_grid",
    "int4_dequant",
    "int4_minmax_qparams",
    "int4_on_grid",
    "int4_round",
    "load_compressed",
    "pack_int4",
    "pick_group_size",
    "preferred_kernel",
    "quantize_int4_groupwise",
    "quantize_int8_per_row",
    "quantize_model",
    "quantized_layers",
    "save_compressed",
    "target_linears",
    "unpack_int4",
]
