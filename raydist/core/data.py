"""Data: read files, render the three shapes, tokenize once, mask labels, pack, split.

Shapes (``DataSourceConfig.format``):
  * text        — ``{"text": ...}`` records or .txt files; a causal-LM token stream, loss on every token.
  * instruction — ``instruction`` / ``input`` / ``output`` (or self-instruct style ``instances``);
                  loss only on the response tokens.
  * chat        — ``messages`` rendered with the tokenizer's chat template; loss only on assistant turns.

A tokenized example is ``{"input_ids": list[int], "labels": list[int]}`` where ``labels[i] == -100``
means "no loss at position i" (the transformers convention); the model shifts labels internally.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from raydist.config.base import DataConfig, DataSourceConfig

IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


class DataError(ValueError):
    """The data cannot be used; the message names the file or record at fault."""


def pydoc_topics_text() -> str:
    """The standard library's ``pydoc_data.topics`` corpus: topics in sorted key order, blank-line joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data directory {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        suffixes = {p.suffix if p.suffix != ".json" else ".jsonl" for p in files}
        if len(suffixes) > 1:
            raise DataError(f"data directory {path} mixes file types {sorted(suffixes)}")
        return files
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in DATA_SUFFIXES:
        raise DataError(f"data file {path} has unsupported type {path.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
    return [path]


def load_records(src: DataSourceConfig) -> list[dict[str, Any]]:
    """Read a source into a list of records (dicts) through ``datasets``.

    Raises:
        DataError: missing file, unsupported type, unreadable content, or no records.
    """
    if src.builtin == "pydoc_topics":
        return [{src.text_field: pydoc_topics_text()}]
    files = _data_files(Path(src.path).expanduser())
    suffix = files[0].suffix
    if suffix == ".txt":
        records = [{src.text_field: f.read_text(encoding="utf-8")} for f in files]
        records = [r for r in records if r[src.text_field].strip()]
    else:
        import datasets

        builder = "parquet" if suffix == ".parquet" else "json"
        for f in files:
            if f.stat().st_size == 0:
                raise DataError(f"data file {f} is empty")
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"cannot read {', '.join(map(str, files))}: {type(e).__name__}: {e}") from None
        if src.max_records is not None:
            ds = ds.select(range(min(src.max_records, len(ds))))
        records = ds.to_list()
    if not records:
        raise DataError(f"data source {src.path or src.builtin} holds no records")
    if src.max_records is not None:
        records = records[: src.max_records]
    return records


def detect_format(records: Sequence[dict[str, Any]], src: DataSourceConfig, *, require_output: bool = True) -> str:
    """Resolve ``format: auto`` from the first record's keys, or check an explicit format against them.

    ``require_output=False`` accepts instruction records without answers (prompts for `raydist generate`).
    """
    keys = set(records[0])
    fmt = src.format
    if fmt == "auto":
        if "messages" in keys:
            fmt = "chat"
        elif "instruction" in keys:
            fmt = "instruction"
        elif src.text_field in keys:
            fmt = "text"
        else:
            raise DataError(
                f"cannot detect the format of {src.path}: first record has keys {sorted(keys)}; expected "
                f"'messages' (chat), 'instruction'+'output' (instruction) or {src.text_field!r} (text)"
            )
    required = {"chat": {"messages"}, "instruction": {"instruction"}, "text": {src.text_field}}[fmt]
    if not required <= keys:
        raise DataError(f"format {fmt!r} needs fields {sorted(required)}; {src.path} has {sorted(keys)}")
    if require_output and fmt == "instruction" and "output" not in keys and "instances" not in keys:
        raise DataError(f"instruction data {src.path} needs an 'output' field (or 'instances' with outputs)")
    return fmt


