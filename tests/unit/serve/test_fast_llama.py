"""The engine's fast Llama forward: the same logits as transformers' forward, dense and int8, under left padding,
KV-cached decode and continuous-batching merges; and it steps aside for what it does not reproduce."""

import copy

import pytest
import torch

from raydist.compress.quant import native
from raydist.compress.quant.quantize import quantize_model
from raydist.config import ModelConfig
from raydist.core.models import load_model
from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams
from raydist.serve.fast_llama import FastLlama, _Concat, _Dense, _Int8Dynamic


def _model():
    model = load_model(ModelConfig(path="tiny-random"), seed=0).eval()
    model.lm_head.weight = torch.nn.Parameter(  # untied random head: varied continuations
        torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    )
    return model


@pytest.fixture(scope="module")
def dense():
    return _model()


def _requests(tok, **params):
    texts = ["def f(x):", "a much longer prompt about the standard library and its modules", "x"]
    return [
        GenerationRequest(
            tok.encode(t),
            SamplingParams(**{"max_tokens": 10, "temperature": 0, "logprobs": 3, **params}),
            prompt_logprobs=2,
        )
        for t in texts
    ]


def _max_logprob_diff(a, b):
    diffs = [0.0]
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.text == y.text
        diffs += [abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)]
        diffs += [abs(p.logprob - q.logprob) for p, q in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:])]
        for p, q in zip(x.logprobs, y.logprobs):
            assert [t for t, _ in p.top] == [t for t, _ in q.top]
    return max(diffs)


def test_dense_fast_path_equals_transformers_forward_batched_and_left_padded(dense, tiny_tokenizer):
    fast, hf = BatchGenerator(dense, tiny_tokenizer), BatchGenerator(dense, tiny_tokenizer, fast=False)
    assert isinstance(fast.fast, FastLlama) and hf.fast is None
    assert isinstance(fast.fast.layers[0].qkv, _Dense) and fast.fast._script is not None  # TorchScript layers
    # decode steps run raydist's attention kernel wherever it is built (so the comparisons below cover it)
    assert fast.fast._flat["native_attention"] == native.int8_kernel_available()
    assert _max_logprob_diff(fast.generate(_requests(tiny_tokenizer)), hf.generate(_requests(tiny_tokenizer))) < 1e-4
    # all positions' logits of a left-padded prefill, straight against the model's forward
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = fast.fast.forward(ids, mask, pos, fast.fast.new_cache(), all_positions=True)
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-4)


def test_a_row_merged_into_a_running_fast_batch_decodes_as_if_alone(dense, tiny_tokenizer):
    engine = BatchGenerator(dense, tiny_tokenizer)
    alone = engine.generate([GenerationRequest(tiny_tokenizer.encode("joins later"), SamplingParams(6, 0.0))])[0]
    state, _ = engine.prefill(_requests(tiny_tokenizer, max_tokens=12, logprobs=None))
    for _ in range(3):
        engine.step(state)
    new, first = engine.prefill([GenerationRequest(tiny_tokenizer.encode("joins later"), SamplingParams(6, 0.0))])
    engine.merge(state, new)
    tokens = [first[0].token_id]
    while not state.done:
        out = engine.step(state)[-1]
        if out is not None:
            tokens.append(out.token_id)
    assert tokens == alone.token_ids
    # the cache grew past its first capacity (prompt + 64) without losing anything
    long = engine.generate([GenerationRequest([5, 6, 7], SamplingParams(80, 0.0, logprobs=0))])[0]
    ref = BatchGenerator(dense, tiny_tokenizer, fast=False).generate(
        [GenerationRequest([5, 6, 7], SamplingParams(80, 0.0, logprobs=0))]
    )[0]
    assert long.token_ids == ref.token_ids
    assert max(abs(p.logprob - q.logprob) for p, q in zip(long.logprobs, ref.logprobs)) < 1e-4


def test_a_longer_prompt_joining_pads_the_running_rows_and_both_decode_as_if_alone(dense, tiny_tokenizer):
    engine = BatchGenerator(dense, tiny_tokenizer)
    short, long = tiny_tokenizer.encode("x"), tiny_tokenizer.encode("a much longer prompt that joins a short batch")
    alone = [engine.generate([GenerationRequest(p, SamplingParams(8, 0.0))])[0].token_ids for p in (short, long)]
    state, first_a = engine.prefill([GenerationRequest(short, SamplingParams(8, 0.0))])
    second_a = engine.step(state)[0]
    new, first_b = engine.prefill([GenerationRequest(long, SamplingParams(8, 0.0))])
    engine.merge(state, new)
    layer = state.cache.layers[0]
    assert layer._k.shape[-2] > layer.length  # the merged cache has room: the next step does not copy it again
    tokens = [[first_a[0].token_id, second_a.token_id], [first_b[0].token_id]]
    while not state.done:
        for i, out in enumerate(engine.step(state)):
            if out is not None:
                tokens[i].append(out.token_id)
    assert tokens == alone


def test_int8_dynamic_layers_are_fused_with_smoothing_folded_and_match_the_quantized_model(dense, tiny_tokenizer):
    model = copy.deepcopy(dense)
    cal = torch.randint(4, 512, (4, 32), generator=torch.Generator().manual_seed(5))
    quantize_model(model, "int8_dynamic", calibration=cal, include_lm_head=True)
    fast, hf = BatchGenerator(model, tiny_tokenizer), BatchGenerator(model, tiny_tokenizer, fast=False)
    layer = fast.fast.layers[0]
    assert isinstance(layer.qkv, _Int8Dynamic) and layer.qkv.smooth is None  # folded into the norm weight
    assert isinstance(layer.down, _Int8Dynamic) and layer.down.smooth is None  # folded into up_proj's rows
    assert isinstance(layer.o, _Int8Dynamic) and layer.o.smooth is not None  # GQA: cannot fold into v_proj
    assert isinstance(fast.fast.lm_head, _Int8Dynamic)
    assert fast.fast._script is not None  # TorchScript compiled the fused int8 layers (else a slower Python loop)
    # int8 activations are rounded on slightly different floats (the folded smoothing): close, not bitwise
    assert _max_logprob_diff(fast.generate(_requests(tiny_tokenizer)), hf.generate(_requests(tiny_tokenizer))) < 2e-2

    # layers smoothed one by one (artifacts from before shared smoothing) run unfused, same results
    att = model.model.layers[0].self_attn
    att.k_proj.smooth = att.k_proj.smooth * 1.5
    unfused = BatchGenerator(model, tiny_tokenizer)
    assert isinstance(unfused.fast.layers[0].qkv, _Concat) and unfused.fast._script is None  # the Python loop
    assert (
        _max_logprob_diff(
            unfused.generate(_requests(tiny_tokenizer)),
            BatchGenerator(model, tiny_tokenizer, fast=False).generate(_requests(tiny_tokenizer)),
        )
        < 2e-2
    )


def test_fast_path_steps_aside_for_what_it_does_not_reproduce(dense, tiny_tokenizer):
    int4 = copy.deepcopy(dense)
    quantize_model(int4, "int4_weight_only", group_size=32)
    assert BatchGenerator(int4, tiny_tokenizer).fast is None
    biased = copy.deepcopy(dense)
    biased.config.attention_bias = True
    assert FastLlama.build(biased) is None
    assert FastLlama.build(dense.model) is None  # not a causal LM with a head
    engine = BatchGenerator(int4, tiny_tokenizer)
    assert engine.generate(_requests(tiny_tokenizer))[0].completion_tokens == 10  # transformers' forward serves it
