"""The OpenAI-compatible HTTP API as a plain FastAPI app (no Ray here, so it is testable on its own).

The Serve deployment (``raydist.serve.deployment``) builds this app inside each replica and plugs in its
batched generator as the :class:`GenerationBackend`; unit tests plug in :class:`~raydist.serve.http.DirectBackend`.

Every client mistake ends as a 4xx with OpenAI's error envelope ``{"error": {message, type, param, code}}``:
checks run in the order auth → body size → JSON → schema → model id → prompt/limits, all before the
request reaches the model, so a bad request never joins (or breaks) a batch.

~770 lines on purpose: the OpenAI API is one class whose handlers share request parsing, validation, sampling
parameters and the logprob builders; the FastAPI app around it is ``http.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Union

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from raydist.config.serve import LimitSettings
from raydist.core.data import render_prompt
from raydist.serve.engine import GenerationRequest, SamplingParams, StepOutput, TokenLogprob
from raydist.serve.schemas import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TopLogprob,
    Usage,
    error_body,
    validation_error_to_api_error,
)

logger = logging.getLogger("raydist.serve")


class GenerationBackend(Protocol):
    """Runs one generation request; yields its :class:`StepOutput` s, the last one with a finish_reason."""

    def submit(self, request: GenerationRequest) -> AsyncIterator[StepOutput]: ...


class RequestObserver(Protocol):
    """Receives one call per finished HTTP request and per finished generation (metrics)."""

    def request_done(self, route: str, status: int, latency_s: float) -> None: ...

    def tokens(self, prompt_tokens: int, completion_tokens: int) -> None: ...


class _NoObserver:
    def request_done(self, route: str, status: int, latency_s: float) -> None:
        pass

    def tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        pass


@dataclass
class ModelInfo:
    """What the API needs to know about the served model.

    Attributes:
        model_id: the id in /v1/models and in every response.
        context_length: prompt + completion tokens the model accepts (None = unknown, not checked).
        vocab_size: token ids in a prompt must be below this.
        created: unix time the model was loaded (``created`` in /v1/models).
    """

    model_id: str
    context_length: Optional[int]
    vocab_size: int
    created: int


class JSONBody(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed in an error message can never break encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _sse(data: Union[dict, BaseModel]) -> str:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return f"data: {json.dumps(data, ensure_ascii=True, separators=(',', ':'))}\n\n"


_SSE_DONE = "data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_DONE = object()


@dataclass
class Generated:
    """One finished generation: text, finish reason, generated token ids, and the logprob entries asked for."""

    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None

    def add(self, out: StepOutput) -> None:
        self.text += out.text
        self.completion_tokens = out.completion_tokens
        self.finish_reason = out.finish_reason
        if out.token_id is not None:
            self.token_ids.append(out.token_id)
        if out.logprob is not None:
            self.logprobs.append(out.logprob)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs

    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


class TokenTexts:
    """Each token's text and bytes, as the logprobs of a response show them (cached per token id).

    A byte-level BPE token (GPT-2 / Llama 3 / SmolLM style) gets its exact bytes, so a character split over
    two tokens is still reported faithfully in ``bytes``; other tokenizers get the UTF-8 of the decoded text.
    """

    def __init__(self, tokenizer):
        from functools import lru_cache

        self.tokenizer = tokenizer
        try:
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

            self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        except ImportError:  # pragma: no cover - a transformers without GPT-2's helper
            self._byte_of = {}
        self.text = lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(raw, str) and raw and all(c in self._byte_of for c in raw):
            return [self._byte_of[c] for c in raw]
        return list(self.text(token_id).encode("utf-8"))


class OpenAIService:
    """Request validation, prompt rendering and response formatting around a :class:`GenerationBackend`.

    Args:
        tokenizer: the model's tokenizer (chat template for /v1/chat/completions).
        backend: where validated generation requests go.
        info: the served model's id and shape limits.
        limits: the server's request limits.
        api_key: when set, /v1 routes and /stats need ``Authorization: Bearer <api_key>``.
        observer: metrics sink.
        ready: returns True once the replica can serve (readiness route).
        stats: returns replica statistics for ``GET /stats`` (batch sizes, pid, ...).
    """

    def __init__(
        self,
        tokenizer,
        backend: GenerationBackend,
        info: ModelInfo,
        limits: LimitSettings,
        *,
        api_key: Optional[str] = None,
        observer: Optional[RequestObserver] = None,
        ready: Callable[[], bool] = lambda: True,
        stats: Callable[[], dict] = dict,
    ):
        self.tokenizer = tokenizer
        self.backend = backend
        self.info = info
        self.limits = limits
        self.api_key = api_key
        self.observer = observer or _NoObserver()
        self.ready = ready
        self.stats = stats
        self.texts = TokenTexts(tokenizer)

    # -- checks ------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        """Raises APIError(401) unless the request carries the configured bearer key."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8", "replace"), self.api_key.encode("utf-8")
        ):
            raise APIError(
                401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object, within ``limits.max_body_bytes``.

        Raises:
            APIError: 413 for an oversized body, 400 for an empty, non-JSON or non-object body.
        """
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise APIError(400, f"invalid Content-Length header {declared[:32]!r}")
            if int(declared) > limit:
                raise APIError(
                    413,
                    f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                    code="request_too_large",
                )
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:  # a chunked body without Content-Length is cut off here
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        if not buf.strip():
            raise APIError(400, "request body is empty; expected a JSON object")
        try:
            data = json.loads(bytes(buf), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        return data

    @staticmethod
    def parse(schema: type, data: dict[str, Any]):
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise validation_error_to_api_error(e) from None

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.info.model_id:
            raise APIError(
                404,
                f"The model `{model[:256]}` does not exist; this server serves `{self.info.model_id}`.",
                param="model",
                code="model_not_found",
            )

    async def encode_prompt(self, prompt: Union[str, list[int]]) -> list[int]:
        """Token ids of a completion prompt (a string, or ids checked against the vocabulary)."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.info.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})",
                    param="prompt",
                )
            ids = list(prompt)
        else:
            self._check_chars(len(prompt), "prompt")
            try:
                ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
            except Exception as e:  # e.g. lone surrogates the Rust tokenizer cannot take
                raise APIError(400, f"prompt could not be tokenized: {str(e)[:200]}", param="prompt") from None
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise APIError(400, "prompt is empty", param="prompt")
            ids = [bos]  # an empty prompt continues from the start-of-text token
        return ids

    async def render_chat(self, conversation: list[dict[str, str]]) -> list[int]:

        self._check_chars(sum(len(m["content"]) for m in conversation), "messages")
        try:
            return await asyncio.to_thread(render_prompt, self.tokenizer, conversation)
        except Exception as e:  # the model's chat template may refuse a conversation (roles, order)
            raise APIError(
                400, f"messages could not be rendered with the model's chat template: {str(e)[:200]}", param="messages"
            ) from None

    def _check_chars(self, n_chars: int, param: str) -> None:
        # BPE tokens rarely span more than a few dozen characters, so text beyond 64 characters per allowed
        # token cannot fit; refusing it before tokenizing keeps a hostile megabyte prompt cheap.
        if n_chars > 64 * self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"{param}: {n_chars} characters is far beyond the limit of "
                f"{self.limits.max_prompt_tokens} prompt tokens",
                param=param,
                code="context_length_exceeded",
            )

    def check_choices(self, n: int, candidates: int, logprobs: Optional[int], logprobs_param: str) -> None:
        """``n`` / ``best_of`` / ``logprobs`` within the server's limits."""
        if candidates > self.limits.max_n:
            name = "n" if candidates == n else "best_of"
            raise APIError(400, f"{name} is {candidates}; this server allows at most {self.limits.max_n}", param=name)
        if logprobs is not None and logprobs > self.limits.max_logprobs:
            raise APIError(
                400,
                f"{logprobs_param} is {logprobs}; this server returns at most "
                f"{self.limits.max_logprobs} alternatives per token",
                param=logprobs_param,
            )

    def logit_bias(self, req) -> tuple[tuple[int, float], ...]:
        pairs = req.logit_bias_pairs()
        bad = [t for t, _ in pairs if t >= self.info.vocab_size]
        if bad:
            raise APIError(
                400,
                f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})",
                param="logit_bias",
            )
        return pairs

    def sampling(
        self,
        req,
        prompt_ids: list[int],
        requested: Optional[int],
        default: int,
        *,
        choice: int = 0,
        logprobs: Optional[int] = None,
        prompt_logprobs: Optional[int] = None,
        logit_bias: tuple[tuple[int, float], ...] = (),
    ) -> GenerationRequest:
        """Check the prompt and token limits and build the generation request (``choice``: which of a prompt's
        ``n`` choices; a seeded request's choices use seeds ``seed``, ``seed + 1``, ... so they differ)."""
        n_prompt = len(prompt_ids)
        if n_prompt > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens; this server accepts at most {self.limits.max_prompt_tokens}",
                param="messages" if hasattr(req, "messages") else "prompt",
                code="context_length_exceeded",
            )
        ctx = self.info.context_length
        if requested is not None and requested > self.limits.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {requested}; this server allows at most {self.limits.max_tokens}",
                param="max_tokens",
            )
        max_tokens = requested if requested is not None else default
        if ctx is not None:
            room = ctx - n_prompt
            if room < 1 or (requested is not None and requested > room):
                raise APIError(
                    400,
                    f"this model's maximum context length is {ctx} tokens; the prompt has {n_prompt} "
                    f"and max_tokens asks for {max_tokens}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, room)  # a default that would overflow is shortened, not refused
        stops = req.stop_list()
        if len(stops) > self.limits.max_stop_sequences:
            raise APIError(
                400, f"stop: at most {self.limits.max_stop_sequences} sequences, got {len(stops)}", param="stop"
            )
        if any(len(s) > 256 for s in stops):
            raise APIError(400, "stop: each sequence must be at most 256 characters", param="stop")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(s for s in stops if s),
            seed=None if req.seed is None else (req.seed + choice) % (1 << 63),
            logprobs=logprobs,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            logit_bias=logit_bias,
        )
        return GenerationRequest(prompt_ids=prompt_ids, params=params, prompt_logprobs=prompt_logprobs)

    # -- generation --------------------------------------------------------------------------------
    async def steps(self, gens: list[GenerationRequest]) -> AsyncIterator[tuple[int, StepOutput]]:
        """Every step of every generation as ``(index in gens, step)``, in the order they are made; the
        generations run concurrently, so the server batches them. Leaving early (or failing) cancels them all."""
        if len(gens) == 1:  # the common case, without tasks
            try:
                async with aclosing(self.backend.submit(gens[0])) as steps:  # closed now, not whenever GC runs
                    async for out in steps:
                        yield 0, out
                        if out.finish_reason:
                            break
            finally:
                gens[0].cancelled = True  # a client that went away frees its batch row at the next step
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, gen: GenerationRequest) -> None:
            try:
                async with aclosing(self.backend.submit(gen)) as steps:
                    async for out in steps:
                        queue.put_nowait((k, out))
                        if out.finish_reason:
                            break
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((k, e))
            finally:
                queue.put_nowait((k, _DONE))

        tasks = [asyncio.ensure_future(pump(k, g)) for k, g in enumerate(gens)]
        try:
            running = len(tasks)
            while running:
                k, item = await queue.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield k, item
        finally:
            for t in tasks:
                t.cancel()
            for g in gens:
                g.cancelled = True

    async def run(self, gens: list[GenerationRequest]) -> list[Generated]:
        """Generate every request to the end (concurrently); one :class:`Generated` per request."""
        done = [Generated() for _ in gens]
        async with aclosing(self.steps(gens)) as steps:
            async for k, out in steps:
                done[k].add(out)
        for gen, g in zip(gens, done):
            if g.finish_reason is None:
                raise RuntimeError("the generation ended without a finish reason")
            self.observer.tokens(len(gen.prompt_ids), g.completion_tokens)
        return done

    async def stream(
        self,
        gens: list[GenerationRequest],
        chunk: Callable[[int, StepOutput], Optional[dict]],
        first: list[dict],
        usage_chunk: Optional[Callable[[Usage], dict]],
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        """Server-sent events: ``first``, one chunk per step of any generation with new text, logprobs or a
        finish reason (``chunk(index, step)``), the usage chunk (``stream_options.include_usage``), then
        ``[DONE]``. A failure mid-stream is sent as an error event (the status line is already out)."""
        counts = [0] * len(gens)
        try:
            for f in first:
                yield _sse(f)
            async with aclosing(self.steps(gens)) as steps:
                async for k, out in steps:
                    counts[k] = out.completion_tokens
                    data = chunk(k, out)
                    if data is not None:
                        yield _sse(data)
            for gen, c in zip(gens, counts):
                self.observer.tokens(len(gen.prompt_ids), c)
            if usage_chunk is not None:
                yield _sse(usage_chunk(Usage.of(prompt_tokens, sum(counts))))
        except Exception as e:  # noqa: BLE001 - the client must hear about it; the status line is already sent
            logger.exception("generation failed mid-stream")
            yield _sse(error_body(f"generation failed: {type(e).__name__}", type="server_error"))
        yield _SSE_DONE

    # -- logprobs in OpenAI's two shapes ------------------------------------------------------------
    def completion_logprobs(
        self, token_ids: list[int], entries: list[Optional[TokenLogprob]], offset: int = 0
    ) -> CompletionLogprobs:
        """The completions API's ``logprobs``: per token its text, logprob, alternatives (text -> logprob, the
        token itself included, as vLLM) and character offset (from ``offset``, summing the token texts)."""
        out = CompletionLogprobs()
        for token, e in zip(token_ids, entries):
            text = self.texts.text(token)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if e is None:  # the first prompt token: nothing precedes it
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            top: dict[str, float] = {}
            for alt, value in e.top:  # likeliest first; tokens with the same text keep the likeliest
                top.setdefault(self.texts.text(alt), value)
            top.setdefault(text, e.logprob)
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append(top)
        return out

    def chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        """The chat API's ``logprobs``: ``content`` with token, logprob, bytes and ``top_logprobs``."""

        def top(token: int, value: float) -> TopLogprob:
            return TopLogprob(token=self.texts.text(token), logprob=value, bytes=self.texts.bytes(token))

        return ChatLogprobs(
            content=[
                ChatTokenLogprob(**top(e.token_id, e.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in e.top])
                for e in entries
            ]
        )

    # -- routes ------------------------------------------------------------------------------------
    async def completions(self, request: Request):
        data = await self.read_json(request)
        req: CompletionRequest = self.parse(CompletionRequest, data)
        self.check_model(req.model)
        n, candidates = req.choices_per_prompt(), req.candidates_per_prompt()
        self.check_choices(n, candidates, req.logprobs, "logprobs")
        prompts = req.prompts()
        if len(prompts) > self.limits.max_prompts:
            raise APIError(
                400,
                f"prompt: {len(prompts)} prompts in one request; this server accepts at most {self.limits.max_prompts}",
                param="prompt",
            )
        encoded = [await self.encode_prompt(p) for p in prompts]
        bias = self.logit_bias(req)
        # best_of ranks candidates by their cumulative logprob, so they are scored even when not asked
        scored = req.logprobs if req.logprobs is not None else (0 if candidates > n else None)
        echo_scores = req.logprobs if req.echo and req.logprobs is not None else None
        gens = [
            self.sampling(
                req,
                ids,
                req.max_tokens,
                self.limits.completion_default(),
                choice=j,
                logprobs=scored,
                prompt_logprobs=echo_scores,
                logit_bias=bias,
            )
            for ids in encoded
            for j in range(candidates)
        ]
        echoed = (
            [p if isinstance(p, str) else self.tokenizer.decode(ids) for p, ids in zip(prompts, encoded)]
            if req.echo
            else [""] * len(prompts)
        )
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = sum(len(ids) for ids in encoded)
        if req.stream:  # best_of > n is refused with stream: every generation is a choice
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            base = {"id": rid, "object": "text_completion", "created": created, "model": self.info.model_id}
            extra = {"usage": None} if include_usage else {}
            offsets = [0] * len(gens)  # text_offset of each choice's next token
            echo_pending = [bool(req.echo)] * len(gens)

            def chunk(k: int, out: StepOutput) -> Optional[dict]:
                text, lp = out.text, None
                if echo_pending[k]:  # a choice's first chunk starts with the prompt (and its scores), as vLLM's
                    echo_pending[k] = False
                    text = echoed[k // n] + text
                    if echo_scores is not None and out.prompt_logprobs is not None:
                        lp = self.completion_logprobs(gens[k].prompt_ids, list(out.prompt_logprobs))
                        offsets[k] = sum(len(t) for t in lp.tokens)
                if req.logprobs is not None and out.logprob is not None:
                    step = self.completion_logprobs([out.token_id], [out.logprob], offsets[k])
                    offsets[k] += len(step.tokens[0])
                    lp = step if lp is None else lp.extend(step)
                if not text and not out.finish_reason and lp is None:
                    return None
                return {
                    **base,
                    "choices": [
                        {
                            "text": text,
                            "index": k,
                            "logprobs": None if lp is None else lp.model_dump(),
                            "finish_reason": out.finish_reason,
                        }
                    ],
                    **extra,
                }

            first: list[dict] = []
            usage = (lambda u: {**base, "choices": [], "usage": u.model_dump()}) if include_usage else None
            return StreamingResponse(
                self.stream(gens, chunk, first, usage, n_prompt), media_type="text/event-stream", headers=_SSE_HEADERS
            )
        done = await self.run(gens)
        choices = []
        for i, ids in enumerate(encoded):
            group = done[i * candidates : (i + 1) * candidates]
            if candidates > n:
                group = sorted(group, key=Generated.cumulative_logprob, reverse=True)[:n]
            for j, g in enumerate(group):
                logprobs = None
                if req.logprobs is not None:
                    if req.echo:
                        logprobs = self.completion_logprobs(ids + g.token_ids, list(g.prompt_logprobs) + g.logprobs)
                    else:
                        logprobs = self.completion_logprobs(g.token_ids, g.logprobs)
                choices.append(
                    CompletionChoice(
                        text=echoed[i] + g.text, index=i * n + j, logprobs=logprobs, finish_reason=g.finish_reason
                    )
                )
        body = CompletionResponse(
            id=rid,
            created=created,
            model=self.info.model_id,
            choices=choices,
            usage=Usage.of(n_prompt, sum(g.completion_tokens for g in done)),
        )
        return JSONBody(body.model_dump(mode="json"))

    async def chat_completions(self, request: Request):
        data = await self.read_json(request)
        req: ChatCompletionRequest = self.parse(ChatCompletionRequest, data)
        self.check_model(req.model)
        n = req.choices_per_prompt()
        top = (req.top_logprobs or 0) if req.logprobs else None
        self.check_choices(n, n, top, "top_logprobs")
        ids = await self.render_chat(req.conversation())
        bias = self.logit_bias(req)
        gens = [
            self.sampling(
                req,
                ids,
                req.requested_max_tokens(),
                self.limits.chat_default(),
                choice=j,
                logprobs=top,
                logit_bias=bias,
            )
            for j in range(n)
        ]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.info.model_id}
            extra = {"usage": None} if include_usage else {}

            def chunk(k: int, out: StepOutput) -> Optional[dict]:
                lp = None
                if top is not None and out.logprob is not None:
                    lp = self.chat_logprobs([out.logprob]).model_dump()
                if not out.text and not out.finish_reason and lp is None:
                    return None
                delta = {"content": out.text} if out.text else {}
                return {
                    **base,
                    "choices": [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}],
                    **extra,
                }

            first = [
                {
                    **base,
                    "choices": [
                        {
                            "index": k,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    **extra,
                }
                for k in range(n)
            ]
            usage = (lambda u: {**base, "choices": [], "usage": u.model_dump()}) if include_usage else None
            return StreamingResponse(
                self.stream(gens, chunk, first, usage, len(ids)), media_type="text/event-stream", headers=_SSE_HEADERS
            )
        done = await self.run(gens)
        body = ChatCompletionResponse(
            id=rid,
            created=created,
            model=self.info.model_id,
            choices=[
                ChatChoice(
                    index=k,
                    message=AssistantMessage(content=g.text),
                    finish_reason=g.finish_reason,
                    logprobs=self.chat_logprobs(g.logprobs) if top is not None else None,
                )
                for k, g in enumerate(done)
            ],
            usage=Usage.of(len(ids), sum(g.completion_tokens for g in done)),
        )
        return JSONBody(body.model_dump(mode="json"))

    # -- tokenizer routes (vLLM's) ------------------------------------------------------------------
    async def tokenize(self, request: Request) -> JSONBody:
        req: TokenizeRequest = self.parse(TokenizeRequest, await self.read_json(request))
        self.check_model(req.model)
        if req.prompt is not None:
            self._check_chars(len(req.prompt), "prompt")
            try:
                ids = await asyncio.to_thread(
                    self.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens
                )
            except Exception as e:  # noqa: BLE001 - e.g. lone surrogates
                raise APIError(400, f"prompt could not be tokenized: {str(e)[:200]}", param="prompt") from None
        else:
            ids = await self.render_chat(
                [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            )
        body: dict[str, Any] = {"count": len(ids), "max_model_len": self.info.context_length, "tokens": list(ids)}
        if req.return_token_strs:
            body["token_strs"] = self.tokenizer.convert_ids_to_tokens(list(ids))
        return JSONBody(body)

    async def detokenize(self, request: Request) -> JSONBody:
        req: DetokenizeRequest = self.parse(DetokenizeRequest, await self.read_json(request))
        self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.info.vocab_size]
        if bad:
            raise APIError(
                400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})", param="tokens"
            )
        return JSONBody({"prompt": self.tokenizer.decode(req.tokens)})

    def tokenizer_info(self) -> JSONBody:
        tok = self.tokenizer
        return JSONBody(
            {
                "tokenizer_class": type(tok).__name__,
                "eos_token": tok.eos_token,
                "bos_token": tok.bos_token,
                "pad_token": tok.pad_token,
                "unk_token": tok.unk_token,
                "chat_template": tok.chat_template,
                "model_max_length": self.info.context_length,
                "vocab_size": self.info.vocab_size,
            }
        )

    def models(self) -> JSONBody:
        card = ModelCard(id=self.info.model_id, created=self.info.created)
        return JSONBody(ModelList(data=[card]).model_dump(mode="json"))

    def model(self, model_id: str) -> JSONBody:
        self.check_model(model_id)
        return JSONBody(ModelCard(id=self.info.model_id, created=self.info.created).model_dump(mode="json"))
