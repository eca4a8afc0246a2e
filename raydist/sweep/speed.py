"""Generation speed as served: the sweep's tokens/s objective (raydist's serving engine or transformers' generate)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from raydist.core.evaluation import model_device
from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generation_speed(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    tokenizer=None,
    engine: str = "generate",
) -> dict[str, Any]:
    """Greedy generation speed on the model's device with its own kernels.

    Prompts are random token ids (fixed by ``seed``, special ids avoided); generation is forced to exactly
    ``new_tokens`` tokens (EOS is ignored), with the KV cache, so every method generates the same amount of
    work. CUDA is synchronised around each timed call.

    Args:
        engine: ``"serve"``: raydist's serving engine (``raydist.serve.engine.BatchGenerator``, the decode loop
            ``raydist serve`` runs; needs ``tokenizer``), so the speed is the served speed; ``"generate"``:
            transformers' ``model.generate``.
        batch_size: prompts generated together (1 = latency, 8 = throughput).
        prompt_len / new_tokens: tokens in each prompt / generated per prompt.
        repeats: timed runs (the median is reported); warmup: untimed runs before them.

    Returns:
        ``tokens_per_s`` (generated tokens of the whole batch per second, median run), ``seconds``
        (median), ``seconds_all``, ``generated_tokens`` (per run, = batch_size * new_tokens, checked),
        ``batch_size``, ``prompt_len``, ``new_tokens``, ``device``, ``engine`` (and for ``"serve"``
        ``fast_path``: whether the engine's fast Llama forward ran).

    Raises:
        ValueError: a non-positive size or repeat count.
        RuntimeError: the model generated a different number of tokens than asked.
    """
    for name, v in (
        ("batch_size", batch_size),
        ("prompt_len", prompt_len),
        ("new_tokens", new_tokens),
        ("repeats", repeats),
    ):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = model_device(model)
    vocab = model.config.vocab_size
    low = min(16, vocab - 1)  # skip the special ids at the start of the vocabulary
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch_size, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
    )
    if engine not in ("serve", "generate"):
        raise ValueError(f"engine must be 'serve' or 'generate', got {engine!r}")
    if engine == "serve" and tokenizer is None:
        raise ValueError("engine='serve' needs the model's tokenizer")
    was_training = model.training
    model.eval()
    times: list[float] = []
    fast = None
    try:
        if engine == "serve":
            gen = BatchGenerator(model, tokenizer)
            fast = gen.fast is not None
            params = SamplingParams(new_tokens, 0.0, ignore_eos=True)
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            if engine == "serve":
                done = gen.generate([GenerationRequest(row.tolist(), params) for row in ids])
                made = [c.completion_tokens for c in done]
            else:
                made = [model.generate(ids, **kwargs).shape[1] - prompt_len] * batch_size
            _sync(device)
            dt = time.perf_counter() - t0
            if made != [new_tokens] * batch_size:
                raise RuntimeError(f"{engine} generated {made} tokens per prompt, expected {new_tokens}")
            if i >= warmup:
                times.append(dt)
    finally:
        model.train(was_training)
    med = statistics.median(times)
    return {
        "tokens_per_s": batch_size * new_tokens / med,
        "seconds": med,
        "seconds_all": times,
        "generated_tokens": batch_size * new_tokens,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "device": str(device),
        "engine": engine,
        **({"fast_path": fast} if engine == "serve" else {}),
    }


__all__ = ["generation_speed"]