def expand_instruction_records(records: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Flatten self-instruct style records (``instances: [{input, output}]``) into one record per instance."""
    out = []
    for r in records:
        if "instances" in r and "output" not in r:
            for inst in r["instances"]:
                out.append({"instruction": r["instruction"], "input": inst.get("input", ""), "output": inst["output"]})
        else:
            out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]})
    return out


def instruction_to_messages(rec: dict[str, str]) -> list[dict[str, str]]:
    prompt = rec["instruction"] if not rec.get("input") else f"{rec['instruction']}\n\n{rec['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def encode_chat(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenize a conversation; labels cover assistant turns only (prompt/system/user tokens are -100).

    Each assistant turn's tokens are found as the difference between the rendering up to that turn and the
    rendering of the preceding turns with the generation prompt, so the template's own markup decides.
    """
    if not tokenizer.chat_template:
        return _encode_plain_chat(messages, tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"chat message {i} has unknown role {m.get('role')!r}")
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise DataError("the tokenizer's chat template does not render turns as prefixes; cannot mask prompts")
        labels.extend([IGNORE_INDEX] * (len(prefix) - len(ids)))
        labels.extend(full[len(prefix) :])
        ids = full
    if not ids:
        raise DataError("chat record has no assistant turn to learn from")
    return ids, labels


def _encode_plain_chat(messages, tokenizer) -> tuple[list[int], list[int]]:
    """Fallback for tokenizers without a chat template: 'role: content' lines, loss on assistant lines."""
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = tokenizer.encode(f"{m['role']}: ", add_special_tokens=False)
        body = tokenizer.encode(m["content"] + "\n", add_special_tokens=False)
        if m["role"] == "assistant":
            body = body + [tokenizer.eos_token_id]
        ids += head + body
        labels += [IGNORE_INDEX] * len(head) + (body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body))
    return ids, labels


def text_token_stream(texts: Iterable[str], tokenizer, skip: int = 0, limit: Optional[int] = None) -> list[int]:
    """Documents tokenized without special tokens and joined by EOS; then ``[skip : skip + limit]``."""
    stream: list[int] = []
    for i, t in enumerate(texts):
        if i and tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer.encode(t, add_special_tokens=False))
    end = None if limit is None else skip + limit
    return stream[skip:end]


def text_source_ids(src: DataSourceConfig, tokenizer) -> list[int]:
    """A plain-text source as one token stream (its records' text joined by EOS), ``skip_tokens`` /
    ``max_tokens`` applied: what eval, calibration and recovery text are cut from."""
    texts = [str(r.get("text", r.get(src.text_field, ""))) for r in load_records(src)]
    return text_token_stream(texts, tokenizer, skip=src.skip_tokens, limit=src.max_tokens)


