"""raydist's int8 AVX2 kernel (raydist.compress.quant.native): exact integer products, the layer and the fallback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from raydist.compress.quant import native
from raydist.compress.quant.layer import QuantizedLinear

needs_kernel = pytest.mark.skipif(
    not native.int8_kernel_available(),
    reason=f"raydist's int8 AVX2 kernel is not used here: {native.int8_kernel_note()}",
)


@needs_kernel
@pytest.mark.parametrize(
    "m,n,k", [(1, 7, 100), (3, 960, 576), (4, 4, 16), (5, 13, 33), (16, 96, 1536), (2, 3, 1), (512, 64, 576)]
)
def test_kernel_equals_the_reference_bit_for_bit_on_any_shape(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g) * 5
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) + 0.1
    y = torch.ops.raydist.int8_linear(x, native.pack_int8(w), s)
    assert y.shape == (m, n) and torch.equal(y, native.int8_linear_reference(x, w, s))


@needs_kernel
def test_kernel_sums_do_not_saturate_at_the_extremes():
    # Every activation code 127 and every weight -128 over K = 4096: pair sums far beyond int16, exact in int32.
    k = 4096
    x = torch.ones(2, k)
    w = torch.full((5, k), -128, dtype=torch.int8)
    y = torch.ops.raydist.int8_linear(x, native.pack_int8(w), torch.ones(5))
    assert torch.equal(y, torch.full((2, 5), -128.0 * k))  # 127 * -128 * k * (1 / 127)


@needs_kernel
def test_kernel_refuses_a_weight_it_did_not_pack():
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.raydist.int8_linear(torch.randn(1, 32), w, torch.ones(8))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.raydist.int8_linear(torch.randn(1, 64), native.pack_int8(w), torch.ones(8))


@needs_kernel
def test_layer_on_the_kernel_matches_fbgemm_within_activation_rounding():
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192, bias=True)
    x = torch.randn(6, 576)
    ours = QuantizedLinear.from_linear(lin, "int8_dynamic")
    assert ours.prepare("raydist.int8_avx2") == "raydist.int8_avx2"
    fb = copy.deepcopy(ours)
    assert fb.prepare("torch.ao.dynamic_int8") == "torch.ao.dynamic_int8"
    y, y_fb, y_float = ours(x), fb(x), lin(x).detach()
    err = float((y - y_float).norm() / y_float.norm())
    assert err < 0.02
    assert float((y - y_fb).norm() / y_float.norm()) < 0.01  # both exact 8x8 products; activation grids differ
    expected = native.int8_linear_reference(x, ours.qweight, ours.scale) + lin.bias.detach()
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_turned_off_it_falls_back_to_fbgemm_and_says_so():
    code = (
        "from raydist.compress.quant import native\n"
        "from raydist.compress.quant.layer import QuantizedLinear\n"
        "import torch\n"
        "q = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), 'int8_dynamic')\n"
        "print(native.int8_kernel_available(), q.prepare())\n"
        "print(native.int8_kernel_note())\n"
    )
    env = dict(os.environ, RAYDIST_NATIVE_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    first, note = out.splitlines()
    assert first.split()[0] == "False" and "RAYDIST_NATIVE_KERNELS=0" in note
    assert first.split()[1] in ("torch.ao.dynamic_int8", "dequantized")  # fbgemm where the torch build has it


@needs_kernel
def test_own_threads_under_passive_openmp_are_exact_also_from_two_callers_at_once():
    # With OMP_WAIT_POLICY=PASSIVE (Ray Serve replicas) the kernel runs on its own spinning workers; a second
    # caller while they are busy computes on its own thread. Both must give the reference, every time.
    code = (
        "import threading, torch\n"
        "from raydist.compress.quant import native\n"
        "assert native.int8_kernel_available(), native.int8_kernel_note()\n"
        "torch.set_num_threads(2)\n"
        "bad = []\n"
        "def work(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    for i in range(60):\n"
        "        m = (1, 3, 16)[i % 3]\n"
        "        x = torch.randn(m, 576, generator=g)\n"
        "        w = torch.randint(-128, 128, (200, 576), dtype=torch.int8, generator=g)\n"
        "        s = torch.rand(200, generator=g)\n"
        "        y = torch.ops.raydist.int8_linear(x, native.pack_int8(w), s)\n"
        "        bad.append(not torch.equal(y, native.int8_linear_reference(x, w, s)))\n"
        "ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "print(len(bad), sum(bad))\n"
    )
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["120", "0"]


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 7, 100), (16, 96, 576), (5, 13, 33)])
def test_fused_rms_norm_product_matches_norm_then_product(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g) * 3
    norm = torch.rand(k, generator=g) + 0.5
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) + 0.1
    y = torch.ops.raydist.int8_linear_rms(x, norm, 1e-5, native.pack_int8(w), s)
    ref = native.int8_linear_rms_reference(x, norm, 1e-5, w, s)
    # The norm's sum of squares is taken in another order than torch's: an activation code may land one step
    # off where it rounds at .5, which moves an output by at most |w| * scale * the row's activation scale.
    xn = torch.nn.functional.rms_norm(x, (k,), norm, 1e-5)
    step = (xn.abs().amax(dim=1, keepdim=True) / 127) * 127 * s
    assert y.shape == (m, n)
    assert ((y - ref).abs() <= 2 * step).all()
    # and elsewhere only the last bits of the scales differ
    assert ((y - ref).abs() > 1e-5 * ref.abs().max()).float().mean() < 0.05


@needs_kernel
@pytest.mark.parametrize("b,nq,nkv,d,length,cap", [(1, 9, 3, 64, 1, 4), (3, 9, 3, 64, 80, 96), (2, 4, 4, 16, 13, 13)])
def test_decode_attention_matches_sdpa_under_padding(b, nq, nkv, d, length, cap):
    g = torch.Generator().manual_seed(b * 100 + length)
    q = torch.randn(b, nq, d, generator=g)
    k, v = torch.randn(b, nkv, cap, d, generator=g) * 2, torch.randn(b, nkv, cap, d, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    for i in range(1, b):  # left padding of different widths; the newest position is always there
        mask[i, : min(i * 5, length - 1)] = False
    got = torch.ops.raydist.decode_attention(q, k, v, mask, d**-0.5)
    want = native.decode_attention_reference(q, k, v, mask, d**-0.5)
    assert got.shape == (b, nq, d)
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)
    # positions past the mask's width and masked ones do not matter
    k2, v2 = k.clone(), v.clone()
    k2[:, :, length:] = 1e4
    v2[0, :, length:] = float("nan")
    if b > 1:
        k2[1, :, 0] = 1e4
    assert torch.equal(torch.ops.raydist.decode_attention(q, k2, v2, mask, d**-0.5), got)


@needs_kernel
def test_decode_attention_refuses_bad_shapes():
    with pytest.raises(RuntimeError, match="head_dim 16, 32, 64 or 128"):
        torch.ops.raydist.decode_attention(
            torch.randn(1, 2, 6),
            torch.randn(1, 1, 3, 6),
            torch.randn(1, 1, 3, 6),
            torch.ones(1, 3, dtype=torch.bool),
            0.5,
        )
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.raydist.decode_attention(
            torch.randn(1, 2, 8),
            torch.randn(1, 1, 3, 8),
            torch.randn(1, 1, 3, 8),
            torch.ones(1, 4, dtype=torch.bool),
            0.5,
        )
