"""The measurement protocol: windows and calibration from the pydoc corpus, perplexity, speed, size."""

import copy
import math

import pytest
import torch

from raydist.compress.quant.format import save_compressed
from raydist.compress.quant.quantize import quantize_model
from raydist.config import ModelConfig
from raydist.core.data import pydoc_topics_text
from raydist.core.evaluation import calibration_ids, eval_windows, model_size, perplexity_on
from raydist.core.models import count_parameters, load_model
from raydist.sweep.speed import generation_speed

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


def tiny_model():
    return load_model(ModelConfig(path="tiny-random", tiny=TINY), seed=0).eval()


def test_pydoc_text_is_sorted_topics_joined_by_blank_lines():
    from pydoc_data.topics import topics

    text = pydoc_topics_text()
    first, second = sorted(topics)[:2]
    assert text.startswith(topics[first] + "\n\n" + topics[second])


def test_eval_windows_and_calibration_come_from_the_token_stream_without_bos(tiny_tokenizer):
    stream = tiny_tokenizer.encode(pydoc_topics_text(), add_special_tokens=False)
    win = eval_windows(tiny_tokenizer, n_tokens=256, window=64)
    assert win.shape == (4, 64) and win.dtype == torch.long
    assert win.flatten().tolist() == stream[:256]
    assert tiny_tokenizer.bos_token_id not in win[:, 0].tolist()
    cal = calibration_ids(tiny_tokenizer, n=3, seq=32, start=1000)
    assert cal.shape == (3, 32) and cal.flatten().tolist() == stream[1000:1096]
    with pytest.raises(ValueError, match="multiple of window"):
        eval_windows(tiny_tokenizer, n_tokens=100, window=64)
    with pytest.raises(ValueError, match="corpus has only"):
        calibration_ids(tiny_tokenizer, n=4, seq=128, start=10_000_000)


def _hand_nll(model, row):
    """Sum of -log p(row[t] | row[:t]) for t >= 1, one token at a time through softmax."""
    with torch.no_grad():
        logits = model(input_ids=row[None]).logits[0]  # [T, V]
    total = 0.0
    for t in range(1, len(row)):
        p = torch.exp(logits[t - 1].double()) / torch.exp(logits[t - 1].double()).sum()
        total -= math.log(float(p[row[t]]))
    return total, len(row) - 1


def test_perplexity_on_equals_a_hand_computation_and_honours_the_budget():
    model = tiny_model()
    windows = torch.randint(4, 512, (3, 10), generator=torch.Generator().manual_seed(3))
    parts = [_hand_nll(model, w) for w in windows]
    expected = math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
    assert perplexity_on(model, windows) == pytest.approx(expected, rel=1e-5)
    # budget 14 tokens: the first window (10 tokens, 9 predictions) + 4 tokens of the second (3 predictions)
    a, b = _hand_nll(model, windows[0]), _hand_nll(model, windows[1][:4])
    assert perplexity_on(model, windows, max_tokens=14) == pytest.approx(math.exp((a[0] + b[0]) / 12), rel=1e-5)
    # a budget that would leave a 1-token tail drops it (nothing to predict)
    assert perplexity_on(model, windows, max_tokens=11) == pytest.approx(math.exp(a[0] / 9), rel=1e-5)
    assert model.training is False
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity_on(model, windows, max_tokens=1)
    with pytest.raises(ValueError, match="windows must be"):
        perplexity_on(model, windows[0])


def test_growing_budgets_score_each_window_once_and_match_separate_calls():
    from raydist.core.evaluation import IncrementalPerplexity

    model = tiny_model()
    windows = torch.randint(4, 512, (4, 10), generator=torch.Generator().manual_seed(4))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    inc = IncrementalPerplexity(model, windows)
    got = [inc(b) for b in (14, 20, 30, None)]
    handle.remove()
    assert got == [perplexity_on(model, windows, max_tokens=b) for b in (14, 20, 30, None)]
    assert calls == [10, 4, 10, 10, 10]  # window 0, a 4-token cut of window 1, then windows 1, 2, 3 once


