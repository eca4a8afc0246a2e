"""A lean forward pass of Llama-layout decoders for the serving engine (CPU decode speed).

Written by hand because transformers' forward spends more time in per-layer Python (hooks, cache and mask
objects, dispatch) than in arithmetic at decode (profiled on SmolLM2-135M at batch 1, 2 cores: the matmuls were
about two thirds of its step). This module runs the *same* weights with the same math and far fewer ops per
layer:

* q/k/v and gate/up are fused into one matmul each; dense weights are stored transposed (``x @ Wt``: MKL
  ran SmolLM2-shaped products at 16 rows several times faster that way than ``F.linear``'s ``x @ W.T``);
* int8-dynamic layers (``QuantizedLinear`` with the fbgemm kernel) are fused the same way when they share
  their input (and so their SmoothQuant vector); the smoothing of q/k/v and gate/up is folded into the
  RMSNorm weight in front of them and down_proj's into up_proj's row scales (exact: per-row int8 scales), so
  no division is left but o_proj's; at one row fbgemm's per-tensor activation scale *is* the per-token
  scale, so the per-token rescaling is skipped there;
* on raydist's own int8 kernel (``compress/quant/native.py``, CPUs with AVX2 but without VNNI) the RMSNorm in
  front of q/k/v, gate/up and the head is fused into the product that reads it (one op instead of two);
* RoPE is applied to q and k in one go; the KV cache is a preallocated buffer per layer (no concatenation
  per step) that the engine can still select rows from and merge (continuous batching);
* a decode step's attention (one query token per row) runs raydist's kernel (``serve/attention_avx2.cpp``)
  where it is built: PyTorch's SDPA is built for long queries (about 6x slower at batch 1 on SmolLM2's heads).

``FastLlama.build(model)`` returns None for anything it does not reproduce exactly (another architecture,
biases, a rope the model's own ``rotary_emb`` does not cover, int4 or other quantized layers): the engine then
uses transformers' forward. The model's own module computes RoPE cos/sin, so every rope type transformers
implements for Llama is the same here.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raydist.compress.quant import native
from raydist.compress.quant.layer import SPLIT_INT8, Packed, QuantizedLinear, int8_dynamic_linear

SUPPORTED_TYPES = ("llama",)
INT8_KERNELS = ("raydist.int8_avx2", "torch.ao.dynamic_int8")  # int8_dynamic layers this module fuses


def _linear(
    x: torch.Tensor,
    packed: Optional[Packed],
    wt: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    split: bool,
    qw: Optional[torch.Tensor] = None,
    qs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One fused op of :class:`_Dense` / :class:`_Int8Dynamic` (TorchScript-compatible twin of their call).
    ``qw`` / ``qs``: the packed weight and scales of raydist's int8 AVX2 kernel (``native.py``)."""
    if smooth is not None:
        x = x / smooth
    if qw is not None and qs is not None:
        return torch.ops.raydist.int8_linear(x, qw, qs)
    if packed is not None:
        return int8_dynamic_linear(x, packed, split)
    assert wt is not None
    return x @ wt


