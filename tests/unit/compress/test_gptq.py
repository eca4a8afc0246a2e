"""GPTQ: the column sweep reduces to round-to-nearest without error feedback, beats it on a layer's output
with correlated inputs, and produces int4 layers that save, reload and compute what GPTQ chose."""

import copy

import pytest
import torch

from raydist.compress.quant.codes import int4_minmax_qparams, int4_round, quantize_int4_groupwise, unpack_int4
from raydist.compress.quant.format import load_compressed, save_compressed
from raydist.compress.quant.gptq import _gptq_weight
from raydist.compress.quant.quantize import quantize_model, quantized_layers
from raydist.config import ModelConfig
from raydist.core.models import load_model

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
CAL = torch.randint(4, 512, (8, 32), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_model():
    return load_model(ModelConfig(path="tiny-random", tiny=TINY), seed=0).eval()


def test_column_quantizer_is_torchaos_minmax_rounding():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    packed, scale, zero = quantize_int4_groupwise(w, 32, "minmax")
    for g in range(2):
        s, z = (t[:, 0] for t in int4_minmax_qparams(w[:, g * 32 : (g + 1) * 32], 32))
        assert torch.equal(s, scale[:, g]) and torch.equal(z, zero[:, g])
        codes = torch.stack([int4_round(w[:, c], s, z) for c in range(g * 32, (g + 1) * 32)], dim=1)
        assert torch.equal(codes.to(torch.uint8), unpack_int4(packed)[:, g * 32 : (g + 1) * 32])


@pytest.mark.parametrize("actorder", [False, True])
def test_with_an_identity_hessian_gptq_is_round_to_nearest(actorder):
    # H = I: no column's error moves to another (H^-1 is diagonal), so every weight is just rounded.
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    codes, scale, zero, deq = _gptq_weight(
        w.clone(), torch.eye(128), 32, blocksize=48, percdamp=0.0, actorder=actorder, name="w"
    )
    packed, s_ref, z_ref = quantize_int4_groupwise(w, 32, "minmax")
    assert torch.equal(codes, unpack_int4(packed)) and torch.equal(scale, s_ref) and torch.equal(zero, z_ref)
    assert torch.allclose(
        deq, (codes.float().view(24, 4, 32) - 8).mul(scale[..., None]).add(zero[..., None]).view(24, 128)
    )


@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_preserves_the_layer_output_better_than_rounding(actorder):
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(96, 96, generator=gen) / 96**0.5
    x = torch.randn(2048, 96, generator=gen) @ (torch.eye(96) + 2 * mix)  # correlated inputs
    x[:, :4] *= 10  # a few outlier channels, as in real activations
    w = torch.randn(40, 96, generator=gen)
    H = 2 * x.T @ x / x.shape[0]
    codes, scale, zero, deq = _gptq_weight(w.clone(), H, 32, blocksize=32, percdamp=0.01, actorder=actorder, name="w")
    packed, s_rtn, z_rtn = quantize_int4_groupwise(w, 32, "minmax")
    rtn = (unpack_int4(packed).float().view(40, 3, 32) - 8).mul(s_rtn[..., None]).add(z_rtn[..., None]).view(40, 96)
    err_gptq = (x @ (deq - w).T).norm()
    err_rtn = (x @ (rtn - w).T).norm()
    assert err_gptq < 0.8 * err_rtn
    assert codes.max() <= 15 and codes.dtype == torch.uint8


def test_gptq_model_quantizes_reloads_and_beats_rounding_on_its_calibration_text(tmp_path, tiny_tokenizer):
    dense = tiny_model()
    model = copy.deepcopy(dense)
    report = quantize_model(model, "int4_weight_only", group_size=32, int4_algorithm="gptq", calibration=CAL)
    assert report["int4_algorithm"] == "gptq" and report["quantized_layers"] == 14
    assert report["gptq"]["calibration_tokens"] == CAL.numel() and report["gptq"]["actorder"] is True
    layers = quantized_layers(model)
    assert {q.group_size for q in layers.values()} == {32}
    rtn = copy.deepcopy(dense)
    quantize_model(rtn, "int4_weight_only", group_size=32)
    with torch.no_grad():
        ref = dense(input_ids=CAL).logits

        def err(m):
            return float((m(input_ids=CAL).logits - ref).norm())

        assert err(model) < err(rtn)
    save_compressed(model, tiny_tokenizer, tmp_path / "gptq", report)
    again = load_compressed(tmp_path / "gptq")
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_gptq_refuses_missing_calibration_and_stray_options_before_touching_the_model():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(model, "int4_weight_only", int4_algorithm="gptq")
    with pytest.raises(ValueError, match="int4_algorithm='gptq' only"):
        quantize_model(model, "int4_weight_only", gptq={"percdamp": 0.1})
    with pytest.raises(ValueError, match="percdamp"):
        quantize_model(model, "int4_weight_only", int4_algorithm="gptq", calibration=CAL, gptq={"percdamp": -1})
    assert not quantized_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