@pytest.mark.parametrize("engine", ["generate", "serve"])
@pytest.mark.parametrize("scheme", [None, "int8_dynamic"])
def test_generation_speed_counts_tokens_and_is_positive(scheme, engine, tiny_tokenizer):
    model = tiny_model()
    if scheme:
        quantize_model(model, scheme)
    r = generation_speed(
        model, batch_size=3, prompt_len=5, new_tokens=7, repeats=2, warmup=1, tokenizer=tiny_tokenizer, engine=engine
    )
    assert r["generated_tokens"] == 21 and r["batch_size"] == 3 and len(r["seconds_all"]) == 2
    assert r["tokens_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(21 / r["seconds"])
    assert r["device"] == "cpu" and r["engine"] == engine
    if engine == "serve":
        assert r["fast_path"] is True  # the serving engine's fast forward, as `raydist serve` runs it
    with pytest.raises(ValueError, match="new_tokens"):
        generation_speed(model, new_tokens=0)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        generation_speed(model, engine="serve")


def test_model_size_counts_logical_parameters_nonzeros_and_disk_bytes(tmp_path, tiny_tokenizer):
    model = tiny_model()
    n = count_parameters(model)
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())  # the pad embedding row is zero
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()  # 64 * 128 zeros
    dense = model_size(model)
    assert dense["parameters"] == n and dense["nonzero_parameters"] == nonzero - 64 * 128
    quant = copy.deepcopy(model)
    quantize_model(quant, "int8_weight_only")
    save_compressed(quant, tiny_tokenizer, tmp_path / "q", {})
    size = model_size(quant, tmp_path / "q")
    assert size["parameters"] == n  # quantized weights still count as weights
    assert size["nonzero_parameters"] <= n - 64 * 128  # zero rows stay exactly zero in symmetric int8
    assert size["memory_bytes"] < dense["memory_bytes"]
    assert 0 < size["disk_weight_bytes"] <= size["disk_bytes"]


def test_task_metrics_score_only_answer_tokens_whatever_the_batching(tiny_tokenizer):
    from raydist.core.data import DataSourceConfig, tokenize_source
    from raydist.core.evaluation import task_metrics

    model = load_model(ModelConfig(path="tiny-random", tiny=TINY), seed=0).eval()
    records = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The sum is {2 * i + 1}."} for i in range(5)]
    records.append(
        {"instruction": "Name a colour, with a much longer explanation of why that colour " * 3, "output": "Blue."}
    )
    examples = tokenize_source(records, "instruction", DataSourceConfig(path="x.jsonl"), tiny_tokenizer, 256, False)
    one = task_metrics(model, examples, batch_size=1)
    six = task_metrics(model, examples, batch_size=6)  # padded batch: padding and prompts are not scored
    answer_tokens = sum(sum(lab != -100 for lab in e["labels"][1:]) for e in examples)
    assert one["task_answer_tokens"] == six["task_answer_tokens"] == answer_tokens
    assert one["task_answer_ppl"] == pytest.approx(six["task_answer_ppl"], rel=1e-4)
    assert one["task_token_accuracy"] == pytest.approx(six["task_token_accuracy"])
    # by hand for one example: NLL of its answer tokens given everything before them
    e = examples[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1], -1)
    targets = torch.tensor(e["labels"][1:])
    keep = targets != -100
    nll = -logp[keep].gather(1, targets[keep][:, None]).sum()
    first = task_metrics(model, examples[:1])
    assert first["task_answer_ppl"] == pytest.approx(math.exp(float(nll) / int(keep.sum())), rel=1e-4)
    assert first["task_token_accuracy"] == pytest.approx(float((logp[keep].argmax(-1) == targets[keep]).float().mean()))
    with pytest.raises(ValueError, match="at least one example"):
        task_metrics(model, [])
