"""raydist's own CPU kernels, built on first use: the int8 product (``int8_avx2.cpp``, ops ``raydist::int8_linear``
and ``raydist::int8_linear_rms``) and one decode token's attention (``serve/attention_avx2.cpp``,
``raydist::decode_attention``, used by the serving engine's fast path).

Why it exists: on x86 CPUs with AVX2 but without VNNI, fbgemm (PyTorch's int8 path) sums u8 x s8 products in
saturating int16, so exact 8-bit activations needed each weight packed as two codes (twice the bytes and the
work); this kernel multiplies |w| by the activation carrying w's sign, whose pair sums cannot saturate int16, and
sums those in int32 (exact), reading each int8 weight byte once. It is built
with PyTorch's C++ extension builder (ninja and a C++ compiler, as DeepSpeed's CPU ops need) into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) once per machine; each process then loads
the built library. Where it cannot be built or the CPU lacks AVX2, ``int8_kernel_available()`` is False with
the reason in ``int8_kernel_note()``, and int8_dynamic layers use fbgemm as before.
``RAYDIST_NATIVE_KERNELS=0`` turns it off.

Threads: as many as ``torch.set_num_threads``. Where OpenMP's threads sleep between parallel regions
(``OMP_WAIT_POLICY=PASSIVE``, as in Ray Serve replicas) the kernel uses its own workers, which spin briefly
after a small product (batch <= 4) to catch the next one of the same decode step, then sleep: a wake-up per
product cost about a fifth of the batch-1 decode speed (measured in-process on SmolLM2-135M, 2 cores).
Otherwise it runs on OpenMP's team (a second spinning team would fight it for the cores).
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

SOURCES = [
    Path(__file__).with_name("int8_avx2.cpp"),
    Path(__file__).parents[2] / "serve" / "attention_avx2.cpp",  # one decode token's attention (fast_llama)
]
ROWS_PER_BLOCK = 4  # the kernel's packed layout: [N / 4, K / 32, 4, 32]
K_STEP = 32

# The schema is defined here (not in the C++ file) so TorchScript code can name the op in every process, also
# where the library is not built (it then never calls it).
_LIB = torch.library.Library("raydist", "FRAGMENT")
_LIB.define("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor")
# rms_norm(x, g, eps) then int8_linear in one op (the norm before a decoder layer's first linears).
_LIB.define("int8_linear_rms(Tensor x, Tensor g, float eps, Tensor w, Tensor scale) -> Tensor")
# Attention of one new token per row against the KV cache (serve/attention_avx2.cpp).
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor")

_LOCK = threading.Lock()
_STATE: dict[str, Optional[str]] = {}  # "note": None when loaded, else why not


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _why_not_here() -> Optional[str]:
    if os.environ.get("RAYDIST_NATIVE_KERNELS", "1") == "0":
        return "turned off by RAYDIST_NATIVE_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if " avx2" not in _cpu_flags():
        return "the CPU has no AVX2 (/proc/cpuinfo)"
    return None


def _build() -> None:
    from torch.utils import cpp_extension

    # Ray workers may not have the virtualenv's bin (where pip put ninja) on PATH.
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    root = Path(cpp_extension.get_default_build_root())  # torch may add a py<ver>_<cuda> level below it
    fresh = not any(root.glob("raydist_int8_avx2/*.so")) and not any(root.glob("*/raydist_int8_avx2/*.so"))
    t0 = time.perf_counter()
    if fresh:
        print(f"raydist: building the int8 AVX2 kernel under {root} (once per machine) ...", file=sys.stderr)
    cpp_extension.load(
        name="raydist_int8_avx2",
        sources=[str(src) for src in SOURCES],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    if fresh:
        print(f"raydist: int8 AVX2 kernel built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def int8_kernel_available() -> bool:
    """Whether ``raydist::int8_linear`` runs in this process (built/loaded on the first call, then cached)."""
    with _LOCK:
        if "note" not in _STATE:
            note = _why_not_here()
            if note is None:
                try:
                    _build()
                    x, w = torch.randn(3, 40), torch.randint(-127, 128, (5, 40), dtype=torch.int8)
                    y = torch.ops.raydist.int8_linear(x, pack_int8(w), torch.ones(5))
                    if not torch.equal(y, int8_linear_reference(x, w, torch.ones(5))):
                        raise RuntimeError("the built kernel disagrees with the reference on a test product")
                    q, kv = torch.randn(2, 4, 16), torch.randn(2, 2, 5, 16)
                    m = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
                    a = torch.ops.raydist.decode_attention(q, kv, kv, m.bool(), 0.35)
                    if not torch.allclose(a, decode_attention_reference(q, kv, kv, m, 0.35), atol=1e-5):
                        raise RuntimeError("the built decode attention disagrees with torch's SDPA")
                except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back to fbgemm
                    note = f"could not build or load it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            _STATE["note"] = note
        return _STATE["note"] is None


def int8_kernel_note() -> Optional[str]:
    """Why the kernel is not used here (None when it is, or before :func:`int8_kernel_available` ran)."""
    return _STATE.get("note")


def pack_int8(qweight: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of an int8 weight [N, K]: [ceil(N/4), ceil(K/32), 4, 32], zero-padded, contiguous."""
    n, k = qweight.shape
    np_, kp = -(-n // ROWS_PER_BLOCK) * ROWS_PER_BLOCK, -(-k // K_STEP) * K_STEP
    w = F.pad(qweight.detach().cpu().to(torch.int8), (0, kp - k, 0, np_ - n))
    return w.view(np_ // ROWS_PER_BLOCK, ROWS_PER_BLOCK, kp // K_STEP, K_STEP).permute(0, 2, 1, 3).contiguous()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes of ``x`` [M, K] (as float) and their scales [M, 1]: the kernel's activations."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    inv = torch.full_like(amax, 127.0) / amax  # a true division, as the kernel (127.0 / t is 127 * (1 / t))
    return torch.round(x * inv), amax / 127.0


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What ``raydist::int8_linear`` computes, in plain torch (float64 sums are exact here): [M, N] fp32."""
    qa, sa = quantize_rows(x.float())
    acc = (qa.double() @ qweight.double().T).float()
    return acc * sa * scale.float()


def int8_linear_rms_reference(
    x: torch.Tensor, g: torch.Tensor, eps: float, qweight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """What ``raydist::int8_linear_rms`` computes: torch's rms_norm, then :func:`int8_linear_reference` (the
    kernel sums the squares in another order, so an activation code may differ by one where it rounds at .5)."""
    return int8_linear_reference(F.rms_norm(x.float(), (x.shape[-1],), g.float(), eps), qweight, scale)


def decode_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """What ``raydist::decode_attention`` computes, with torch's SDPA: q [B, nq, d] against the first L = mask's
    width positions of k, v [B, nkv, capacity, d] where mask [B, L] is true; [B, nq, d]."""
    n = mask.shape[1]
    out = F.scaled_dot_product_attention(
        q[:, :, None].float(),
        k[:, :, :n].float(),
        v[:, :, :n].float(),
        attn_mask=mask.bool()[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[:, :, 0]
