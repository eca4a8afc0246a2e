"""The shared measurement protocol for compressed models: perplexity, generation speed, size.

Every compression method (pruning, sparsity, quantization) and every sweep trial is measured the same
way, so their numbers compare:

* quality  — perplexity on the first ``n_tokens`` SmolLM2 tokens of the standard library's pydoc topics
             (``data.pydoc_topics_text``: topics in sorted key order joined by blank lines; no BOS), cut
             into ``window``-token windows that are scored independently (dense fp32 SmolLM2-135M: 14.70
             on 4,096 tokens / 512-token windows);
* calibration — token windows taken far after the evaluation text (``start=50_000``), so no method sees
             the evaluation tokens;
* speed    — ``raydist.sweep.speed.generation_speed`` (it runs the serving engine, which lives above core/);
* size     — parameters, non-zero parameters, bytes of the weights in memory and on disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from raydist.core.artifact import bytes_on_disk, weight_bytes
from raydist.core.data import collate, pydoc_topics_text, text_token_stream


def _stream(tokenizer, start: int, n: int) -> list[int]:
    ids = text_token_stream([pydoc_topics_text()], tokenizer, skip=start, limit=n)
    if len(ids) < n:
        raise ValueError(
            f"the pydoc corpus has only {start + len(ids)} tokens with this tokenizer; "
            f"asked for tokens [{start}, {start + n})"
        )
    return ids


def eval_windows(tokenizer, n_tokens: int = 4096, window: int = 512) -> torch.Tensor:
    """The evaluation text: the first ``n_tokens`` pydoc-topics tokens as ``[n_tokens // window, window]``.

    Tokenized without special tokens (no BOS), as the published 14.70 / 14.47 figures were.

    Raises:
        ValueError: ``n_tokens`` not a positive multiple of ``window``, or more than the corpus holds.
    """
    if window < 2 or n_tokens < window or n_tokens % window:
        raise ValueError(f"n_tokens ({n_tokens}) must be a positive multiple of window ({window} >= 2)")
    return torch.tensor(_stream(tokenizer, 0, n_tokens), dtype=torch.long).view(-1, window)


def calibration_ids(tokenizer, n: int = 16, seq: int = 128, start: int = 50_000) -> torch.Tensor:
    """Calibration batches for importance/pruning/sparsity: ``[n, seq]`` tokens from ``start`` on.

    ``start`` defaults far past the evaluation tokens (4,096 … 16 K) so calibration never sees them.
    """
    if n < 1 or seq < 2 or start < 0:
        raise ValueError(f"need n >= 1, seq >= 2, start >= 0 (got n={n}, seq={seq}, start={start})")
    return torch.tensor(_stream(tokenizer, start, n * seq), dtype=torch.long).view(n, seq)


@torch.no_grad()
def sum_nll(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device) -> tuple[float, int]:
    """Summed next-token NLL and target-token count over ``batches`` (labels -100 are skipped).

    Each batch has ``input_ids``/``labels``/``attention_mask`` [B, T]; an optional ``weight`` scalar of 0
    marks a dummy batch that only keeps ZeRO-3 collectives in step across ranks.
    """
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        shift_logits = logits[:, :-1].float()  # [B, T-1, V]
        shift_labels = b["labels"][:, 1:].to(device)  # [B, T-1]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        if b.get("weight", 1) == 0:
            continue
        total += float(nll)
        count += int((shift_labels != -100).sum())
    return total, count


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def perplexity_on(model: nn.Module, windows: torch.Tensor, max_tokens: Optional[int] = None) -> float:
    """Perplexity of ``model`` on ``windows`` [W, T], each window scored independently.

    Every token of a window but the first is predicted from the ones before it in the same window, so a
    window of T tokens contributes T - 1 predictions.

    Args:
        model: a causal LM (any device; run in eval mode, its mode is restored).
        windows: [W, T] token ids (``eval_windows``).
        max_tokens: token budget for growing budgets (ASHA rungs): windows are taken in order until
            ``max_tokens`` input tokens are used, the last one cut short (to at least 2 tokens). None = all.

    Returns:
        ``exp(summed NLL / predicted tokens)``.

    Raises:
        ValueError: windows not [W, T] with T >= 2, or ``max_tokens < 2``.
    """
    return IncrementalPerplexity(model, windows)(max_tokens)


class IncrementalPerplexity:
    """``perplexity_on(model, windows, max_tokens=b)`` for growing budgets ``b`` (ASHA rungs), each full
    window scored once: a later budget only runs the windows an earlier one did not reach. Same values
    as separate calls (the same per-window sums, added in the same order)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor) -> None:
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [W, T] with T >= 2, got shape {tuple(windows.shape)}")
        self.model, self.windows = model, windows
        self._full: list[tuple[float, int]] = []  # (nll sum, predicted tokens) of windows 0, 1, ... scored whole

    def _score(self, row: torch.Tensor) -> tuple[float, int]:
        batch = {"input_ids": row[None], "labels": row[None], "attention_mask": torch.ones_like(row)[None]}
        was_training = self.model.training
        self.model.eval()
        try:
            return sum_nll(self.model, [batch], model_device(self.model))
        finally:
            self.model.train(was_training)

    def __call__(self, max_tokens: Optional[int] = None) -> float:
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        budget = self.windows.numel() if max_tokens is None else max_tokens
        nll, count = 0.0, 0
        for i, w in enumerate(self.windows):
            if budget < 2:
                break
            take = min(len(w), budget)
            if take == len(w):
                if i == len(self._full):
                    self._full.append(self._score(w))
                part = self._full[i]
            else:
                part = self._score(w[:take])
            nll, count = nll + part[0], count + part[1]
            budget -= take
        return perplexity(nll, count)


