"""The serving decode loop: batched rows behave like lone requests, each with its own sampling parameters."""

import pytest
import torch

from raydist.config import ModelConfig
from raydist.core.models import load_model
from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams, _TextTracker


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    model = load_model(ModelConfig(path="tiny-random"), seed=0).eval()
    # Tied random embeddings make greedy decoding repeat the last prompt token; an untied random head
    # gives varied continuations, so the comparisons below mean something.
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    )
    return BatchGenerator(model, tiny_tokenizer)


def _req(engine, text, **params):
    return GenerationRequest(engine.tokenizer.encode(text), SamplingParams(**{"max_tokens": 8, **params}))


def test_batched_greedy_rows_match_hf_generate_one_by_one(engine):
    texts = ["def f(x):", "a much longer prompt about the standard library", "x"]
    batch = engine.generate([_req(engine, t, temperature=0) for t in texts])
    for t, got in zip(texts, batch):
        ids = engine.tokenizer.encode(t)
        ref = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=engine.pad_id,
        )
        ref_ids = [i for i in ref[0, len(ids) :].tolist()]
        assert got.text == engine.tokenizer.decode(ref_ids, skip_special_tokens=True)
        assert got.finish_reason == "length" and got.completion_tokens == 8 and got.prompt_tokens == len(ids)
    assert len({c.text for c in batch}) == 3


def test_seeded_sampling_does_not_depend_on_batch_neighbours(engine):
    alone = engine.generate([_req(engine, "seeded", temperature=0.9, top_p=0.95, seed=11, max_tokens=10)])[0].text
    mixed = engine.generate(
        [
            _req(engine, "another, longer request sharing the batch", temperature=1.3, seed=5, max_tokens=3),
            _req(engine, "seeded", temperature=0.9, top_p=0.95, seed=11, max_tokens=10),
            _req(engine, "greedy", temperature=0),
        ]
    )
    assert mixed[1].text == alone
    other_seed = engine.generate([_req(engine, "seeded", temperature=0.9, top_p=0.95, seed=12, max_tokens=10)])[0]
    assert other_seed.text != alone
    # top_p = 0 keeps only the likeliest token: sampling collapses to greedy.
    greedy = engine.generate([_req(engine, "seeded", temperature=0, max_tokens=10)])[0].text
    assert engine.generate([_req(engine, "seeded", temperature=1.0, top_p=0.0, max_tokens=10)])[0].text == greedy
    # A vanishing temperature is greedy too (dividing by it would overflow the logits to inf).
    assert engine.generate([_req(engine, "seeded", temperature=1e-300, max_tokens=10)])[0].text == greedy


def test_rows_finish_independently_with_their_own_limits_and_stops(engine):
    full = engine.generate([_req(engine, "stop here", temperature=0, max_tokens=12)])[0].text
    stop = full[4:7]
    assert stop and full.find(stop) == 4
    state, first = engine.prefill(
        [
            _req(engine, "stop here", temperature=0, max_tokens=12, stop=(stop,)),
            _req(engine, "short", temperature=0, max_tokens=2),
            _req(engine, "long one", temperature=0, max_tokens=12),
        ]
    )
    texts, finals, steps = ["", "", ""], [None] * 3, 0
    outs = first
    while True:
        for i, o in enumerate(outs):
            if o is not None:
                assert finals[i] is None, "a finished row produced more output"
                texts[i] += o.text
                finals[i] = o if o.finish_reason else None
        if state.done:
            break
        outs = engine.step(state)
        steps += 1
        assert len(state.rows) <= 3
    assert texts[0] == full[:4] and finals[0].finish_reason == "stop"
    assert finals[1].finish_reason == "length" and finals[1].completion_tokens == 2
    assert finals[2].finish_reason == "length" and finals[2].completion_tokens == 12
    assert steps == 11  # the batch lasts as long as its longest row, not longer


def test_cancelled_row_leaves_the_batch(engine):
    a, b = _req(engine, "first", temperature=0, max_tokens=50), _req(engine, "second", temperature=0, max_tokens=50)
    state, _ = engine.prefill([a, b])
    engine.step(state)
    a.cancelled = True
    outs = engine.step(state)
    assert outs[0].finish_reason == "length" and outs[0].completion_tokens == 3
    assert state.rows == [1]
    assert engine.step(state)[0] is None


