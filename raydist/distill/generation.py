"""Prompt rendering and batched generation for sequence-level distillation (`raydist generate`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from raydist.core.data import DataError, expand_instruction_records, instruction_to_messages, left_pad


def prompt_records(records: Sequence[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """Normalise records into ``{"messages": [...]}`` prompts (the conversation so far, ending with a
    user turn) plus the fields to echo into the output (``instruction``/``input`` for instruction data).
    A trailing assistant turn (an existing answer) is dropped: the model writes its own."""
    out = []
    if fmt == "instruction":
        for r in expand_instruction_records(
            {**x, "output": x.get("output", "")} if "instances" not in x else x for x in records
        ):
            msgs = instruction_to_messages(r)[:1]
            out.append({"messages": msgs, "instruction": r["instruction"], "input": r.get("input", "")})
    elif fmt == "chat":
        for i, r in enumerate(records):
            msgs = list(r["messages"])
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            if not msgs or msgs[-1].get("role") != "user":
                raise DataError(f"chat record {i} does not end with a user turn to answer")
            out.append({"messages": msgs})
    else:
        raise DataError(f"prompts must be instruction or chat data, got {fmt!r}")
    return out


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> list[str]:
    """Generate one answer per prompt (left-padded batch). Returns the decoded new text, special tokens removed."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(prompts, pad)
    width = ids.shape[1]
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]
