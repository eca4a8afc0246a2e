"""The teacher cache's on-disk format: compact columns that read back into the tensors the loss expects."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raydist.config import ModelConfig
from raydist.core.data import collate, iter_rows
from raydist.core.models import load_model
from raydist.distill.teacher_cache import (
    CACHE_MANIFEST,
    CacheMismatchError,
    cache_key,
    cache_table,
    check_cache,
    head_tensors,
    hidden_rows,
    index_dtype,
    load_head,
    payload_bytes_per_token,
    save_head,
    topk_rows,
)


def test_bytes_per_token():
    assert payload_bytes_per_token(64, "float16", 49152) == 64 * 2 + 64 * 2 + 4 == 260  # SmolLM2's vocabulary
    assert payload_bytes_per_token(64, "float32", 49152) == 64 * 4 + 64 * 2 + 4
    assert payload_bytes_per_token(64, "float32", 151_936) == 516  # ids need int32 beyond 65536 tokens
    assert index_dtype(65536) is np.uint16 and index_dtype(65537) is np.int32
    assert payload_bytes_per_token(64, "float16", 49152, hidden_size=576) == 1152  # a hidden cache: H values


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_cache_rows_round_trip_through_parquet(tmp_path, precision):
    model = load_model(ModelConfig(path="tiny-random"), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 512, (n,), generator=g).numpy() for n in (7, 12, 3)]
    cols = topk_rows(model, rows, k=8, temperature=1.0, pad_id=0)
    batch = {"input_ids": np.array(rows, dtype=object), "labels": np.array(rows, dtype=object)}
    # as Ray Data hands them over: per row an object array of per-token arrays
    for name, values in cols.items():
        out = np.empty(len(values), dtype=object)
        out[:] = [np.array(list(v), dtype=object) if v.ndim == 2 else v for v in values]
        batch[name] = out
    table = cache_table(batch, 8, precision, vocab_size=512)
    expected = {"float16": "halffloat", "float32": "float"}[precision]
    # stored flat per row (T * k values), so a reader gets one array per row, not T of them
    assert str(table.schema.field("topk_logprobs").type.value_type) == expected
    assert str(table.schema.field("topk_indices").type.value_type) == "uint16"
    assert [len(x) for x in table.column("topk_indices").to_pylist()] == [8 * len(r) for r in rows]
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet").to_pydict()
    read = {k: np.array([np.array(x) for x in v], dtype=object) for k, v in back.items()}
    got = collate(list(iter_rows(read)), pad_id=0)
    for i, n in enumerate(len(r) for r in rows):
        want = torch.from_numpy(cols["topk_logprobs"][i].astype(np.dtype(precision)).astype(np.float32))
        assert torch.equal(got["topk_logprobs"][i, :n], want)
        assert torch.equal(got["topk_indices"][i, :n], torch.from_numpy(cols["topk_indices"][i].astype(np.int64)))
        assert torch.equal(got["rest_mass"][i, :n], torch.from_numpy(cols["rest_mass"][i]))
        assert got["input_ids"][i, :n].tolist() == rows[i].tolist()
    if precision == "float16":  # what half precision costs the log-probabilities: ~1e-3 relative
        err = (got["topk_logprobs"][0, :7] - torch.from_numpy(cols["topk_logprobs"][0])).abs()
        assert float(err.max()) < 1e-2


def test_sampled_rows_do_not_depend_on_the_batching():
    model = load_model(ModelConfig(path="tiny-random"), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(4, 512, (n,), generator=g).numpy() for n in (9, 4)]
    together = topk_rows(model, rows, k=8, temperature=1.0, pad_id=0, entries="sampled", seed=3)
    alone = topk_rows(model, rows[1:], k=8, temperature=1.0, pad_id=0, entries="sampled", seed=3)
    assert np.array_equal(together["topk_indices"][1], alone["topk_indices"][0])
    np.testing.assert_allclose(together["topk_logprobs"][1], alone["topk_logprobs"][0], atol=1e-6)
    for lp, rest, n in zip(together["topk_logprobs"], together["rest_mass"], (9, 4)):
        assert lp.shape == (n, 8) and (rest == 0).all()
        np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-6)
    other = topk_rows(model, rows, k=8, temperature=1.0, pad_id=0, entries="sampled", seed=4)
    assert not np.array_equal(other["topk_indices"][0], together["topk_indices"][0])
    with pytest.raises(ValueError, match="'sampled' or 'top_k_tail'"):
        topk_rows(model, rows, k=8, temperature=1.0, pad_id=0, entries="top_p")
    # top_k_tail: every position holds the top-5 cache's entries, exactly, and 3 draws from the rest
    tail = topk_rows(model, rows, k=8, temperature=1.0, pad_id=0, entries="top_k_tail", seed=3, tail_draws=3)
    exact = topk_rows(model, rows, k=5, temperature=1.0, pad_id=0)
    for row in range(2):
        cols = (tail["topk_logprobs"], tail["topk_indices"], exact["topk_logprobs"], exact["topk_indices"])
        for lp, ids, want_lp, want_ids in zip(*(c[row] for c in cols)):
            kept = dict(zip(ids.tolist(), lp.tolist()))
            assert [kept[i] for i in want_ids.tolist()] == pytest.approx(want_lp.tolist(), abs=1e-5)
            assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-5)


def test_a_cache_matches_only_its_own_entries(tmp_path):
    common = dict(teacher_hash="t", data_fingerprint="d", tokenizer_hash="v", top_k=8, temperature=1.0)
    top_k, sampled = cache_key(**common), cache_key(**common, entries="sampled", seed=0)
    assert "entries" not in top_k  # the key of top-k caches built before sampled ones existed
    tail = lambda d: cache_key(**common, entries="top_k_tail", seed=0, tail_draws=d)  # noqa: E731
    assert "tail_draws" not in sampled and tail(4)["tail_draws"] == 4
    others = ((sampled, cache_key(**common, entries="sampled", seed=1)), (tail(4), tail(2)), (tail(4), sampled))
    for built, asked in ((sampled, top_k), (top_k, sampled), *others):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / CACHE_MANIFEST).write_text(json.dumps({"key": built}))
        assert check_cache(d, built)
        with pytest.raises(CacheMismatchError, match="different (entries|seed|tail_draws)"):
            check_cache(d, asked)


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_a_hidden_cache_gives_back_the_online_teachers_logits(tmp_path, precision):
    """A hidden cache stores the teacher's last hidden states; with its saved output layer the worker gets the
    logits the online teacher computes (logits_at_targets), up to the storage precision."""
    from raydist.distill.distill import logits_at_targets

    model = load_model(ModelConfig(path="tiny-random"), seed=0).eval()
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(4, 512, (n,), generator=g).numpy() for n in (7, 12, 3)]
    cols = hidden_rows(model, rows, pad_id=0)
    assert [c.shape for c in cols["teacher_hidden"]] == [(n, model.config.hidden_size) for n in (7, 12, 3)]
    batch = {"input_ids": np.array(rows, dtype=object), "labels": np.array(rows, dtype=object)}
    batch["teacher_hidden"] = np.empty(3, dtype=object)
    batch["teacher_hidden"][:] = [np.array(list(v), dtype=object) for v in cols["teacher_hidden"]]
    table = cache_table(batch, 8, precision, vocab_size=512)
    assert set(table.column_names) == {"input_ids", "labels", "teacher_hidden"}
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet").to_pydict()
    got = collate(list(iter_rows({k: np.array([np.array(x) for x in v], dtype=object) for k, v in back.items()})), 0)
    assert got["teacher_hidden"].shape == (3, 12, model.config.hidden_size) and "topk_indices" not in got
    model.save_pretrained(tmp_path / "teacher")
    save_head(head_tensors(ModelConfig(path=str(tmp_path / "teacher"))), tmp_path / "head.safetensors")
    head = load_head(tmp_path / "head.safetensors", torch.device("cpu"), torch.float32)
    assert not head.weight.requires_grad
    targets = got["labels"][:, 1:] != -100
    targets &= got["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        online, _ = logits_at_targets(model, targets, input_ids=got["input_ids"], attention_mask=got["attention_mask"])
        cached = head(got["teacher_hidden"][:, :-1][targets])
    tol = {"float16": 2e-3, "float32": 1e-5}[precision]
    assert cached.shape == online.shape and float((cached - online).abs().max()) < tol


def test_a_hidden_cache_key_leaves_out_k_and_temperature(tmp_path):
    common = dict(teacher_hash="t", data_fingerprint="d", tokenizer_hash="v")
    hidden = cache_key(**common, top_k=8, temperature=1.0, entries="last_hidden")
    assert hidden == cache_key(**common, top_k=64, temperature=2.0, entries="last_hidden")  # one cache, any T and k
    assert hidden["entries"] == "last_hidden" and "top_k" not in hidden and "temperature" not in hidden
    (tmp_path / CACHE_MANIFEST).write_text(json.dumps({"key": hidden}))
    with pytest.raises(CacheMismatchError, match="different"):
        check_cache(tmp_path, cache_key(**common, top_k=8, temperature=1.0))


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_is_read_from_the_checkpoint_without_loading_the_teacher(tmp_path, monkeypatch, tied):
    """A hidden cache's output layer comes out of the teacher's safetensors alone (in its dtype, tied to the input
    embedding or not, one file or sharded with an index); sources without safetensors load the model."""
    import raydist.core.models as models
    from raydist.core.models import tiny_llama_config

    cfg = tiny_llama_config(ModelConfig(path="tiny-random").tiny)
    cfg.tie_word_embeddings = tied
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    want = model.get_output_embeddings().weight.detach()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded")

    with monkeypatch.context() as m:
        m.setattr(models, "load_model", no_load)
        for d in ("one", "sharded"):
            got = head_tensors(ModelConfig(path=str(tmp_path / d)))
            assert set(got) == {"weight"} and got["weight"].dtype == torch.bfloat16
            assert torch.equal(got["weight"], want)
    fallback = head_tensors(ModelConfig(path="tiny-random"))  # nothing to read: built and loaded, float32
    assert fallback["weight"].dtype == torch.float32
    assert fallback["weight"].shape == (cfg.vocab_size, cfg.hidden_size)
