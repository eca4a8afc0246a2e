"""Quantization: every scheme runs on CPU close to dense, odd shapes are handled, artifacts reload exactly."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from raydist.compress.quant.codes import pick_group_size, quantize_int4_groupwise, unpack_int4
from raydist.compress.quant.format import load_compressed, save_compressed
from raydist.compress.quant.layer import (
    SCHEMES,
    QuantizedLinear,
    check_scheme,
    int8_dynamic_matmul,
    pack_int8_dynamic,
    preferred_kernel,
)
from raydist.compress.quant.quantize import quantize_model, quantized_layers
from raydist.config import ModelConfig
from raydist.core.models import load_model

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
IDS = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model():
    return load_model(ModelConfig(path="tiny-random", tiny=TINY), seed=0).eval()


def odd_model():
    """SmolLM2's awkward widths in miniature: hidden 72 (no int4 group divides it), intermediate 192
    (128 does not divide it, 64 does)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=72,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids=IDS):
    return model(input_ids=ids).logits


def relative_error(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(
    "scheme,kernel,tol",
    [
        ("int8_weight_only", "dequantized", 0.02),
        ("int8_dynamic", preferred_kernel("int8_dynamic", "cpu"), 0.05),
        ("int4_weight_only", "dequantized", 0.25),
    ],
)
def test_each_scheme_runs_on_cpu_close_to_dense(scheme, kernel, tol):
    dense = tiny_model()
    model = copy.deepcopy(dense)
    report = quantize_model(model, scheme)
    q = quantized_layers(model)
    assert len(q) == TINY["num_layers"] * len(BLOCK_LINEARS)
    assert report["quantized_layers"] == len(q) and report["skipped_layers"] == 0
    assert {m.kernel for m in q.values()} == {kernel} and report["kernel"] == kernel
    # Only the dynamic int8 kernels are faster than dense on CPU (measured); the others must say so.
    assert report["speedup_expected"] is (scheme == "int8_dynamic")
    assert report["bytes_after"] < report["bytes_before"]
    err = relative_error(logits(model), logits(dense))
    assert 0 < err < tol, err


def test_two_code_int8_packing_is_the_exact_8bit_product_where_one_code_would_saturate():
    # The worst case for fbgemm without VNNI: activations at the top of the 8-bit range times weights of +-127
    # (pairs of u8 x s8 products overflow int16 there). Activations sit on fbgemm's grid (min 0, max 1: scale
    # 1/255, zero point 0), so the exact result is known in integers, on any CPU.
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(200, 256, (5, 64), generator=g)
    codes[0, 0], codes[1, 1] = 0, 255  # the range fbgemm derives: [0, 1]
    x = codes.float() / 255
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=g)
    q[:8] = 127
    q[8:16] = -127
    scale = torch.rand(48, generator=g) + 0.5
    exact = (codes.double() @ q.double().t()) / 255 * scale.double()
    y = int8_dynamic_matmul(x, pack_int8_dynamic(q, scale, split=True), split=True)
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-3)


def test_quantized_models_deepcopy_and_pickle_with_their_kernels_rebuilt():
    import pickle

    model = tiny_model()
    quantize_model(model, "int8_dynamic")
    ref = logits(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(other), ref)
        assert {m.kernel for m in quantized_layers(other).values()} == {preferred_kernel("int8_dynamic", "cpu")}


def test_int4_layer_matches_its_dequantized_weight_and_packing_roundtrips():
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 48, bias=True)
    packed, scale, zero = quantize_int4_groupwise(lin.weight, 32)
    q = unpack_int4(packed)
    assert packed.shape == (48, 64) and q.max() <= 15 and scale.shape == (48, 4)
    ql = QuantizedLinear.from_linear(lin, "int4_weight_only", 32)
    ql.prepare()
    x = torch.randn(3, 5, 128)
    ref = torch.nn.functional.linear(x, ql.dequantized_weight(), lin.bias)
    assert torch.allclose(ql(x), ref, atol=1e-5)
    # 4 bits over a group's range: error per weight is at most half a step
    step = scale.repeat_interleave(32, dim=1)
    assert ((ql.dequantized_weight() - lin.weight).abs() <= step / 2 + 1e-6).all()


def test_hqq_int4_uses_the_same_format_and_stays_close():
    dense = tiny_model()
    model = copy.deepcopy(dense)
    report = quantize_model(model, "int4_weight_only", group_size=32, int4_algorithm="hqq")
    assert report["int4_algorithm"] == "hqq"
    q = model.model.layers[0].mlp.up_proj
    assert q.qweight.dtype == torch.uint8 and unpack_int4(q.qweight).max() <= 15 and q.scale.shape == (128, 2)
    assert relative_error(logits(model), logits(dense)) < 0.25
    with pytest.raises(ValueError, match="int4_algorithm 'awq'"):
        quantize_model(copy.deepcopy(dense), "int4_weight_only", int4_algorithm="awq")