def _normed_linear(
    x: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    packed: Optional[Packed],
    wt: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    split: bool,
    qw: Optional[torch.Tensor] = None,
    qs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``_linear(rms_norm(x))`` for ``x`` [M, H]; one op on raydist's int8 kernel (the norm fused into it)."""
    if qw is not None and qs is not None and smooth is None:
        return torch.ops.raydist.int8_linear_rms(x, norm, eps, qw, qs)
    return _linear(F.rms_norm(x, [x.shape[-1]], norm, eps), packed, wt, smooth, split, qw, qs)


def _layers(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    past: int,
    norms1: List[torch.Tensor],
    norms2: List[torch.Tensor],
    eps1: List[float],
    eps2: List[float],
    packed: List[Optional[Packed]],
    dense: List[Optional[torch.Tensor]],
    smooth: List[Optional[torch.Tensor]],
    qw: List[Optional[torch.Tensor]],
    qs: List[Optional[torch.Tensor]],
    keys: List[torch.Tensor],
    values: List[torch.Tensor],
    nq: int,
    nkv: int,
    d: int,
    split: bool,
    native_attention: bool = False,
) -> torch.Tensor:
    """Every decoder layer on ``x`` [B, T, H]; linears 4 per layer (qkv, o, gate_up, down) in the flat lists.
    ``keys`` / ``values`` [B, kv_heads, capacity, d] hold ``past`` positions and get the T new ones."""
    b, t = x.shape[0], x.shape[1]
    half = d // 2
    for i in range(len(norms1)):
        j = 4 * i
        h = x.reshape(b * t, -1)
        qkv = _normed_linear(h, norms1[i], eps1[i], packed[j], dense[j], smooth[j], split, qw[j], qs[j])
        qkv = qkv.view(b, t, nq + 2 * nkv, d)
        qk = qkv[:, :, : nq + nkv]
        qk = torch.addcmul(qk * cos, torch.roll(qk, half, -1), sin)
        keys[i][:, :, past : past + t] = qk[:, :, nq:].transpose(1, 2)
        values[i][:, :, past : past + t] = qkv[:, :, nq + nkv :].transpose(1, 2)
        if t == 1 and native_attention:  # decode: raydist's kernel (SDPA is built for long queries)
            a = torch.ops.raydist.decode_attention(qk[:, 0, :nq], keys[i], values[i], mask.reshape(b, -1), d**-0.5)
            a = a.reshape(b, nq * d)
        else:
            a = F.scaled_dot_product_attention(
                qk[:, :, :nq].transpose(1, 2),
                keys[i][:, :, : past + t],
                values[i][:, :, : past + t],
                attn_mask=mask,
                enable_gqa=nq != nkv,
            )
            a = a.transpose(1, 2).reshape(b * t, nq * d)
        x = x + _linear(a, packed[j + 1], dense[j + 1], smooth[j + 1], split, qw[j + 1], qs[j + 1]).view(b, t, -1)
        h = x.reshape(b * t, -1)
        gu = _normed_linear(
            h, norms2[i], eps2[i], packed[j + 2], dense[j + 2], smooth[j + 2], split, qw[j + 2], qs[j + 2]
        )
        inter = gu.shape[-1] // 2
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        x = x + _linear(act, packed[j + 3], dense[j + 3], smooth[j + 3], split, qw[j + 3], qs[j + 3]).view(b, t, -1)
    return x


_SCRIPTED: list = []


def _scripted_layers():
    """``_layers`` compiled by TorchScript (once per process), or None where TorchScript cannot take it.

    TorchScript runs the ~20 ops of a layer without a Python frame per op, which made a SmolLM2-135M int8 decode
    step markedly faster than the same Python loop (2 cores; the engine's speed is in BENCHMARKS.md, Serving).
    """
    if not _SCRIPTED:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                _SCRIPTED.append(torch.jit.script(_layers))
        except Exception:  # noqa: BLE001 - a torch without TorchScript: the Python loop does the same
            _SCRIPTED.append(None)
    return _SCRIPTED[0]


class _Dense:
    """``x @ W^T`` with W stored transposed and contiguous [in, out]."""

    def __init__(self, weights: list[torch.Tensor]):
        self.wt = torch.cat([w.detach() for w in weights], dim=0).t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, None, self.wt, None, False)


class _Int8Dynamic:
    """fbgemm int8 x int8 (``quantized::linear_dynamic``) over the concatenated rows of layers that share
    their input; per-token activation scales (each row divided by its max first, as ``QuantizedLinear``).
    ``smooth``: the SmoothQuant divisor still to apply to the input (None when folded into the norm)."""

    def __init__(self, layers: list, smooth: Optional[torch.Tensor], last_rows_divisor: Optional[torch.Tensor] = None):

        if last_rows_divisor is not None:  # output rows of the last layer divided (exact: per-row weight scales)
            last = layers[-1]
            q = QuantizedLinear(last.in_features, last.out_features, "int8_dynamic")
            q.qweight, q.scale = last.qweight, last.scale / last_rows_divisor
            layers = layers[:-1] + [q]
        if len(layers) == 1 and last_rows_divisor is None:
            q = layers[0]
            q._ensure()
        else:
            q = QuantizedLinear(layers[0].in_features, sum(la.out_features for la in layers), "int8_dynamic")
            q.qweight = torch.cat([la.qweight for la in layers])
            q.scale = torch.cat([la.scale for la in layers])
            if q.prepare(layers[0].kernel) != layers[0].kernel:
                raise RuntimeError(q.note)
        impl = q.__dict__["_impl"]
        if q.kernel == "raydist.int8_avx2":
            self.packed, (self.qw, self.qs) = None, impl
        else:
            self.packed, self.qw, self.qs = impl, None, None
        self.smooth = smooth

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, None, self.smooth, SPLIT_INT8, self.qw, self.qs)


