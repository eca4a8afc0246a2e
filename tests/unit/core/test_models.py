import pytest
import torch

from raydist.config import ModelConfig
from raydist.core.models import (
    ModelSourceError,
    count_parameters,
    load_model,
    load_model_config,
    resolve_model_source,
    save_model_dir,
)


def test_tiny_random_is_seeded_and_gqa():
    cfg = ModelConfig(path="tiny-random", tiny={"num_heads": 4, "num_kv_heads": 2})
    a, b = load_model(cfg, seed=3), load_model(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.model.layers[0].self_attn.k_proj.out_features == 2 * (64 // 4)
    assert not torch.equal(next(load_model(cfg, seed=4).parameters()), next(a.parameters()))


def test_hf_dir_roundtrip_and_source_kinds(tmp_path, tiny_tokenizer):
    model = load_model(ModelConfig(path="tiny-random"))
    save_model_dir(model, tiny_tokenizer, tmp_path / "m")
    src = resolve_model_source(ModelConfig(path=str(tmp_path / "m")))
    assert src.kind == "hf_dir"
    again = load_model(ModelConfig(path=str(tmp_path / "m")))
    ids = torch.arange(10)[None]
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert count_parameters(again) == count_parameters(model)
    assert load_model_config(ModelConfig(path=str(tmp_path / "m"))).model_type == "llama"


def test_source_resolution_errors(tmp_path):
    assert resolve_model_source(ModelConfig(path="HuggingFaceTB/SmolLM2-135M")).kind == "hub"
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_model_source(ModelConfig(path="./no/such/model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="without config.json or a .gguf"):
        resolve_model_source(ModelConfig(path=str(tmp_path / "empty")))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_model_source(ModelConfig(path=str(tmp_path / "w.bin")))
    g = tmp_path / "g"
    g.mkdir()
    (g / "a.gguf").write_bytes(b"x")
    (g / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="several .gguf"):
        resolve_model_source(ModelConfig(path=str(g)))
    src = resolve_model_source(ModelConfig(path=str(g), gguf_file="b.gguf"))
    assert src.kind == "gguf" and src.gguf_file == "b.gguf"
    assert resolve_model_source(ModelConfig(path=str(g / "a.gguf"))).gguf_file == "a.gguf"