def test_cpu_kernels_that_lost_the_measurement_are_still_correct_when_forced():
    dense = tiny_model()
    for scheme, kernel in (("int8_weight_only", "aten.int8pack_mm"), ("int4_weight_only", "torchao.int4_opaque_cpu")):
        model = copy.deepcopy(dense)
        ref = copy.deepcopy(dense)
        quantize_model(ref, scheme, kernel="dequantized")
        report = quantize_model(model, scheme, kernel=kernel)
        assert report["kernel"] == kernel
        assert torch.allclose(logits(model), logits(ref), atol=1e-3, rtol=1e-3)


def test_smoothquant_calibration_is_exact_before_rounding_and_survives_a_reload(tmp_path, tiny_tokenizer):
    dense = tiny_model()
    cal = torch.randint(4, 512, (4, 32), generator=torch.Generator().manual_seed(5))
    model = copy.deepcopy(dense)
    report = quantize_model(model, "int8_dynamic", calibration=cal, smoothing_alpha=0.5)
    assert report["smoothing"] == {"alpha": 0.5, "calibration_tokens": 128}
    q = model.model.layers[0].mlp.down_proj
    assert q.smooth is not None and not torch.allclose(q.smooth, torch.ones_like(q.smooth))
    att, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # layers reading the same input share one vector (SmoothQuant folds it into the norm before them)
    assert torch.equal(att.q_proj.smooth, att.k_proj.smooth) and torch.equal(att.q_proj.smooth, att.v_proj.smooth)
    assert torch.equal(mlp.gate_proj.smooth, mlp.up_proj.smooth) and not torch.equal(mlp.up_proj.smooth, q.smooth)
    # the smoothed layer still stands for the original weight (dequantized = W within int8 rounding)
    w = dense.model.layers[0].mlp.down_proj.weight
    assert relative_error(q.dequantized_weight(), w) < 0.02
    assert relative_error(logits(model), logits(dense)) < 0.05
    save_compressed(model, tiny_tokenizer, tmp_path / "sq", report)
    # on disk (compressed-tensors) the vectors are folded into the norms and row scales in front: the reload has no
    # smooth vectors left and the same logits up to float rounding (a division moved from the input to a weight)
    again = load_compressed(tmp_path / "sq")
    assert all(m.smooth is None for m in quantized_layers(again).values())
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="int8_dynamic .SmoothQuant. and int4 GPTQ only, not int8_weight_only"):
        quantize_model(copy.deepcopy(dense), "int8_weight_only", calibration=cal)
    with pytest.raises(ValueError, match="smoothing_alpha"):
        quantize_model(copy.deepcopy(dense), "int8_dynamic", calibration=cal, smoothing_alpha=1.5)


def test_embeddings_and_tied_lm_head_untouched_by_default():
    dense = tiny_model()
    model = copy.deepcopy(dense)
    quantize_model(model, "int8_dynamic")
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert not any(n.startswith("lm_head") or "embed" in n for n in quantized_layers(model))

    with_head = copy.deepcopy(dense)
    report = quantize_model(with_head, "int8_weight_only", include_lm_head=True)
    assert isinstance(with_head.lm_head, QuantizedLinear) and "lm_head" in report["layers"]
    assert torch.equal(with_head.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert with_head.config.tie_word_embeddings is False


def test_group_sizes_that_do_not_divide_are_handled_per_layer():
    assert pick_group_size(576, 128) == 64 and pick_group_size(1536, 128) == 128 and pick_group_size(72, 64) is None
    dense = odd_model()
    for requested in (64, 128):
        model = copy.deepcopy(dense)
        report = quantize_model(model, "int4_weight_only", group_size=requested)
        layers = report["layers"]
        down = layers["model.layers.0.mlp.down_proj"]  # in_features 192: 128 does not divide, 64 does
        assert down["group_size"] == 64 and model.model.layers[0].mlp.down_proj.group_size == 64
        q = layers["model.layers.0.self_attn.q_proj"]  # in_features 72: no supported group divides it
        assert "skipped" in q and "72" in q["skipped"]
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert report["quantized_layers"] == 2 and report["skipped_layers"] == 12
        assert torch.isfinite(logits(model)).all()


def test_bad_requests_raise_value_errors_naming_the_value_and_change_nothing():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        check_scheme("int3")
    for bad in (48, 0, 256):
        with pytest.raises(ValueError, match=f"group_size {bad}"):
            check_scheme("int4_weight_only", bad)
    with pytest.raises(ValueError, match="int4_weight_only only"):
        check_scheme("int8_dynamic", 64)
    with pytest.raises(ValueError, match="'meta'"):
        check_scheme("int8_dynamic", device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            check_scheme("int4_weight_only", 64, "cuda")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="group_size 96"):
        quantize_model(model, "int4_weight_only", group_size=96)
    with pytest.raises(ValueError, match="unknown kernel"):
        quantize_model(model, "int8_dynamic", kernel="fast")
    assert not quantized_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    quantize_model(model, "int8_dynamic")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8_dynamic")


def _block_weight_bytes(path):
    (weights,) = path.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        return sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()
            if ".layers." in k and k.rsplit(".", 2)[-2] in BLOCK_LINEARS
        )


