"""Distillation across tokenizers: universal logit distillation (ULD, Boizard et al. 2024).

When student and teacher index different vocabularies their next-token distributions cannot be compared entry
by entry. ULD compares them up to a permutation: both probability vectors are sorted (the smaller one padded
with zeros to the larger vocabulary) and the loss is their L1 distance, the closed form of the Wasserstein-1
distance between the two sorted distributions. Sequences are aligned the way the ULD paper does: both models
read the same text, each tokenized by its own tokenizer, and the i-th target token of a row on one side is
paired with the i-th on the other, up to the shorter of the two (ULD's truncation; GOLD refines this by merging
token spans, not done here).

The training data is tokenized with the student's tokenizer; :func:`retokenize` gives the teacher its own
tokens of each row (the prompt and the response decoded to text and encoded again, so the teacher's targets are
the same response text). Pure torch + tokenizers; no Ray here.
"""

from __future__ import annotations

from typing import Optional

import torch

from raydist.core.data import IGNORE_INDEX, collate


def uld_loss_on_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0):
    """ULD summed over N aligned rows: ``sum_n || sort(p_s[n]) - sort(p_t[n]) ||_1`` with ``p = softmax(z / T)``,
    both sorted in decreasing order and the smaller vocabulary padded with zeros. Between 0 and 2 per row;
    0 iff the two distributions are the same up to a relabelling of tokens. Gradients reach the student only.

    Args:
        student_logits: [N, V_s]; teacher_logits: [N, V_t] (detached here); row n of both at aligned tokens.
        temperature: T > 0 of both softmaxes (no T² factor: the distance is bounded).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"row logits must be [N, V] with the same N, got {list(student_logits.shape)} and "
            f"{list(teacher_logits.shape)}"
        )
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    with torch.no_grad():
        p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = torch.nn.functional.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = torch.nn.functional.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum()


def aligned_rows(student_targets: torch.Tensor, teacher_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the flattened target rows of both sides (``mask.nonzero()`` order, row by row) that pair the
    i-th target of each batch row with the i-th of the same row on the other side, up to the shorter count.

    Args:
        student_targets: bool [B, T_s]; teacher_targets: bool [B, T_t] (the two tokenizations of the same rows).
    Returns:
        ``(student_index, teacher_index)``, int64 [M] each.
    """
    if student_targets.shape[0] != teacher_targets.shape[0]:
        raise ValueError("both sides must have the same rows")
    s_counts, t_counts = student_targets.sum(1).tolist(), teacher_targets.sum(1).tolist()
    s_idx, t_idx, s_start, t_start = [], [], 0, 0
    for ns, nt in zip(s_counts, t_counts):
        m = min(ns, nt)
        s_idx.append(torch.arange(s_start, s_start + m))
        t_idx.append(torch.arange(t_start, t_start + m))
        s_start, t_start = s_start + ns, t_start + nt
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return cat(s_idx), cat(t_idx)


def retokenize(
    batch: dict[str, torch.Tensor], student_tok, teacher_tok, pad_id: int, max_len: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """The teacher's tokenization of a student-tokenized batch: per row, the prompt (tokens before the first
    target) and the targets are decoded to text and encoded with ``teacher_tok``; labels -100 on the prompt;
    rows cut to ``max_len`` tokens (the teacher's context; the alignment then pairs fewer tokens).
    Returns right-padded ``input_ids`` / ``labels`` / ``attention_mask`` on the batch's device."""
    rows = []
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    for i in range(ids.shape[0]):
        target = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        if len(target) == 0:
            n = int(batch["attention_mask"][i].sum())
            prompt, response = ids[i, :n].tolist(), []
        else:
            first, last = int(target[0]), int(target[-1])
            prompt, response = ids[i, :first].tolist(), ids[i, first : last + 1].tolist()
        t_prompt = teacher_tok.encode(student_tok.decode(prompt), add_special_tokens=False) if prompt else []
        t_response = teacher_tok.encode(student_tok.decode(response), add_special_tokens=False) if response else []
        if not t_prompt and not t_response:
            t_prompt = [pad_id]
        row_ids, row_labels = t_prompt + t_response, [IGNORE_INDEX] * len(t_prompt) + t_response
        rows.append({"input_ids": row_ids[:max_len], "labels": row_labels[:max_len]})
    device = batch["input_ids"].device
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}
