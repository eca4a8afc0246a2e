import json
from pathlib import Path

import pytest

from raydist.config import DataConfig, DataSourceConfig
from raydist.core.data import (
    IGNORE_INDEX,
    DataError,
    build_datasets,
    chunk,
    collate,
    detect_format,
    encode_chat,
    load_records,
    pack,
    pydoc_topics_text,
    split_records,
    tokenize_source,
)

SEED_TASKS = Path(__file__).resolve().parents[4] / "shared" / "data" / "seed_tasks.jsonl"


def _targets(ids, labels):
    return [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_pydoc_corpus_is_sorted_topics():
    from pydoc_data.topics import topics

    text = pydoc_topics_text()
    first = sorted(topics)[0]
    assert text.startswith(topics[first]) and len(text) > 400_000


def test_chat_labels_cover_assistant_turns_only(tiny_tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "general kenobi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "fine"},
    ]
    ids, labels = encode_chat(msgs, tiny_tokenizer)
    assert len(ids) == len(labels)
    text = tiny_tokenizer.decode(_targets(ids, labels))
    assert text == "general kenobi<|im_end|>\nfine<|im_end|>\n"
    assert "hello" not in text and "be brief" not in text
    full = tiny_tokenizer.apply_chat_template(msgs, tokenize=True)
    assert ids == list(full["input_ids"] if hasattr(full, "keys") else full)


def test_instruction_format_masks_the_prompt(tiny_tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "Add the numbers", "input": "2 and 3", "output": "five"}) + "\n")
    src = DataSourceConfig(path=str(p))
    recs = load_records(src)
    assert detect_format(recs, src) == "instruction"
    [ex] = tokenize_source(recs, "instruction", src, tiny_tokenizer, 256, packing=False)
    assert tiny_tokenizer.decode(_targets(ex["input_ids"], ex["labels"])) == "five<|im_end|>\n"
    assert "2 and 3" in tiny_tokenizer.decode(ex["input_ids"])


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason="shared seed tasks not present")
def test_seed_tasks_instances_expand(tiny_tokenizer):
    src = DataSourceConfig(path=str(SEED_TASKS))
    recs = load_records(src)
    assert detect_format(recs, src) == "instruction"
    exs = tokenize_source(recs, "instruction", src, tiny_tokenizer, 8192, packing=False)
    assert len(exs) >= len(recs)  # at least one example per task (some tasks have several instances)


def test_text_stream_skip_and_limit(tiny_tokenizer):
    src = DataSourceConfig(builtin="pydoc_topics", skip_tokens=100, max_tokens=1000)
    exs = tokenize_source(load_records(src), "text", src, tiny_tokenizer, 128, packing=None)
    assert sum(len(e["input_ids"]) for e in exs) == 1000
    assert [len(e["input_ids"]) for e in exs] == [128] * 7 + [104]
    full = tiny_tokenizer.encode(pydoc_topics_text()[:20000], add_special_tokens=False)
    assert exs[0]["input_ids"] == full[100:228]
    assert all(e["labels"] == e["input_ids"] for e in exs)


def test_chunk_drops_untrainable_tail():
    assert chunk(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk(list(range(10)), 4)[-1] == [8, 9]


def test_pack_keeps_examples_whole_and_labels_aligned():
    exs = [
        {"input_ids": [1] * 3, "labels": [-100, 1, 1]},
        {"input_ids": [2] * 4, "labels": [2] * 4},
        {"input_ids": [3] * 2, "labels": [-100, 3]},
    ]
    blocks = pack(exs, 6)
    assert [b["input_ids"] for b in blocks] == [[1, 1, 1], [2, 2, 2, 2, 3, 3]]
    assert blocks[1]["labels"] == [2, 2, 2, 2, -100, 3]


def test_collate_pads_with_ignored_labels():
    b = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_split_is_deterministic_and_disjoint():
    recs = list(range(100))
    a_tr, a_ev = split_records(recs, 0.1, seed=3)
    b_tr, b_ev = split_records(recs, 0.1, seed=3)
    assert a_ev == b_ev and len(a_ev) == 10 and not set(a_tr) & set(a_ev)


def test_builtin_corpus_splits_into_train_and_eval(tiny_tokenizer):
    cfg = DataConfig(train=DataSourceConfig(builtin="pydoc_topics", max_tokens=5000), seq_len=100, eval_fraction=0.1)
    train, evals = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert len(train) == 45 and len(evals) == 5


def test_chat_file_with_packing(tiny_tokenizer, tmp_path):
    p = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(train=DataSourceConfig(path=str(p)), seq_len=64, packing=True, eval_fraction=0.0)
    train, evals = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert evals == [] and len(train) < 20 and all(len(e["input_ids"]) <= 64 for e in train)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "data file not found"),
        (lambda d: (d / "x.jsonl").write_text(""), "is empty"),
        (lambda d: (d / "x.jsonl").write_text("{not json\n"), "cannot read"),
        (lambda d: (d / "x.jsonl").write_text(json.dumps({"foo": 1}) + "\n"), "cannot detect the format"),
    ],
)
def test_bad_data_is_named(tmp_path, setup, message):
    setup(tmp_path)
    src = DataSourceConfig(path=str(tmp_path / "x.jsonl"))
    with pytest.raises(DataError, match=message):
        detect_format(load_records(src), src)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported type '.csv'"):
        load_records(DataSourceConfig(path=str(tmp_path / "x.csv")))


def test_explicit_format_checked_against_fields(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n")
    src = DataSourceConfig(path=str(p), format="chat")
    with pytest.raises(DataError, match="format 'chat' needs fields"):
        detect_format(load_records(src), src)


def test_parquet_and_txt_sources(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha beta gamma " * 20, "delta " * 30]}), tmp_path / "d.parquet")
    src = DataSourceConfig(path=str(tmp_path / "d.parquet"))
    assert detect_format(load_records(src), src) == "text"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("some words here")
    recs = load_records(DataSourceConfig(path=str(tmp_path / "t")))
    assert recs == [{"text": "some words here"}]