def test_save_load_reproduces_logits_exactly_and_bytes_shrink(tmp_path, tiny_tokenizer):
    dense = tiny_model()
    save_compressed(dense, tiny_tokenizer, tmp_path / "dense")
    dense_bytes = _block_weight_bytes(tmp_path / "dense")
    sizes = {}
    for scheme in SCHEMES:
        model = copy.deepcopy(dense)
        report = quantize_model(model, scheme)
        manifest = save_compressed(model, tiny_tokenizer, tmp_path / scheme, report, metrics={"ppl": 1.0})
        assert manifest["quantization"]["scheme"] == scheme and manifest["compression"]["scheme"] == scheme
        again = load_compressed(tmp_path / scheme)
        assert {m.kernel for m in quantized_layers(again).values()} == {report["kernel"]}
        assert torch.equal(logits(again), logits(model)), scheme
        sizes[scheme] = _block_weight_bytes(tmp_path / scheme)
        on_disk = json.loads((tmp_path / scheme / "raydist.json").read_text())
        assert on_disk["weight_bytes"] < manifest["weight_bytes"] + 1 and on_disk["num_parameters"] == sum(
            p.numel() for p in dense.parameters()
        )
    # int8: 1 byte per weight + one fp32 scale per row (K = 64 or 128 here) ~ 1/4 of fp32
    for scheme in ("int8_weight_only", "int8_dynamic"):
        assert 0.25 <= sizes[scheme] / dense_bytes < 0.28
    # int4 g64: half a byte per weight + two fp32 per 64 weights ~ 0.156 of fp32
    assert sizes["int4_weight_only"] / dense_bytes < 0.17


def test_float_and_sparse_dirs_load_through_load_compressed(tmp_path, tiny_tokenizer):
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.up_proj.weight
            w[w.abs() < w.abs().median()] = 0  # 50 % unstructured sparsity
    manifest = save_compressed(model, tiny_tokenizer, tmp_path / "sparse", {"method": "magnitude", "sparsity": 0.5})
    assert "quantization" not in manifest and manifest["compression"]["bytes_shrink"] is False
    again = load_compressed(tmp_path / "sparse")
    assert torch.equal(logits(again), logits(model))
    with pytest.raises(FileExistsError):
        save_compressed(model, tiny_tokenizer, tmp_path / "sparse")


def test_minmax_qparams_and_codes_equal_compressed_tensors_asymmetric_int4():
    # raydist's int4 grid (q - 8) * scale + zero with zero = (8 - z) * scale is compressed-tensors' (q' - z') * scale:
    # same scales, zero points and codes as its own qparams and quantize for asymmetric int4 groups.
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from raydist.compress.quant.codes import int4_codes_on_grid, int4_minmax_qparams, int4_zero_points

    w = torch.randn(48, 192) * torch.linspace(0.01, 3.0, 192)
    w[5, 64:96] = w[5, 64:96].abs() + 0.5  # an all-positive group: 0 joins its range, zero point 0
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    groups = w.reshape(48, -1, 32)
    ref_s, ref_z = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scale, zero = int4_minmax_qparams(w, 32)
    torch.testing.assert_close(scale, ref_s, rtol=1e-6, atol=0)
    assert torch.equal(int4_zero_points(scale, zero) - 8, ref_z.to(torch.int64))
    ref_q = quantize(w, ref_s, ref_z, args, dtype=torch.int8)
    assert torch.equal(int4_codes_on_grid(w, scale, zero).to(torch.int64) - 8, ref_q.to(torch.int64))


def test_hqq_is_refused_outside_the_tested_torchao_versions(monkeypatch):
    import torchao

    from raydist.compress.quant.codes import HQQ_TORCHAO_VERSIONS, quantize_int4_groupwise

    monkeypatch.setattr(torchao, "__version__", HQQ_TORCHAO_VERSIONS[1] + ".0")
    with pytest.raises(RuntimeError, match="private torchao function tested with torchao"):
        quantize_int4_groupwise(torch.randn(8, 64), 32, "hqq")
