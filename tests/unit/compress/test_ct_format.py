"""Quantized artifacts in the compressed-tensors format: transformers (with compressed-tensors) loads every scheme
raydist produces with raydist's logits, the bytes are the scheme's, smoothing is folded or refused, the serving
engine serves the same files, and artifacts in raydist's earlier layout still load."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raydist.compress.quant.ct_format import checkpoint_config, transformers_load_kwargs
from raydist.compress.quant.format import LEGACY_WEIGHTS_FILE, load_compressed, save_compressed
from raydist.compress.quant.quantize import quantize_model, quantized_layers
from raydist.config import ModelConfig
from raydist.core.models import load_model

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
IDS = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
CAL = torch.randint(4, 512, (4, 32), generator=torch.Generator().manual_seed(5))

# (scheme, quantize_model kwargs, max |transformers - raydist| over max |logit|). Weight-only: float rounding.
# int8_dynamic: compressed-tensors quantizes activations symmetrically per token, raydist's fbgemm kernel on each
# row's own asymmetric grid, so the two differ by 8-bit activation rounding.
CASES = [
    ("int8_weight_only", {}, 1e-5),
    ("int4_weight_only", {"group_size": 32}, 1e-5),
    ("int4_weight_only", {"group_size": 32, "int4_algorithm": "gptq", "calibration": CAL}, 1e-5),
    ("int8_dynamic", {"calibration": CAL, "include_lm_head": True}, 2e-2),
]


def tiny_model():
    return load_model(ModelConfig(path="tiny-random", tiny=TINY), seed=0).eval()


@torch.no_grad()
def logits(model):
    return model(IDS).logits


def from_transformers(path, scheme):
    from transformers import AutoModelForCausalLM

    kwargs = transformers_load_kwargs(checkpoint_config(path))
    # int4 needs dequantize=True (compressed-tensors 0.20's compressed load mis-sizes asymmetric zero points)
    assert ("quantization_config" in kwargs) == (scheme == "int4_weight_only")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("scheme,kwargs,tol", CASES, ids=["int8_wo", "int4_minmax", "int4_gptq", "int8_dynamic"])
def test_transformers_loads_each_scheme_with_raydists_logits(tmp_path, tiny_tokenizer, scheme, kwargs, tol):
    model = tiny_model()
    report = quantize_model(model, scheme, **kwargs)
    save_compressed(model, tiny_tokenizer, tmp_path / "q", report)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"

    ours = logits(load_compressed(tmp_path / "q"))
    torch.testing.assert_close(ours, logits(model), rtol=0, atol=1e-5)  # raydist's loader: the model saved
    theirs = logits(from_transformers(tmp_path / "q", scheme))
    assert (theirs - ours).abs().max() <= tol * ours.abs().max()


def test_bytes_are_the_schemes_and_mixed_group_sizes_are_written_at_the_smallest(tmp_path, tiny_tokenizer):
    # SmolLM2 in miniature: hidden 96 (group 128 does not divide it, 32 does), MLP 256 (128 divides it). Asked for
    # 128, raydist quantizes the 96-wide layers at 32 and down_proj at 128; the artifact has one group size, 32:
    # down_proj's scales and zero points repeat 4 times (the same grid), so every loader takes it.
    tiny = {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
    model = load_model(ModelConfig(path="tiny-random", tiny=tiny), seed=0).eval()
    quantize_model(model, "int4_weight_only", group_size=128)
    sizes = {n: m.group_size for n, m in quantized_layers(model).items()}
    assert sorted(set(sizes.values())) == [32, 128]
    save_compressed(model, tiny_tokenizer, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == [32]
    assert qc["format"] == "pack-quantized" and "lm_head" in qc["ignore"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        for name in sizes:
            n, k = f.get_tensor(f"{name}.weight_shape").tolist()
            assert f.get_tensor(f"{name}.weight_packed").nbytes == n * k // 2  # 4 bits per weight
            assert f.get_tensor(f"{name}.weight_scale").shape == (n, k // 32)
            assert f.get_tensor(f"{name}.weight_zero_point").nbytes == n * (k // 32) // 2
    torch.testing.assert_close(logits(load_compressed(tmp_path / "q")), logits(model), rtol=0, atol=1e-5)
    got = logits(from_transformers(tmp_path / "q", "int4_weight_only"))
    torch.testing.assert_close(got, logits(model), rtol=0, atol=1e-5)


def test_smoothing_that_cannot_be_folded_is_refused_before_anything_is_written(tmp_path, tiny_tokenizer):
    model = tiny_model()
    report = quantize_model(model, "int8_dynamic", calibration=CAL)
    att = model.model.layers[0].self_attn
    # o_proj's vector is one per value channel (query heads sharing a value head agree), so it folds into v_proj
    s = att.o_proj.smooth.reshape(2, 2, -1)
    assert torch.equal(s[:, 0], s[:, 1])
    broken = copy.deepcopy(model)
    broken.model.layers[0].self_attn.k_proj.smooth = att.k_proj.smooth * 1.5  # q/k/v no longer share one
    with pytest.raises(ValueError, match="input_layernorm.*different vectors"):
        save_compressed(broken, tiny_tokenizer, tmp_path / "bad", report)
    assert not (tmp_path / "bad").exists()
    broken = copy.deepcopy(model)
    o = broken.model.layers[1].self_attn.o_proj
    o.smooth = o.smooth * torch.linspace(1, 2, o.smooth.numel())  # differs between query heads
    with pytest.raises(ValueError, match="o_proj.*share a value head"):
        save_compressed(broken, tiny_tokenizer, tmp_path / "bad", report)


def test_an_artifact_in_the_earlier_raydist_layout_loads_with_a_warning(tmp_path, tiny_tokenizer):
    model = tiny_model()
    quantize_model(model, "int8_dynamic", calibration=CAL)
    old = tmp_path / "old"
    save_compressed(tiny_model(), tiny_tokenizer, old)  # config, tokenizer, manifest; then the old layout by hand
    (old / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, str(old / LEGACY_WEIGHTS_FILE))
    manifest = json.loads((old / "raydist.json").read_text())
    manifest["quantization"] = {
        "format": 1,
        "scheme": "int8_dynamic",
        "layers": {
            n: {
                "scheme": m.scheme,
                "group_size": None,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": False,
                "smoothed": m.smooth is not None,
            }
            for n, m in quantized_layers(model).items()
        },
    }
    (old / "raydist.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="save_compressed it again"):
        again = load_compressed(old)
    assert torch.equal(logits(again), logits(model))


def test_the_serving_engine_serves_the_compressed_tensors_files(tmp_path, tiny_tokenizer):
    from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams
    from raydist.serve.loading import load_served_model

    model = tiny_model()
    report = quantize_model(model, "int8_dynamic", calibration=CAL, include_lm_head=True)
    save_compressed(model, tiny_tokenizer, tmp_path / "q", report)
    served, tok, _ = load_served_model(str(tmp_path / "q"), None, "cpu", "auto")
    engine = BatchGenerator(served, tok)
    assert engine.fast is not None  # the fused int8 fast path takes the reloaded (folded) layers
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerationRequest(IDS[0].tolist(), params)])[0]
    ref = BatchGenerator(model, tiny_tokenizer, fast=False).generate([GenerationRequest(IDS[0].tolist(), params)])[0]
    assert out.token_ids == ref.token_ids
