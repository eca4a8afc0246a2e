"""Batched token-by-token generation with per-request sampling parameters (pure torch, no Ray).

Why a decode loop of our own instead of ``model.generate``: a server batches unrelated requests, and
each keeps its own ``temperature``, ``top_p``, ``max_tokens``, ``stop`` strings and ``seed`` (a seeded
request must give the same text whatever it was batched with), and streaming needs every row's new
text after every step. ``generate`` takes one set of sampling parameters per batch and streams only
batch size 1, so the loop below does prefill + KV-cached decode itself; the model, the KV cache
(``DynamicCache``) and the tokenizer are transformers'.

Usage::

    engine = BatchGenerator(model, tokenizer)
    state, outputs = engine.prefill([GenerationRequest(ids, SamplingParams(max_tokens=16))])  # 1st token
    while not state.done:
        outputs = engine.step(state)  # one StepOutput (or None once finished) per request

:class:`~raydist.serve.batcher.ContinuousBatcher` runs that loop on a thread for a server: requests that arrive
while a batch is decoding are prefilled and merged into it between two steps (continuous batching).

~560 lines: the request/step types, sampling and the batch state's prefill/step/merge are one decode loop;
continuous batching on a thread is ``batcher.py``.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from raydist.serve.fast_llama import FastLlama, KVLayer


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: most new tokens to generate (> 0).
        temperature: 0 = greedy; > 0 scales logits before sampling.
        top_p: nucleus sampling mass in [0, 1] (with temperature > 0; 0 keeps only the likeliest token).
        stop: strings that end the generation; the returned text stops before the first match.
        seed: seeds this request's own sampler (None = fresh randomness).
        logprobs: with each generated token, its log-probability and the ``logprobs`` likeliest alternatives
            (0: the token's own only; None: none). Always the model's own distribution (before temperature,
            penalties and bias), as OpenAI and vLLM report them.
        presence_penalty / frequency_penalty: OpenAI's penalties, subtracted from the logits of tokens already
            generated (once, resp. once per occurrence).
        logit_bias: ``(token id, bias)`` pairs added to the logits before choosing.
        ignore_eos: keep generating past end-of-sequence tokens until ``max_tokens`` (benchmarks: every
            request then does the same work).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature can overflow to inf (NaN probabilities); the limit is greedy anyway.
        return self.temperature < 1e-4

    def __post_init__(self):
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class GenerationRequest:
    """One prompt to continue. ``cancelled`` may be set from outside (client gone): the row then stops.

    ``prompt_logprobs`` (echo): also score the prompt, every token but the first with its log-probability
    and that many likeliest alternatives (computed in the same prefill).
    """

    prompt_ids: list[int]
    params: SamplingParams
    cancelled: bool = False
    prompt_logprobs: Optional[int] = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model and the likeliest alternatives at its position.

    Attributes:
        token_id: the token.
        logprob: its log-probability (natural log) given everything before it.
        top: the ``k`` likeliest ``(token id, logprob)`` at that position, likeliest first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """What one request gained in one step.

    Attributes:
        text: new text that is safe to show (never part of a possible stop string or a split UTF-8 char).
        completion_tokens: tokens generated for this request so far.
        finish_reason: None while running; "stop" (EOS or stop string) or "length" (max_tokens) at the end.
        token_id: the token generated in this step.
        logprob: that token's log-probability and alternatives (``params.logprobs`` set), else None.
        prompt_logprobs: first step of a request with ``prompt_logprobs``: one entry per prompt token, the
            first None (nothing precedes it).
    """

    text: str
    completion_tokens: int
    finish_reason: Optional[str] = None
    token_id: Optional[int] = None
    logprob: Optional[TokenLogprob] = None
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None


@dataclass
class Completion:
    """A finished request (what :meth:`BatchGenerator.generate` returns)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None


class _TextTracker:
    """Turns one row's growing token list into safe text increments and detects stop strings.

    The whole continuation is re-decoded each step (a few hundred tokens at most): decoding tokens one by
    one would break multi-token characters and tokenizers that merge spaces across tokens.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded continuation already handed out

    def add(self, token_id: Optional[int]) -> tuple[str, bool]:
        """Append a token (None = no token, only flush) and return ``(new_text, hit_stop)``."""
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                new = text[self.emitted : cut] if cut > self.emitted else ""
                self.emitted = max(self.emitted, cut)
                return new, True
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = len(text.rstrip("\ufffd"))
        # Hold back the longest suffix that could still grow into a stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    hold = max(hold, k)
                    break
        safe -= hold
        new = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return new, False

    def flush(self) -> str:
        """The held-back remainder at the end of generation (no stop string completed)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[self.emitted :] if len(text) > self.emitted else ""
        self.emitted = len(text)
        return new


