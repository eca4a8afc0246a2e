"""The OpenAI-compatible HTTP API as a plain FastAPI app (no Ray here, so it is testable on its own).

The Serve deployment (``raydist.serve.deployment``) builds this app inside each replica and plugs in its
batched generator as the :class:`GenerationBackend`; unit tests plug in :class:`DirectBackend`.

Every client mistake ends as a 4xx with OpenAI's error envelope ``{"error": {message, type, param, code}}``:
checks run in the order auth → body size → JSON → schema → model id → prompt/limits, all before the
request reaches the model, so a bad request never joins (or breaks) a batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raydist.config.serve import LimitSettings
from raydist.serve.engine import ContinuousBatcher, GenerationRequest, SamplingParams, StepOutput
from raydist.serve.schemas import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
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

    def __init__(self, tokenizer, backend: GenerationBackend, info: ModelInfo, limits: LimitSettings, *,
                 api_key: Optional[str] = None, observer: Optional[RequestObserver] = None,
                 ready: Callable[[], bool] = lambda: True, stats: Callable[[], dict] = dict):
        self.tokenizer = tokenizer
        self.backend = backend
        self.info = info
        self.limits = limits
        self.api_key = api_key
        self.observer = observer or _NoObserver()
        self.ready = ready
        self.stats = stats

    # -- checks ------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        """Raises APIError(401) unless the request carries the configured bearer key."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                 self.api_key.encode("utf-8")):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

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
                raise APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                               code="request_too_large")
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
            raise APIError(404, f"The model `{model[:256]}` does not exist; this server serves `{self.info.model_id}`.",
                           param="model", code="model_not_found")

    async def encode_prompt(self, prompt: Union[str, list[int]]) -> list[int]:
        """Token ids of a completion prompt (a string, or ids checked against the vocabulary)."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.info.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})",
                               param="prompt")
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
        from raydist.components.generation import render_prompt

        self._check_chars(sum(len(m["content"]) for m in conversation), "messages")
        try:
            return await asyncio.to_thread(render_prompt, self.tokenizer, conversation)
        except Exception as e:  # the model's chat template may refuse a conversation (roles, order)
            raise APIError(400, f"messages could not be rendered with the model's chat template: {str(e)[:200]}",
                           param="messages") from None

    def _check_chars(self, n_chars: int, param: str) -> None:
        # BPE tokens rarely span more than a few dozen characters, so text beyond 64 characters per allowed
        # token cannot fit; refusing it before tokenizing keeps a hostile megabyte prompt cheap.
        if n_chars > 64 * self.limits.max_prompt_tokens:
            raise APIError(400, f"{param}: {n_chars} characters is far beyond the limit of "
                           f"{self.limits.max_prompt_tokens} prompt tokens", param=param, code="context_length_exceeded")

    def sampling(self, req, prompt_ids: list[int], requested: Optional[int], default: int) -> GenerationRequest:
        """Check the prompt and token limits and build the generation request."""
        n_prompt = len(prompt_ids)
        if n_prompt > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this server accepts at most "
                           f"{self.limits.max_prompt_tokens}", param="messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded")
        ctx = self.info.context_length
        if requested is not None and requested > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most {self.limits.max_tokens}",
                           param="max_tokens")
        max_tokens = requested if requested is not None else default
        if ctx is not None:
            room = ctx - n_prompt
            if room < 1 or (requested is not None and requested > room):
                raise APIError(400, f"this model's maximum context length is {ctx} tokens; the prompt has {n_prompt} "
                               f"and max_tokens asks for {max_tokens}", param="max_tokens",
                               code="context_length_exceeded")
            max_tokens = min(max_tokens, room)  # a default that would overflow is shortened, not refused
        stops = req.stop_list()
        if len(stops) > self.limits.max_stop_sequences:
            raise APIError(400, f"stop: at most {self.limits.max_stop_sequences} sequences, got {len(stops)}",
                           param="stop")
        if any(len(s) > 256 for s in stops):
            raise APIError(400, "stop: each sequence must be at most 256 characters", param="stop")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(s for s in stops if s),
            seed=req.seed,
        )
        return GenerationRequest(prompt_ids=prompt_ids, params=params)

    # -- generation --------------------------------------------------------------------------------
    async def run(self, gen: GenerationRequest) -> tuple[str, StepOutput]:
        """Generate to the end; returns the text and the final step (finish reason, token count)."""
        parts, last = [], None
        try:
            async with aclosing(self.backend.submit(gen)) as steps:  # closed now, not whenever GC runs
                async for out in steps:
                    parts.append(out.text)
                    last = out
                    if out.finish_reason:
                        break
        finally:
            gen.cancelled = True  # a client that went away frees its batch row at the next step
        if last is None or last.finish_reason is None:
            raise RuntimeError("the generation ended without a finish reason")
        self.observer.tokens(len(gen.prompt_ids), last.completion_tokens)
        return "".join(parts), last

    async def stream(self, gen: GenerationRequest, chunk: Callable[[StepOutput], Optional[dict]],
                     first: Optional[dict], usage_chunk: Optional[Callable[[Usage], dict]]) -> AsyncIterator[str]:
        """Server-sent events: ``first`` (if any), one chunk per step with new text or a finish reason, the usage
        chunk (``stream_options.include_usage``), then ``[DONE]``. A failure mid-stream is sent as an error
        event (the status line is already out)."""
        last = None
        try:
            if first is not None:
                yield _sse(first)
            async with aclosing(self.backend.submit(gen)) as steps:
                async for out in steps:
                    last = out
                    data = chunk(out)
                    if data is not None:
                        yield _sse(data)
                    if out.finish_reason:
                        break
            if last is not None:
                self.observer.tokens(len(gen.prompt_ids), last.completion_tokens)
                if usage_chunk is not None:
                    yield _sse(usage_chunk(Usage.of(len(gen.prompt_ids), last.completion_tokens)))
        except Exception as e:  # noqa: BLE001 - the client must hear about it; the status line is already sent
            logger.exception("generation failed mid-stream")
            yield _sse(error_body(f"generation failed: {type(e).__name__}", type="server_error"))
        finally:
            gen.cancelled = True
        yield _SSE_DONE

    # -- routes ------------------------------------------------------------------------------------
    async def completions(self, request: Request):
        data = await self.read_json(request)
        req: CompletionRequest = self.parse(CompletionRequest, data)
        self.check_model(req.model)
        ids = await self.encode_prompt(req.single_prompt())
        gen = self.sampling(req, ids, req.max_tokens, self.limits.completion_default())
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            base = {"id": rid, "object": "text_completion", "created": created, "model": self.info.model_id}

            def chunk(out: StepOutput) -> Optional[dict]:
                if not out.text and not out.finish_reason:
                    return None
                c = {**base, "choices": [{"text": out.text, "index": 0, "logprobs": None,
                                          "finish_reason": out.finish_reason}]}
                return {**c, "usage": None} if include_usage else c

            usage = (lambda u: {**base, "choices": [], "usage": u.model_dump()}) if include_usage else None
            return StreamingResponse(self.stream(gen, chunk, None, usage), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        text, last = await self.run(gen)
        body = CompletionResponse(
            id=rid, created=created, model=self.info.model_id,
            choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
            usage=Usage.of(len(ids), last.completion_tokens),
        )
        return JSONBody(body.model_dump(mode="json"))

    async def chat_completions(self, request: Request):
        data = await self.read_json(request)
        req: ChatCompletionRequest = self.parse(ChatCompletionRequest, data)
        self.check_model(req.model)
        ids = await self.render_chat(req.conversation())
        gen = self.sampling(req, ids, req.requested_max_tokens(), self.limits.chat_default())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.info.model_id}
            extra = {"usage": None} if include_usage else {}

            def chunk(out: StepOutput) -> Optional[dict]:
                if not out.text and not out.finish_reason:
                    return None
                delta = {"content": out.text} if out.text else {}
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": out.finish_reason}], **extra}

            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                          "finish_reason": None}], **extra}
            usage = (lambda u: {**base, "choices": [], "usage": u.model_dump()}) if include_usage else None
            return StreamingResponse(self.stream(gen, chunk, first, usage), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        text, last = await self.run(gen)
        body = ChatCompletionResponse(
            id=rid, created=created, model=self.info.model_id,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)],
            usage=Usage.of(len(ids), last.completion_tokens),
        )
        return JSONBody(body.model_dump(mode="json"))

    def models(self) -> JSONBody:
        card = ModelCard(id=self.info.model_id, created=self.info.created)
        return JSONBody(ModelList(data=[card]).model_dump(mode="json"))

    def model(self, model_id: str) -> JSONBody:
        self.check_model(model_id)
        return JSONBody(ModelCard(id=self.info.model_id, created=self.info.created).model_dump(mode="json"))


class _ObserveRequests:
    """ASGI middleware: per-route status and latency (to the last body byte, so streams count in full), and
    an OpenAI-style 500 for an unexpected exception — which is never re-raised, so a bug in one request
    cannot take the replica down."""

    def __init__(self, app, service: OpenAIService):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": 500, "started": False, "recorded": False}

        def record():
            if not state["recorded"]:
                state["recorded"] = True
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.service.observer.request_done(route, state["status"], time.perf_counter() - t0)

        async def observed_send(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, observed_send)
        except Exception:  # noqa: BLE001
            logger.exception("request failed")
            if not state["started"]:
                resp = JSONBody(error_body("The server had an error while processing your request.", type="server_error"),
                                status_code=500)
                await resp(scope, receive, send)
            state["status"] = 500
        finally:
            record()


def build_fastapi_app(service: OpenAIService) -> FastAPI:
    """The ASGI app: /v1/completions, /v1/chat/completions, /v1/models[/{id}], /health, /ready, /stats."""
    app = FastAPI(title="raydist OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)

    async def auth(request: Request) -> None:
        service.check_auth(request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.post("/completions")
    async def completions(request: Request):
        return await service.completions(request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat_completions(request)

    @v1.get("/models")
    async def models():
        return service.models()

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        return service.model(model_id)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        """Liveness: the replica's event loop answers."""
        return JSONBody({"status": "ok"})

    @app.get("/ready")
    async def ready():
        """Readiness: the model is loaded and its last health probe passed."""
        ok = service.ready()
        return JSONBody({"status": "ready" if ok else "not ready", "model": service.info.model_id},
                        status_code=200 if ok else 503)

    @app.get("/stats", dependencies=[Depends(auth)])
    async def stats():
        """This replica's counters (batch sizes, requests, tokens, pid)."""
        return JSONBody(service.stats())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONBody(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONBody(error_body(msg, code=kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError):
        return JSONBody(error_body(f"invalid request: {str(exc)[:300]}"), status_code=400)

    app.add_middleware(_ObserveRequests, service=service)
    return app


class DirectBackend:
    """A backend without Ray: requests go straight to a :class:`ContinuousBatcher` (no grouping queue).

    Used by unit tests and for running the API under plain uvicorn; Serve replicas add Ray Serve's
    ``@serve.batch`` in front of the same batcher.
    """

    def __init__(self, engine, max_batch_size: int = 1):
        self.batcher = ContinuousBatcher(engine, max_batch_size)

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        async for outs in self.batcher.submit([request]):
            if outs[0] is not None:
                yield outs[0]