def chunk(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Split into ``seq_len`` blocks; a tail shorter than 2 tokens has nothing to predict and is dropped."""
    blocks = [list(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    return [b for b in blocks if len(b) >= 2]


def pack(examples: Sequence[dict[str, list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate examples into blocks of at most ``seq_len`` tokens (labels travel along).

    An example never spans two blocks; attention is not isolated between packed examples (like TRL's
    default packing), which is harmless for short fine-tunes and keeps the kernels dense.
    """
    blocks: list[dict[str, list[int]]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for ex in examples:
        if cur_ids and len(cur_ids) + len(ex["input_ids"]) > seq_len:
            blocks.append({"input_ids": cur_ids, "labels": cur_labels})
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + ex["input_ids"]
        cur_labels = cur_labels + ex["labels"]
    if cur_ids:
        blocks.append({"input_ids": cur_ids, "labels": cur_labels})
    return blocks


def tokenize_source(
    records: list[dict[str, Any]], fmt: str, src: DataSourceConfig, tokenizer, seq_len: int, packing: Optional[bool]
) -> list[dict[str, list[int]]]:
    """Turn records into training examples of at most ``seq_len`` tokens.

    Returns:
        A list of ``{"input_ids", "labels"}``; examples left without a single target token are dropped.
    """
    if fmt == "text":
        if packing is False:
            examples = []
            for r in records:
                ids = text_token_stream([r[src.text_field]], tokenizer)
                examples.extend({"input_ids": b, "labels": list(b)} for b in chunk(ids, seq_len))
            return examples
        ids = text_token_stream((r[src.text_field] for r in records), tokenizer, src.skip_tokens, src.max_tokens)
        if len(ids) < 2:
            raise DataError(f"text source {src.path or src.builtin} yields {len(ids)} tokens after skip/limit")
        return [{"input_ids": b, "labels": list(b)} for b in chunk(ids, seq_len)]
    if src.skip_tokens or src.max_tokens:
        raise DataError("skip_tokens / max_tokens apply to text data only")
    if fmt == "instruction":
        convs = [instruction_to_messages(r) for r in expand_instruction_records(records)]
    else:
        convs = []
        for i, r in enumerate(records):
            if not isinstance(r["messages"], list) or not r["messages"]:
                raise DataError(f"record {i}: 'messages' must be a non-empty list")
            convs.append(r["messages"])
    examples = []
    for msgs in convs:
        ids, labels = encode_chat(msgs, tokenizer)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(lab != IGNORE_INDEX for lab in labels[1:]):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"no example in {src.path} keeps a response token within seq_len={seq_len}")
    return pack(examples, seq_len) if packing else examples


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic record-level split: ``(train, eval)``; eval gets at least one record when fraction > 0."""
    if fraction <= 0:
        return records, []
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(records) * fraction)))
    if n_eval >= len(records):
        raise DataError(f"eval_fraction {fraction} leaves no training records out of {len(records)}")
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """Read, split and tokenize train/eval once. Returns ``(train_examples, eval_examples)``."""
    records = load_records(cfg.train)
    fmt = detect_format(records, cfg.train)
    eval_len = cfg.eval_seq_len or cfg.seq_len
    if cfg.eval is not None:
        eval_records = load_records(cfg.eval)
        eval_fmt = detect_format(eval_records, cfg.eval)
        train = tokenize_source(records, fmt, cfg.train, tokenizer, cfg.seq_len, cfg.packing)
        evals = tokenize_source(eval_records, eval_fmt, cfg.eval, tokenizer, eval_len, cfg.packing)
    elif fmt == "text" and len(records) == 1:
        # A single document (e.g. the built-in corpus) is split by blocks, not by records.
        blocks = tokenize_source(records, fmt, cfg.train, tokenizer, cfg.seq_len, cfg.packing)
        train, evals = split_records(blocks, cfg.eval_fraction, seed)
    else:
        tr, ev = split_records(records, cfg.eval_fraction, seed)
        train = tokenize_source(tr, fmt, cfg.train, tokenizer, cfg.seq_len, cfg.packing)
        evals = tokenize_source(ev, fmt, cfg.train, tokenizer, eval_len, cfg.packing) if ev else []
    if cfg.max_eval_sequences is not None:
        evals = evals[: cfg.max_eval_sequences]
    if not train:
        raise DataError("no training examples after tokenization")
    return train, evals


def collate(rows: Sequence[dict[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors.

    Returns:
        ``input_ids`` [B, T] long, ``labels`` [B, T] long (-100 on padding), ``attention_mask`` [B, T] long;
        with a teacher cache's columns also ``topk_logprobs`` [B, T, k] float, ``topk_indices`` [B, T, k]
        long and ``rest_mass`` [B, T] float (zeros on padding, which the labels mask anyway); with a hidden
        cache's column ``teacher_hidden`` [B, T, H] float instead.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        mask[i, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if "topk_indices" in rows[0]:
        out.update(_collate_teacher_cache(rows, width))
    elif "teacher_hidden" in rows[0]:
        out["teacher_hidden"] = _collate_flat_rows(rows, "teacher_hidden", width)
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation, so every row continues at the last column: ``input_ids`` and
    ``attention_mask`` [B, T] long."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _collate_teacher_cache(rows, width: int) -> dict[str, torch.Tensor]:
    """The cache's columns of each row (``topk_*`` flat [T * k], as the cache stores them) into padded tensors:
    one copy per row and column."""
    rest = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        rest[i, : len(r["input_ids"])] = torch.from_numpy(np.asarray(r["rest_mass"], dtype=np.float32))
    return {
        "topk_logprobs": _collate_flat_rows(rows, "topk_logprobs", width),
        "topk_indices": _collate_flat_rows(rows, "topk_indices", width, np.int64),
        "rest_mass": rest,
    }


def _collate_flat_rows(rows, column: str, width: int, dtype: type = np.float32) -> torch.Tensor:
    """A cache column stored flat per row ([T * k] or [T * H]) into a zero-padded [B, width, k] of ``dtype``
    (float32 or int64; the conversion happens in numpy, which also widens uint16 ids): one copy per row."""
    n0 = len(rows[0]["input_ids"])
    k = len(rows[0][column]) // max(n0, 1)
    out = torch.from_numpy(np.zeros((len(rows), width, k), dtype=dtype))
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out[i, :n] = torch.from_numpy(np.asarray(r[column]).reshape(n, k).astype(dtype))
    return out


def iter_rows(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Rows of a columnar batch (as Ray Data's numpy batches are)."""
    n = len(next(iter(batch.values())))
    for i in range(n):
        yield {k: v[i] for k, v in batch.items()}


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the model's one-position shift (labels[:, 1:] != -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation followed by the assistant generation prompt."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer.encode(text, add_special_tokens=False)