def test_prompt_longer_than_the_context_is_refused(engine):
    ctx = engine.max_positions
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.prefill([GenerationRequest([5] * (ctx - 3), SamplingParams(max_tokens=8))])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.prefill([GenerationRequest([], SamplingParams(max_tokens=8))])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=1, top_p=1.5)


class _CharTokenizer:
    """Decodes ids as bytes (UTF-8 with replacement), like a byte-level BPE does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_tracker_never_shows_part_of_a_stop_string_or_a_split_character():
    t = _TextTracker(_CharTokenizer(), stop=("END",))
    shown = []
    for ch in b"ab E":
        shown.append(t.add(ch))
    assert "".join(s for s, _ in shown) == "ab "  # "E" could start "END": held back
    assert t.add(ord("x")) == ("Ex", False)  # it did not
    assert t.add(ord("E")) == ("", False) and t.add(ord("N")) == ("", False)
    assert t.add(ord("D")) == ("", True)  # the stop string itself is never shown
    t = _TextTracker(_CharTokenizer(), stop=())
    euro = "€".encode()  # 3 bytes: the first two alone decode to a replacement character
    assert t.add(euro[0]) == ("", False) and t.add(euro[1]) == ("", False)
    assert t.add(euro[2]) == ("€", False)
    t = _TextTracker(_CharTokenizer(), stop=("zz",))
    t.add(ord("a"))
    t.add(ord("z"))
    assert t.flush() == "z"  # held-back text is released when generation ends without the stop


def test_a_request_merged_into_a_running_batch_decodes_as_if_alone(engine):
    alone = engine.generate(
        [_req(engine, "joins later, with a longer prompt than the first", temperature=0, max_tokens=10)]
    )[0].text
    first = engine.generate([_req(engine, "first", temperature=0, max_tokens=12)])[0].text
    state, outs = engine.prefill([_req(engine, "first", temperature=0, max_tokens=12)])
    texts = [outs[0].text, ""]
    for _ in range(3):
        texts[0] += engine.step(state)[0].text
    new, new_outs = engine.prefill(
        [_req(engine, "joins later, with a longer prompt than the first", temperature=0, max_tokens=10)]
    )
    engine.merge(state, new)
    texts[1] += new_outs[0].text
    assert len(state.rows) == 2 and state.attention_mask.shape[0] == 2
    while not state.done:
        for i, o in enumerate(engine.step(state)):
            if o is not None:
                texts[i] += o.text
    assert texts == [first, alone]
    # Finished requests are forgotten when the next one joins (a batch that never drains stays small).
    state2, _ = engine.prefill([_req(engine, "a", temperature=0, max_tokens=1), _req(engine, "b", max_tokens=5)])
    engine.merge(state2, engine.prefill([_req(engine, "c", temperature=0, max_tokens=5)])[0])
    assert len(state2.requests) == 2 and state2.rows == [0, 1]


def test_continuous_batcher_serves_concurrent_groups_in_shared_steps(engine):
    import asyncio

    from raydist.serve.batcher import ContinuousBatcher

    N = 48  # long enough that later requests arrive while earlier ones decode
    steps = []
    batcher = ContinuousBatcher(engine, max_batch_size=4, on_step=steps.append)
    prompts = ["one", "two two", "three three three", "four", "five"]

    async def run(p, delay):
        await asyncio.sleep(delay)
        text = ""
        async for outs in batcher.submit([_req(engine, p, temperature=0, max_tokens=N)]):
            text += outs[0].text if outs[0] is not None else ""
        return text

    async def main():
        return await asyncio.gather(*[run(p, 0.003 * i) for i, p in enumerate(prompts)])

    got = asyncio.run(main())
    assert got == [engine.generate([_req(engine, p, temperature=0, max_tokens=N)])[0].text for p in prompts]
    assert max(steps) >= 2 and max(steps) <= 4  # requests shared forward passes, never more than the limit
    assert sum(steps) + len(prompts) == N * len(prompts)  # every token came from a shared step or a prefill

    async def bad():
        async for _ in batcher.submit([GenerationRequest([], SamplingParams(max_tokens=2))]):
            pass

    with pytest.raises(ValueError, match="empty prompt"):
        asyncio.run(bad())