@torch.no_grad()
def task_metrics(
    model: nn.Module, examples: list[dict[str, list[int]]], *, pad_id: int = 0, batch_size: int = 8
) -> dict[str, Any]:
    """Answer quality on instruction examples, teacher-forced: the model reads each prompt and the
    reference answer, and is scored on predicting the answer's tokens.

    Args:
        examples: ``{"input_ids", "labels"}`` as ``data.tokenize_source`` makes them from instruction or
            chat records (chat template applied; ``labels`` -100 on the prompt).
        pad_id: padding id for batching (padding is never scored).

    Returns:
        ``task_answer_ppl`` (perplexity of the reference answers), ``task_token_accuracy`` (share of answer
        tokens that are the model's top-1 prediction), ``task_examples``, ``task_answer_tokens``.

    Raises:
        ValueError: no examples, or no answer token to score.
    """

    if not examples:
        raise ValueError("task_metrics needs at least one example")
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    try:
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i : i + batch_size], pad_id)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            logits, labels = logits[:, :-1].float(), b["labels"][:, 1:].to(device)
            scored = labels != -100
            nll += float(F.cross_entropy(logits[scored], labels[scored], reduction="sum"))
            correct += int((logits[scored].argmax(-1) == labels[scored]).sum())
            count += int(scored.sum())
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("the task examples hold no answer token to score")
    return {
        "task_answer_ppl": math.exp(nll / count),
        "task_token_accuracy": correct / count,
        "task_examples": len(examples),
        "task_answer_tokens": count,
    }


def model_size(model: nn.Module, path: Union[str, Path, None] = None) -> dict[str, Any]:
    """Parameter counts and bytes of ``model`` (and of its artifact at ``path``).

    Quantized layers (``compress.quant.layer.QuantizedLinear``) count their logical weights (N*K) as parameters;
    their non-zeros are counted on the dequantized weight. Tied weights count once.

    Returns:
        ``parameters``, ``nonzero_parameters``, ``sparsity`` (1 - nonzero / parameters), ``memory_bytes``
        (distinct parameters + persistent buffers), and with ``path`` ``disk_weight_bytes`` (the
        ``*.safetensors`` files) and ``disk_bytes`` (all files but the manifest).
    """
    tensors: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        tensors.setdefault(id(p), p)
    params = sum(p.numel() for p in tensors.values())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in tensors.values())
    for m in model.modules():
        if callable(getattr(m, "dequantized_weight", None)):  # a quantized layer (compress.quant.QuantizedLinear)
            params += m.in_features * m.out_features
            nonzero += int(torch.count_nonzero(m.dequantized_weight()))
    seen: dict[int, torch.Tensor] = {}
    for t in model.state_dict(keep_vars=True).values():
        seen.setdefault(id(t), t)
    out: dict[str, Any] = {
        "parameters": params,
        "nonzero_parameters": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "memory_bytes": sum(t.numel() * t.element_size() for t in seen.values()),
    }
    if path is not None:
        out["disk_weight_bytes"] = weight_bytes(path)
        out["disk_bytes"] = bytes_on_disk(path)
    return out


__all__ = ["calibration_ids", "eval_windows", "model_size", "perplexity_on"]
