"""The FastAPI app around :class:`~raydist.serve.service.OpenAIService`: routes, admission (a full queue
answers OpenAI's error JSON), per-route metrics, error handlers; and DirectBackend (the engine without Ray Serve,
for tests and in-process use)."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raydist.serve.batcher import ContinuousBatcher
from raydist.serve.engine import GenerationRequest, StepOutput
from raydist.serve.schemas import (
    APIError,
    error_body,
)
from raydist.serve.service import JSONBody, OpenAIService

logger = logging.getLogger("raydist.serve")


class _Admission:
    """ASGI middleware: at most ``limits.admitted()`` generation requests (/completions, /chat/completions) in
    this app at once, streams until their last byte; beyond that a ``limits.queue_full_status`` with OpenAI's
    error body and ``Retry-After``, before the body is read."""

    def __init__(self, app, service: OpenAIService):
        import math

        self.app = app
        self.cap = service.limits.admitted()
        self.status = service.limits.queue_full_status
        self.retry_after = str(max(0, math.ceil(service.limits.retry_after_s)))
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if self.cap is None or scope["type"] != "http" or not scope["path"].endswith("/completions"):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.cap:
            kind = "rate_limit_exceeded" if self.status == 429 else "server_overloaded"
            body = error_body(
                f"The server is at capacity ({self.cap} requests in progress on this replica); "
                f"retry after {self.retry_after} s.",
                type="server_error" if self.status == 503 else "requests",
                code=kind,
            )
            return await JSONBody(body, status_code=self.status, headers={"Retry-After": self.retry_after})(
                scope, receive, send
            )
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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
                resp = JSONBody(
                    error_body("The server had an error while processing your request.", type="server_error"),
                    status_code=500,
                )
                await resp(scope, receive, send)
            state["status"] = 500
        finally:
            record()


def build_fastapi_app(service: OpenAIService) -> FastAPI:
    """The ASGI app: /v1/completions, /v1/chat/completions, /v1/models[/{id}], /tokenize, /detokenize,
    /tokenizer_info, /health, /ready, /stats."""
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

    # vLLM's tokenizer routes, beside /v1 as vLLM has them (lm-eval's remote tokenizer calls these)
    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(request: Request):
        return await service.tokenize(request)

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(request: Request):
        return await service.detokenize(request)

    @app.get("/tokenizer_info", dependencies=[Depends(auth)])
    async def tokenizer_info():
        return service.tokenizer_info()

    @app.get("/health")
    async def health():
        """Liveness: the replica's event loop answers."""
        return JSONBody({"status": "ok"})

    @app.get("/ready")
    async def ready():
        """Readiness: the model is loaded and its last health probe passed."""
        ok = service.ready()
        return JSONBody(
            {"status": "ready" if ok else "not ready", "model": service.info.model_id}, status_code=200 if ok else 503
        )

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

    app.add_middleware(_Admission, service=service)
    app.add_middleware(_ObserveRequests, service=service)  # added last: outermost, so it also sees refusals
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