@dataclass
class BatchState:
    """The running batch: KV cache, masks and per-row progress. Rows are dropped as they finish."""

    requests: list[GenerationRequest]
    rows: list[int]  # request index of each live batch row
    cache: object
    attention_mask: torch.Tensor  # [B_live, seen_tokens]
    next_positions: torch.Tensor  # [B_live] position id of the next token
    next_tokens: torch.Tensor  # [B_live] last sampled token, fed at the next step
    trackers: list[_TextTracker]
    counts: list[int]
    generators: list[Optional[torch.Generator]]
    finished: list[bool] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.rows


class BatchGenerator:
    """Prefill + KV-cached decode of a left-padded batch, every row with its own sampling parameters.

    Args:
        model: a transformers causal LM (eval mode is set here).
        tokenizer: its tokenizer (a pad token is not required: padding uses a masked id 0 or eos).
        fast: run Llama-layout models on CPU through :class:`~raydist.serve.fast_llama.FastLlama` (same
            weights and math, fused ops; models it does not cover use transformers' forward either way).

    Attributes:
        fast: the fast forward in use, or None (transformers' forward).
    """

    def __init__(self, model, tokenizer, fast: bool = True):

        self.model = model.eval()
        self.fast = FastLlama.build(model) if fast else None
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        eos = set()
        for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_ids = eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name is deprecated).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    # -- model calls -------------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, all_positions: bool = False):
        """Logits of the last position [B, V] (float32), the updated cache, and (``all_positions``) the logits
        of every position [B, T, V] (model dtype)."""
        if self.fast is not None:
            logits = self.fast.forward(input_ids, attention_mask, position_ids, cache, all_positions)
            return logits[:, -1, :], cache, (logits if all_positions else None)
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._has_logits_to_keep and not all_positions:
            kwargs["logits_to_keep"] = 1  # the vocab projection only where a token is sampled
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :].float(), new_cache, (out.logits if all_positions else None)

    @staticmethod
    def _scored(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        """``token``'s entry from one position's log-probabilities [V], with the ``k`` likeliest alternatives."""
        top = ()
        if k > 0:
            values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logprobs[token]), top)

    def _prompt_logprobs(
        self, logits: torch.Tensor, requests: Sequence[GenerationRequest], width: int
    ) -> list[Optional[tuple[Optional[TokenLogprob], ...]]]:
        """Score every prompt token (after the first) of the requests that ask, from the prefill's logits of
        all positions [B, T, V]; row by row so only one row's [T, V] log-softmax is held at a time."""
        scored: list[Optional[tuple[Optional[TokenLogprob], ...]]] = []
        for i, r in enumerate(requests):
            if r.prompt_logprobs is None:
                scored.append(None)
                continue
            n = len(r.prompt_ids)
            lp = torch.log_softmax(logits[i, width - n : width - 1].float(), dim=-1)  # position j predicts token j+1
            entries: list[Optional[TokenLogprob]] = [None]
            entries += [self._scored(lp[j], r.prompt_ids[j + 1], r.prompt_logprobs) for j in range(n - 1)]
            scored.append(tuple(entries))
        return scored

    def _adjust(self, logits: torch.Tensor, b: int, p: SamplingParams, generated: list[int]) -> None:
        """OpenAI's penalties and logit_bias on row ``b`` of ``logits``, in place."""
        row = logits[b]
        if generated and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=row.shape[0])[: row.shape[0]]
            row -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty * (counts > 0).to(row.dtype)
        for token, bias in p.logit_bias:
            if 0 <= token < row.shape[0]:
                row[token] += bias

    def _sample(self, logits: torch.Tensor, state: BatchState) -> tuple[torch.Tensor, list[Optional[TokenLogprob]]]:
        """One token per live row [B] from logits [B, V], each row with its own parameters and RNG; and each
        row's logprob entry when it asks for one (taken from the model's logits, before any adjustment)."""
        params = [state.requests[r].params for r in state.rows]
        wants = [p.logprobs is not None for p in params]
        logprobs = torch.log_softmax(logits, dim=-1) if any(wants) else None
        if any(p.adjusts_logits for p in params):
            logits = logits.clone()
            for b, (r, p) in enumerate(zip(state.rows, params)):
                if p.adjusts_logits:
                    self._adjust(logits, b, p, state.trackers[r].ids)
        tokens = logits.argmax(dim=-1)
        for b, r in enumerate(state.rows):
            p = params[b]
            if p.greedy:
                continue
            probs = torch.softmax(logits[b] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
                drop[0] = False
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            tokens[b] = torch.multinomial(probs, 1, generator=state.generators[b]).item()
        scored = [
            self._scored(logprobs[b], int(tokens[b]), p.logprobs) if want else None
            for b, (p, want) in enumerate(zip(params, wants))
        ]
        return tokens, scored

    # -- public API --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, requests: Sequence[GenerationRequest]) -> tuple[BatchState, list[Optional[StepOutput]]]:
        """Run the prompts as one left-padded batch and sample each request's first token.

        Returns:
            ``(state, outputs)``: the batch state and the first :class:`StepOutput` of every request.

        Raises:
            ValueError: an empty prompt, or prompt + max_tokens beyond the model's context.
        """
        from transformers import DynamicCache

        if not requests:
            raise ValueError("prefill needs at least one request")
        for i, r in enumerate(requests):
            if not r.prompt_ids:
                raise ValueError(f"request {i}: empty prompt")
            if self.max_positions and len(r.prompt_ids) + r.params.max_tokens > self.max_positions:
                raise ValueError(
                    f"request {i}: prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.params.max_tokens}) "
                    f"exceeds the model's context of {self.max_positions} tokens"
                )
        width = max(len(r.prompt_ids) for r in requests)
        n = len(requests)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every prompt ends where generation starts
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] real positions, 0 under padding
        generators = []
        for r in requests:
            if r.params.greedy:
                generators.append(None)
            else:
                seed = r.params.seed if r.params.seed is not None else secrets.randbits(63)
                generators.append(torch.Generator().manual_seed(seed))
        cache = self.fast.new_cache() if self.fast is not None else DynamicCache(config=self.model.config)
        echo = any(r.prompt_logprobs is not None for r in requests)
        logits, cache, every = self._forward(
            ids.to(self.device), mask.to(self.device), positions.to(self.device), cache, all_positions=echo
        )
        prompt_scores = self._prompt_logprobs(every, requests, width) if echo else [None] * n
        del every
        state = BatchState(
            requests=list(requests),
            rows=list(range(n)),
            cache=cache,
            attention_mask=mask.to(self.device),
            next_positions=positions[:, -1] + 1,
            next_tokens=torch.zeros(n, dtype=torch.long),
            trackers=[_TextTracker(self.tokenizer, r.params.stop) for r in requests],
            counts=[0] * n,
            generators=generators,
            finished=[False] * n,
        )
        return state, self._advance(state, *self._sample(logits.cpu(), state), prompt_scores)

    @torch.inference_mode()
    def step(self, state: BatchState) -> list[Optional[StepOutput]]:
        """Decode one more token for every live row.

        Returns:
            One entry per request (in request order): its :class:`StepOutput`, or None when it had already
            finished before this step.
        """
        if state.done:
            return [None] * len(state.requests)
        b = len(state.rows)
        mask = torch.cat(
            [
                state.attention_mask,
                torch.ones((b, 1), dtype=state.attention_mask.dtype, device=state.attention_mask.device),
            ],
            dim=1,
        )
        logits, state.cache, _ = self._forward(
            state.next_tokens.view(b, 1).to(self.device),
            mask,
            state.next_positions.view(b, 1).to(self.device),
            state.cache,
        )
        state.attention_mask = mask
        state.next_positions = state.next_positions + 1
        return self._advance(state, *self._sample(logits.cpu(), state))

    def _advance(
        self,
        state: BatchState,
        tokens: torch.Tensor,
        scored: list[Optional[TokenLogprob]],
        prompt_scores: Optional[list] = None,
    ) -> list[Optional[StepOutput]]:
        """Record the sampled tokens [B_live] (and their logprob entries), decide which rows finish, and drop
        them from the batch. ``prompt_scores``: after a prefill, each request's prompt logprobs (or None)."""
        outputs: list[Optional[StepOutput]] = [None] * len(state.requests)
        keep = []
        for b, r in enumerate(state.rows):
            req = state.requests[r]
            tok = int(tokens[b])
            tracker = state.trackers[r]
            state.counts[r] += 1
            finish = None
            if tok in self.eos_ids and not req.params.ignore_eos:
                text, _ = tracker.add(None)
                text += tracker.flush()
                finish = "stop"
            else:
                text, hit = tracker.add(tok)
                if hit:
                    finish = "stop"
                elif state.counts[r] >= req.params.max_tokens or req.cancelled:
                    text += tracker.flush()
                    finish = "length"
            outputs[r] = StepOutput(
                text=text,
                completion_tokens=state.counts[r],
                finish_reason=finish,
                token_id=tok,
                logprob=scored[b],
                prompt_logprobs=prompt_scores[r] if prompt_scores else None,
            )
            if finish is None:
                keep.append(b)
            else:
                state.finished[r] = True
        if len(keep) < len(state.rows):
            # Finished rows leave the batch so later steps cost only what is still running.
            idx = torch.tensor(keep, dtype=torch.long)
            if keep:
                state.cache.batch_select_indices(idx.to(self.device))
                state.attention_mask = state.attention_mask[idx.to(state.attention_mask.device)]
                state.next_positions = state.next_positions[idx]
                state.generators = [state.generators[i] for i in keep]
            state.rows = [state.rows[i] for i in keep]
            tokens = tokens[idx] if keep else tokens[:0]
        state.next_tokens = tokens.clone()
        return outputs

    def compact(self, state: BatchState) -> None:
        """Forget finished requests, so a batch that never drains does not grow with every request served."""
        live = sorted(set(state.rows))
        if len(live) == len(state.requests):
            return
        new_index = {old: new for new, old in enumerate(live)}
        state.requests = [state.requests[i] for i in live]
        state.trackers = [state.trackers[i] for i in live]
        state.counts = [state.counts[i] for i in live]
        state.finished = [state.finished[i] for i in live]
        state.rows = [new_index[r] for r in state.rows]

    @torch.inference_mode()
    def merge(self, state: BatchState, new: BatchState) -> None:
        """Append the live rows of ``new`` (a fresh prefill) to the running ``state``: continuous batching.

        Both KV caches are left-padded to the longer one and concatenated along the batch; the padding is
        masked out, and every row keeps its own position ids, so a joined row decodes exactly as it would
        alone. ``state`` is compacted first; request indices of ``new`` move behind those of ``state``.

        Raises:
            NotImplementedError: a cache layer that is not a plain growing (full-attention) layer.
        """
        self.compact(state)
        offset = len(state.requests)
        if not state.rows:  # nothing running: adopt the new batch as it is
            for name in (
                "requests",
                "rows",
                "cache",
                "attention_mask",
                "next_positions",
                "next_tokens",
                "trackers",
                "counts",
                "generators",
                "finished",
            ):
                setattr(state, name, getattr(new, name))
            return
        layers_a, layers_b = getattr(state.cache, "layers", None), getattr(new.cache, "layers", None)
        if layers_a is None or layers_b is None or any(getattr(x, "is_sliding", False) for x in layers_a + layers_b):
            raise NotImplementedError("only full-attention dynamic KV caches can be merged")
        t_a, t_b = state.attention_mask.shape[1], new.attention_mask.shape[1]
        width = max(t_a, t_b)

        def left_pad(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for la, lb in zip(layers_a, layers_b):  # keys/values [B, kv_heads, T, head_dim]
            if isinstance(la, KVLayer) and isinstance(lb, KVLayer):  # the fast path's cache: one copy
                la.join(lb, width)
                continue
            la.keys, la.values = (
                torch.cat([left_pad(la.keys, t_a, -2), left_pad(lb.keys, t_b, -2)], dim=0),
                torch.cat([left_pad(la.values, t_a, -2), left_pad(lb.values, t_b, -2)], dim=0),
            )
        state.attention_mask = torch.cat([left_pad(state.attention_mask, t_a, 1), left_pad(new.attention_mask, t_b, 1)])
        state.next_positions = torch.cat([state.next_positions, new.next_positions])
        state.next_tokens = torch.cat([state.next_tokens, new.next_tokens])
        state.generators = state.generators + new.generators
        state.rows = state.rows + [r + offset for r in new.rows]
        state.requests = state.requests + new.requests
        state.trackers = state.trackers + new.trackers
        state.counts = state.counts + new.counts
        state.finished = state.finished + new.finished

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Run a batch to the end (what the replica does without streaming; also used by benchmarks)."""
        state, outs = self.prefill(requests)
        done = [
            Completion("", len(r.prompt_ids), 0, "", prompt_logprobs=o.prompt_logprobs) for r, o in zip(requests, outs)
        ]
        while True:
            for c, o in zip(done, outs):
                if o is not None:
                    c.text += o.text
                    c.token_ids.append(o.token_id)
                    if o.logprob is not None:
                        c.logprobs.append(o.logprob)
                    if o.finish_reason:
                        c.completion_tokens, c.finish_reason = o.completion_tokens, o.finish_reason
            if state.done:
                break
            outs = self.step(state)
        return done