class _Concat:
    """Several ops on the same input, outputs side by side (layers that could not be fused)."""

    def __init__(self, ops: list):
        self.ops = ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([op(x) for op in self.ops], dim=-1)


def _kind(module: nn.Module) -> Optional[str]:

    if isinstance(module, nn.Linear) and module.bias is None and module.weight.dtype == torch.float32:
        return "dense"
    if isinstance(module, QuantizedLinear) and module.scheme == "int8_dynamic" and module.bias is None:
        module._ensure()
        return module.kernel if module.kernel in INT8_KERNELS else None
    return None


def _fused(
    modules: list[nn.Module],
    norm_weight: Optional[torch.Tensor],
    *,
    smoothed: bool = True,
    last_rows_divisor: Optional[torch.Tensor] = None,
):
    """One op for linears reading the same input, and the norm weight to use before it (smoothing folded).

    ``smoothed=False``: the input arrives already divided by the layers' smoothing vector (folded upstream).
    ``last_rows_divisor``: divide the last layer's outputs by it (a smoothing folded in from downstream).
    """
    kinds = {_kind(m) for m in modules}
    if kinds == {"dense"}:
        return _Dense([m.weight for m in modules]), norm_weight
    if len(kinds) != 1 or not kinds <= set(INT8_KERNELS):  # fused layers share one int8 kernel
        return None, None
    smooths = [m.smooth if smoothed else None for m in modules]
    if any(s is None for s in smooths):
        if not all(s is None for s in smooths):
            return None, None
        return _Int8Dynamic(modules, None, last_rows_divisor), norm_weight
    if not all(torch.equal(s, smooths[0]) for s in smooths[1:]):
        # Smoothed separately (artifacts written before smoothing was shared): one matmul per layer.
        ops = [
            _Int8Dynamic([m], m.smooth, last_rows_divisor if i == len(modules) - 1 else None)
            for i, m in enumerate(modules)
        ]
        return _Concat(ops), norm_weight
    if norm_weight is None:
        return _Int8Dynamic(modules, smooths[0], last_rows_divisor), None
    return _Int8Dynamic(modules, None, last_rows_divisor), norm_weight / smooths[0]


class _Layer:
    __slots__ = ("norm1", "qkv", "o", "norm2", "gate_up", "down", "eps1", "eps2")


