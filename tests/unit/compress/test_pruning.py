"""Structured pruning: shapes shrink, configs round-trip through transformers, importance decides.

The strongest checks build models where some units provably contribute nothing (zeroed weights) and
assert that (a) importance ranks them last and (b) removing them leaves the logits unchanged.
"""

import math

import pytest
import torch

from raydist.compress.structured import (
    Importance,
    collect_importance,
    drop_layers,
    estimate_parameters,
    kept_count,
    plan_pruning,
    prune_heads,
    prune_hidden,
    prune_mlp,
    prune_model,
)
from raydist.config import ModelConfig
from raydist.core.models import count_parameters, load_model

TINY = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


def tiny_model(**overrides):
    return load_model(ModelConfig(path="tiny-random", tiny={**TINY, **overrides}), seed=0).eval()


def smollm2_shaped_model(bias=False):
    """SmolLM2's awkward ratios in miniature: 9 heads / 3 KV heads, widths that 8 divides but 64 does not."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=72,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def calib(n=3, b=2, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (b, t), generator=g) for _ in range(n)]


IDS = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model, ids=IDS):
    return model(input_ids=ids).logits


def reload(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "pruned")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()


def assert_reloads_identically(model, tmp_path):
    again = reload(model, tmp_path)
    assert count_parameters(again) == count_parameters(model)
    assert torch.equal(logits(again), logits(model))
    return again


# ---------------------------------------------------------------------------------------------- importance


def test_importance_shapes_and_padding_is_ignored():
    model = tiny_model()
    batches = calib()
    imp = collect_importance(model, batches)
    assert imp.layers.shape == (4,) and imp.mlp.shape == (4, 128) and imp.heads.shape == (4, 4)
    assert imp.kv_groups.shape == (4, 2) and imp.hidden.shape == (64,)
    assert imp.num_tokens == 3 * 2 * 24
    assert torch.allclose(imp.kv_groups, imp.heads.reshape(4, 2, 2).sum(-1))
    assert (imp.mlp >= 0).all() and (imp.layers > 0).all()

    # Right padding: real tokens see the same causal context, so scores over real tokens are unchanged.
    pad = torch.zeros(2, 5, dtype=torch.long)
    padded = [
        {"input_ids": torch.cat([x, pad], 1), "attention_mask": torch.cat([torch.ones_like(x), pad], 1)}
        for x in batches
    ]
    imp_padded = collect_importance(model, padded)
    assert imp_padded.num_tokens == imp.num_tokens
    for k in ("layers", "mlp", "heads", "hidden"):
        assert torch.allclose(getattr(imp_padded, k), getattr(imp, k), atol=1e-5), k
    model.train()
    collect_importance(model, batches[:1], what=("mlp",))
    assert model.training


def test_importance_only_what_was_asked_and_unknown_kind():
    model = tiny_model()
    imp = collect_importance(model, calib(n=1), what="mlp")
    assert imp.mlp is not None and imp.layers is None and imp.heads is None and imp.hidden is None
    with pytest.raises(ValueError, match="unknown importance kinds"):
        collect_importance(model, calib(n=1), what=("neurons",))
    with pytest.raises(ValueError, match="no calibration tokens"):
        collect_importance(model, [])


# ---------------------------------------------------------------------------------------------- MLP


def test_prune_mlp_removes_dead_channels_without_changing_logits(tmp_path):
    model = tiny_model()
    dead = torch.arange(0, 128, 2)  # every even channel: up_proj row zero -> act * 0 == 0 exactly
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[dead] = 0
    before, n_before = logits(model), count_parameters(model)
    imp = collect_importance(model, calib(), what=("mlp",))
    assert (imp.mlp[:, dead] == 0).all() and (imp.mlp[:, dead + 1] > 0).all()

    prune_mlp(model, 64, importance=imp)
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (64, 64) and layer.mlp.up_proj.weight.shape == (64, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 64) and layer.mlp.down_proj.in_features == 64
        assert (layer.mlp.up_proj.weight.abs().sum(1) > 0).all()  # only live channels survived
    assert model.config.intermediate_size == 64
    assert n_before - count_parameters(model) == 4 * 3 * 64 * 64
    assert torch.allclose(logits(model), before, atol=1e-5)
    assert_reloads_identically(model, tmp_path)


def test_prune_mlp_with_index_lists_and_bad_lists():
    model = tiny_model()
    ref = model.model.layers[1].mlp.gate_proj.weight[[5, 9, 100]].clone()
    prune_mlp(model, [[0, 1, 2], [100, 5, 9], [3, 4, 5], [7, 8, 9]])
    assert torch.equal(model.model.layers[1].mlp.gate_proj.weight, ref)  # sorted back into original order
    assert model.config.intermediate_size == 3
    with pytest.raises(ValueError, match="same number"):
        prune_mlp(tiny_model(), [[0, 1], [0], [0], [0]])
    with pytest.raises(ValueError, match="distinct"):
        prune_mlp(tiny_model(), [[0, 0], [0, 1], [0, 1], [0, 1]])
    with pytest.raises(ValueError, match="index lists for 4 layers"):
        prune_mlp(tiny_model(), [[0, 1]])
    with pytest.raises(ValueError, match="needs importance.mlp"):
        prune_mlp(tiny_model(), 64)


# ---------------------------------------------------------------------------------------------- heads


def test_prune_heads_removes_silent_group_without_changing_logits(tmp_path):
    model = tiny_model()  # 4 query heads, 2 KV heads, head_dim 16: KV head 1 serves query heads 2, 3
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[16:32] = 0  # KV head 1 carries no values -> heads 2, 3 output 0
    before, n_before = logits(model), count_parameters(model)
    imp = collect_importance(model, calib(), what=("heads",))
    assert (imp.heads[:, 2:] == 0).all() and (imp.heads[:, :2] > 0).all()
    assert (imp.kv_groups[:, 1] == 0).all()

    prune_heads(model, 1, importance=imp)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.q_proj.weight.shape == (32, 64) and a.k_proj.weight.shape == (16, 64)
        assert a.v_proj.weight.shape == (16, 64) and a.o_proj.weight.shape == (64, 32)
        assert a.v_proj.weight.abs().sum() > 0  # the live KV head survived
    assert n_before - count_parameters(model) == 4 * (32 * 64 + 16 * 64 * 2 + 64 * 32)
    assert torch.allclose(logits(model), before, atol=1e-5)
    # hidden 64 / 2 heads = 32 != head_dim 16: the reload only works because head_dim is explicit.
    assert_reloads_identically(model, tmp_path)


def test_prune_heads_by_index_with_zero_o_proj_columns(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :32] = 0  # query heads 0, 1 (KV group 0) write nothing
    before = logits(model)
    prune_heads(model, [[1]] * 4)
    assert torch.allclose(logits(model), before, atol=1e-5)
    assert model.model.layers[0].self_attn.o_proj.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="between 1 and 2"):
        prune_heads(tiny_model(), 0, importance=collect_importance(tiny_model(), calib(n=1), what=("heads",)))


# ---------------------------------------------------------------------------------------------- layers


def test_drop_least_important_layer_keeps_logits_and_generation(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input, cos == 1
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    before = logits(model)
    imp = collect_importance(model, calib(), what=("layers",))
    assert imp.layers.argmin().item() == 2 and imp.layers[2].abs() < 1e-6

    summary = prune_model(model, imp, drop_layers=1)
    assert summary["dropped_layers"] == [2]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    assert summary["params_after"] < summary["params_before"]
    assert torch.allclose(logits(model), before, atol=1e-5)

    # The KV cache is indexed by layer_idx: cached greedy decoding must match uncached decoding.
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **kw)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
    again = assert_reloads_identically(model, tmp_path)
    assert torch.equal(again.generate(prompt, use_cache=True, **kw), cached)


def test_drop_layers_by_index_and_layer_types():
    model = tiny_model()
    model.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"]
    drop_layers(model, [0, 1])
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="cannot drop all"):
        drop_layers(model, [0, 1])
    with pytest.raises(ValueError, match="distinct"):
        drop_layers(tiny_model(), [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        drop_layers(tiny_model(), [4])


# ---------------------------------------------------------------------------------------------- hidden


def test_prune_hidden_removes_dead_channels_without_changing_logits(tmp_path):
    model = tiny_model()
    dead = torch.tensor([3, 17, 40, 63])
    with torch.no_grad():  # residual channels that are zero everywhere: embeddings and every block write
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    imp = collect_importance(model, calib(), what=("hidden",))
    assert (imp.hidden[dead] == 0).all() and (imp.hidden.topk(60).values > 0).all()

    n_before, before = count_parameters(model), logits(model)
    with pytest.raises(ValueError, match="not a multiple of the number of attention heads"):
        prune_hidden(model, 58, importance=imp)  # transformers' LlamaConfig would refuse to load it
    assert count_parameters(model) == n_before
    prune_hidden(model, 60, importance=imp)
    assert model.config.hidden_size == 60 and model.config.head_dim == 16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (512, 60) and model.model.norm.weight.shape == (60,)
    for layer in model.model.layers:
        assert layer.input_layernorm.weight.shape == (60,) and layer.post_attention_layernorm.weight.shape == (60,)
        assert layer.self_attn.q_proj.weight.shape == (64, 60) and layer.self_attn.o_proj.weight.shape == (60, 64)
        assert layer.mlp.up_proj.weight.shape == (128, 60) and layer.mlp.down_proj.weight.shape == (60, 128)
    assert model.model.embed_tokens.weight.abs().sum(0).min() > 0  # the dead channels are the ones gone
    per_layer = (64 + 32 + 32) * 4 + 64 * 4 + 3 * 128 * 4 + 2 * 4  # q,k,v cols; o rows; mlp; norms
    assert n_before - count_parameters(model) == 4 * per_layer + 512 * 4 + 4
    # The RMSNorm gains absorb the sqrt(64 / 60) change of the RMS; only the norm's epsilon differs.
    assert torch.allclose(logits(model), before, atol=1e-4)
    again = assert_reloads_identically(model, tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- all together


def test_prune_model_everything_on_awkward_shapes(tmp_path):
    model = smollm2_shaped_model(bias=True)  # hidden 72, 9 heads / 3 KV, intermediate 192, 3 layers; biases
    imp = collect_importance(model, calib(n=2))
    request = dict(drop_layers=1, mlp_keep_ratio=0.7, kv_groups_keep=2, hidden_keep_ratio=0.8, multiple_of=8)
    plan = plan_pruning(model, imp, **request)
    estimate = estimate_parameters(model, plan)
    summary = prune_model(model, imp, **request)

    assert summary["after"] == {
        "num_hidden_layers": 2,
        "hidden_size": 48,
        "intermediate_size": 136,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    assert summary["params_after"] == estimate == count_parameters(model)
    assert summary["param_fraction"] < 0.8
    assert len(summary["removed_kv_groups"]) == 2 and all(len(g) == 1 for g in summary["removed_kv_groups"])
    assert summary["dropped_layers"] == [int(imp.layers.argmin())]
    assert torch.isfinite(logits(model)).all()
    again = assert_reloads_identically(model, tmp_path)
    out = again.generate(
        IDS[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None
    )
    assert out.shape == (1, 8)


def test_hidden_width_respects_head_count():
    model = smollm2_shaped_model()  # 9 heads: LlamaConfig needs hidden_size % 9 == 0
    imp = collect_importance(model, calib(n=1), what=("hidden",))
    assert plan_pruning(model, imp, hidden_keep_ratio=0.75).hidden_size == 54  # step 9
    assert plan_pruning(model, imp, hidden_keep_ratio=0.5, multiple_of=4).hidden_size == 36  # step 36
    assert plan_pruning(model, imp, hidden_keep_ratio=0.5, multiple_of=4, kv_groups_keep=2).hidden_size == 36
    with pytest.raises(ValueError, match="cannot shrink"):
        plan_pruning(model, imp, hidden_keep_ratio=0.75, multiple_of=8)  # lcm(8, 9) = 72 = hidden_size


def test_kept_count_rounding():
    assert kept_count(576, 0.75, 64) == 448  # 432 rounds to the nearest multiple of 64
    assert kept_count(1536, 0.75) == 1152
    assert kept_count(576, 0.01, 64) == 64  # never rounds to zero
    assert kept_count(10, 0.01) == 1
    assert kept_count(3, 0.5, 8) == 3  # cannot exceed n
    assert kept_count(576, 1.0, 64) == 576
    assert kept_count(990, 1.0, 64) == 990  # ratio 1 never shrinks, even when n is no multiple


@pytest.mark.parametrize(
    "request_, match",
    [
        (dict(kv_groups_keep=0), "between 1 and 2"),
        (dict(kv_groups_keep=3), "between 1 and 2"),
        (dict(drop_layers=4), "between 0 and 3"),
        (dict(drop_layers=[0, 1, 2, 3]), "cannot drop all"),
        (dict(mlp_keep_ratio=0.0), r"\(0, 1\]"),
        (dict(hidden_keep_ratio=1.5), r"\(0, 1\]"),
        (dict(mlp_keep_ratio=0.5, multiple_of=0), "multiple_of"),
    ],
)
def test_impossible_requests_raise_before_touching_the_model(request_, match):
    model = tiny_model()
    imp = collect_importance(model, calib(n=1))
    n = count_parameters(model)
    with pytest.raises(ValueError, match=match):
        prune_model(model, imp, **request_)
    assert count_parameters(model) == n and model.config.num_hidden_layers == 4


def test_missing_importance_fields_raise_before_any_cut():
    model = tiny_model()
    only_layers = collect_importance(model, calib(n=1), what=("layers",))
    with pytest.raises(ValueError, match="mlp"):
        prune_model(model, only_layers, drop_layers=1, mlp_keep_ratio=0.5)
    assert model.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="importance.layers"):
        prune_model(model, Importance(), drop_layers=1)


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_mlp_pruning_by_activation_keeps_perplexity_sane(tmp_path, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydist.core.data import pydoc_topics_text

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tok.encode(pydoc_topics_text()[:40_000], add_special_tokens=False))
    assert ids.numel() > 4096
    calib_batches = [ids[i * 256 : (i + 1) * 256].reshape(2, 128) for i in range(2)]  # 512 tokens
    heldout = ids[-512:].reshape(2, 256)  # thousands of tokens away from the calibration slice

    @torch.no_grad()
    def ppl(m):
        return math.exp(m(input_ids=heldout, labels=heldout).loss.item())

    dense = ppl(model)
    imp = collect_importance(model, calib_batches, what=("mlp",))
    summary = prune_model(model, imp, mlp_keep_ratio=0.75, multiple_of=64)
    assert model.config.intermediate_size == 1152
    assert summary["params_before"] - summary["params_after"] == 30 * 3 * 576 * 384  # a quarter of 1536
    pruned = ppl(model)
    print(f"SmolLM2 pydoc ppl dense {dense:.2f} -> 25% MLP pruned {pruned:.2f} ({pruned / dense:.2f}x)")
    assert math.isfinite(pruned) and pruned < 3 * dense
    again = reload(model, tmp_path)
    assert torch.equal(logits(again, heldout[:1, :64]), logits(model, heldout[:1, :64]))