class KVLayer:
    """One layer's keys and values [B, kv_heads, capacity, head_dim], of which ``length`` positions are used.

    ``keys`` / ``values`` are views of the used part, as a transformers cache layer has them; the engine's
    merge uses :meth:`join`.
    """

    is_sliding = False

    def __init__(self):
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self.length = 0

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]

    def reserve(self, like: torch.Tensor) -> None:
        """Grow the buffers (keeping what they hold) so ``like`` [B, kv_heads, T, head_dim] fits after it."""
        need = self.length + like.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            cap = max(need + 64, 2 * (self._k.shape[-2] if self._k is not None else 0))
            shape = (like.shape[0], like.shape[1], cap, like.shape[-1])
            nk, nv = like.new_empty(shape), like.new_empty(shape)
            if self.length:
                nk[:, :, : self.length] = self.keys
                nv[:, :, : self.length] = self.values
            self._k, self._v = nk, nv

    def join(self, other: "KVLayer", width: int, room: int = 64) -> None:
        """Append ``other``'s rows after this layer's, both left-padded with zeros to ``width`` positions, into
        one new buffer with ``room`` free positions after them: one copy per merge (a concatenation followed
        by the next step's growth would copy the cache twice)."""
        ka, kb = self.keys, other.keys
        ba, bb = ka.shape[0], kb.shape[0]
        shape = (ba + bb, ka.shape[1], width + room, ka.shape[-1])
        nk, nv = ka.new_empty(shape), ka.new_empty(shape)
        for buf, a, b in ((nk, ka, kb), (nv, self.values, other.values)):
            buf[:ba, :, : width - a.shape[-2]] = 0  # masked, but must stay finite (0 x NaN is NaN)
            buf[:ba, :, width - a.shape[-2] : width] = a
            buf[ba:, :, : width - b.shape[-2]] = 0
            buf[ba:, :, width - b.shape[-2] : width] = b
        self._k, self._v, self.length = nk, nv, width

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` [B, kv_heads, T, head_dim] after the used part; all keys and values so far."""
        need = self.length + k.shape[-2]
        self.reserve(k)
        self._k[:, :, self.length : need] = k
        self._v[:, :, self.length : need] = v
        self.length = need
        return self._k[:, :, :need], self._v[:, :, :need]


class KVCache:
    """The KV cache of :class:`FastLlama`: a :class:`KVLayer` per decoder layer."""

    def __init__(self, n_layers: int):
        self.layers = [KVLayer() for _ in range(n_layers)]

    def reserve(self, like: torch.Tensor) -> None:
        """Make room in every layer for the new keys ``like`` [B, kv_heads, T, head_dim]."""
        for la in self.layers:
            la.reserve(like)

    def batch_select_indices(self, idx: torch.Tensor) -> None:
        for la in self.layers:
            if la._k is not None:
                la._k, la._v = la._k[idx], la._v[idx]


class FastLlama:
    """The decoder of a Llama-layout causal LM as a few fused ops per layer (see the module doc).

    Use :meth:`build`; ``forward`` has the engine's signature.
    """

    def __init__(self, model: nn.Module, layers: list[_Layer], lm_head, final_norm: torch.Tensor, final_eps: float):
        cfg = model.config
        self.model = model
        self.embed = model.model.embed_tokens.weight
        self.rotary = model.model.rotary_emb
        self.layers = layers
        self.lm_head = lm_head
        self.final_norm, self.final_eps = final_norm, final_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        ops = [op for la in layers for op in (la.qkv, la.o, la.gate_up, la.down)]
        self._script = _scripted_layers() if not any(isinstance(op, _Concat) for op in ops) else None

        self._flat = dict(
            norms1=[la.norm1 for la in layers],
            norms2=[la.norm2 for la in layers],
            eps1=[float(la.eps1) for la in layers],
            eps2=[float(la.eps2) for la in layers],
            packed=[getattr(op, "packed", None) for op in ops],
            dense=[getattr(op, "wt", None) for op in ops],
            smooth=[getattr(op, "smooth", None) for op in ops],
            qw=[getattr(op, "qw", None) for op in ops],
            qs=[getattr(op, "qs", None) for op in ops],
            nq=self.n_heads,
            nkv=self.n_kv,
            d=self.head_dim,
            split=SPLIT_INT8,
            native_attention=self.head_dim in (16, 32, 64, 128) and native.int8_kernel_available(),
        )

    @classmethod
    def build(cls, model: nn.Module) -> Optional["FastLlama"]:
        """The fast path for ``model``, or None when it cannot reproduce the model's forward exactly."""
        cfg = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if (
            cfg is None
            or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES
            or inner is None
            or getattr(cfg, "attention_bias", False)
            or getattr(cfg, "mlp_bias", False)
            or getattr(cfg, "pretraining_tp", 1) != 1
            or getattr(cfg, "hidden_act", "silu") != "silu"
            or not hasattr(inner, "rotary_emb")
            or not hasattr(inner, "embed_tokens")
            or next(model.parameters()).device.type != "cpu"
            or inner.embed_tokens.weight.dtype != torch.float32
        ):
            return None
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        layers = []
        with torch.no_grad():
            for blk in inner.layers:
                att, mlp = blk.self_attn, blk.mlp
                if (
                    att.q_proj.out_features != n_heads * head_dim
                    or att.k_proj.out_features != n_kv * head_dim
                    or att.v_proj.out_features != n_kv * head_dim
                ):
                    return None  # heads pruned per layer: transformers' forward handles that
                la = _Layer()
                la.qkv, la.norm1 = _fused([att.q_proj, att.k_proj, att.v_proj], blk.input_layernorm.weight.detach())
                la.o, _ = _fused([att.o_proj], None)
                # down_proj's input is silu(gate) * up: its smoothing divisor folds exactly into up's row scales.
                down_smooth = getattr(mlp.down_proj, "smooth", None) if _kind(mlp.down_proj) in INT8_KERNELS else None
                la.gate_up, la.norm2 = _fused(
                    [mlp.gate_proj, mlp.up_proj],
                    blk.post_attention_layernorm.weight.detach(),
                    last_rows_divisor=down_smooth,
                )
                la.down, _ = _fused([mlp.down_proj], None, smoothed=down_smooth is None)
                if None in (la.qkv, la.o, la.gate_up, la.down):
                    return None
                la.eps1 = blk.input_layernorm.variance_epsilon
                la.eps2 = blk.post_attention_layernorm.variance_epsilon
                layers.append(la)
            lm_head, final_norm = _fused([model.lm_head], inner.norm.weight.detach())
            if lm_head is None:
                return None
            return cls(model, layers, lm_head, final_norm, inner.norm.variance_epsilon)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T or 1, V] (every position with ``all_positions``, else the last), float32.

        ``attention_mask`` [B, past + T] covers the cached positions and the new ones (0 = padding).
        """
        b, t = input_ids.shape
        past = cache.layers[0].length
        x = F.embedding(input_ids, self.embed)  # [B, T, H]
        cos, sin = self.rotary(x, position_ids)  # [B, T, D] each
        half = self.head_dim // 2
        cos = cos[:, :, None, :]
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None, :]  # rotate_half's signs
        valid = attention_mask.bool()
        if t == 1:
            mask = valid[:, None, None, :]
        else:
            q_pos = torch.arange(past, past + t)[:, None]
            k_pos = torch.arange(past + t)[None, :]
            # A padded query attends to itself too, so no row is fully masked (which would give NaN).
            mask = ((valid[:, None, :] & (k_pos <= q_pos)) | (k_pos == q_pos))[:, None]
        nq, nkv, d = self.n_heads, self.n_kv, self.head_dim
        if self._script is not None:
            cache.reserve(x.new_empty(b, nkv, t, d))
            x = self._script(
                x,
                cos,
                sin,
                mask,
                past,
                keys=[la._k for la in cache.layers],
                values=[la._v for la in cache.layers],
                **self._flat,
            )
            for la in cache.layers:
                la.length = past + t
        layers = () if self._script is not None else self.layers
        for la, kv in zip(layers, cache.layers):
            h = F.rms_norm(x, (x.shape[-1],), la.norm1, la.eps1).view(b * t, -1)
            qkv = la.qkv(h).view(b, t, nq + 2 * nkv, d)
            qk = qkv[:, :, : nq + nkv]
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, dims=-1), sin)
            q = qk[:, :, :nq].transpose(1, 2)
            k_all, v_all = kv.append(qk[:, :, nq:].transpose(1, 2), qkv[:, :, nq + nkv :].transpose(1, 2))
            a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=nq != nkv)
            x = x + la.o(a.transpose(1, 2).reshape(b * t, nq * d)).view(b, t, -1)
            h = F.rms_norm(x, (x.shape[-1],), la.norm2, la.eps2).view(b * t, -1)
            gu = la.gate_up(h)
            inter = gu.shape[-1] // 2
            x = x + la.down(F.silu(gu[:, :inter]) * gu[:, inter:]).view(b, t, -1)
        if not all_positions:
            x = x[:, -1:]
        head = self.lm_head
        h = x.reshape(-1, x.shape[-1])
        if isinstance(head, _Int8Dynamic):
            y = _normed_linear(
                h, self.final_norm, self.final_eps, head.packed, None, head.smooth, SPLIT_INT8, head.qw, head.qs
            )
        else:
            y = head(F.rms_norm(h, (h.shape[-1],), self.final_norm, self.final_eps))
        return y.view(b, x.shape[1], -1)
