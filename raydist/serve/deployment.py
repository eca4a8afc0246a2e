"""The Ray Serve replica: one model copy, dynamic batching, health probe, metrics, and the FastAPI app.

Each replica loads the artifact once, then answers HTTP through the app built by
:func:`raydist.serve.http.build_fastapi_app`. Concurrent requests meet in Ray Serve's ``@serve.batch``
queue and are decoded together by :class:`~raydist.serve.engine.BatchGenerator` (left-padded prefill, then
one token per step for the whole batch); each step's new text flows back to its request as it is made,
which is what streaming sends. A batch decodes in a worker thread (``stream_batch``) so the replica's
event loop keeps parsing, validating and streaming while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import Counter
from typing import Any, AsyncIterator, Optional

import ray
from ray import serve

from raydist.config.serve import ServeConfig
from raydist.core.resources import unit_device
from raydist.serve.batcher import ContinuousBatcher
from raydist.serve.engine import BatchGenerator, GenerationRequest, StepOutput
from raydist.serve.http import build_fastapi_app
from raydist.serve.loading import default_model_id, load_served_model
from raydist.serve.service import ModelInfo, OpenAIService

logger = logging.getLogger("ray.serve")

_LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class ReplicaMetrics:
    """Prometheus metrics through ``ray.serve.metrics`` (Ray adds deployment/replica/application tags) plus
    the same counts kept locally for ``GET /stats``."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "raydist_serve_requests",
            description="HTTP requests by route and status code.",
            tag_keys=("route", "status"),
        )
        self.latency = metrics.Histogram(
            "raydist_serve_request_latency_ms",
            description="Request latency to the last byte (ms).",
            boundaries=_LATENCY_BUCKETS_MS,
            tag_keys=("route",),
        )
        self.waiting = metrics.Gauge(
            "raydist_serve_waiting_requests", description="Requests on this replica waiting for a batch slot."
        )
        self.running = metrics.Gauge(
            "raydist_serve_running_requests", description="Requests in the batch being decoded."
        )
        self.batch_size = metrics.Histogram(
            "raydist_serve_batch_size",
            description="Requests decoded together, per decode step.",
            boundaries=_BATCH_BUCKETS,
        )
        self.groups = metrics.Histogram(
            "raydist_serve_batch_group_size",
            description="Requests per @serve.batch group (arrived together).",
            boundaries=_BATCH_BUCKETS,
        )
        self.generated = metrics.Counter("raydist_serve_generated_tokens", description="Completion tokens generated.")
        self.prompt = metrics.Counter("raydist_serve_prompt_tokens", description="Prompt tokens processed.")
        self.local: Counter = Counter()
        self.batch_sizes: Counter = Counter()

    # RequestObserver
    def request_done(self, route: str, status: int, latency_s: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(latency_s * 1000.0, tags={"route": route})
        self.local[f"status_{status}"] += 1

    def tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt.inc(prompt_tokens)
        if completion_tokens:
            self.generated.inc(completion_tokens)
        self.local["prompt_tokens"] += prompt_tokens
        self.local["completion_tokens"] += completion_tokens
        self.local["completions"] += 1

    def batch(self, size: int) -> None:
        self.groups.observe(size)
        self.batch_sizes[size] += 1


@serve.ingress()
class OpenAIServer:
    """A Serve replica hosting one artifact behind the OpenAI API.

    Args:
        config: a :class:`~raydist.config.serve.ServeConfig` as a dict (validated again here).
        api_key: the resolved API key (None = no auth); passed apart from the config so it never shows in
            Serve's deployment status.
    """

    def __init__(self, config: dict[str, Any], api_key: Optional[str] = None):
        import torch

        self.cfg = cfg = ServeConfig.model_validate(config)
        threads = cfg.resources.torch_threads or max(1, math.ceil(cfg.resources.num_cpus))
        torch.set_num_threads(threads)
        self.threads = threads
        device = unit_device(cfg.resources.device, "serve replica").type
        t0 = time.time()
        model, tokenizer, _ = load_served_model(cfg.artifact, cfg.adapter, device, cfg.resources.dtype)
        self.engine = BatchGenerator(model, tokenizer)
        self.device = device
        batch = cfg.batching
        # Without batching a replica still accepts many requests, but decodes them one at a time.
        self._generate_batch.set_max_batch_size(batch.max_batch_size if batch.enabled else 1)
        self._generate_batch.set_batch_wait_timeout_s(batch.batch_wait_timeout_s if batch.enabled else 0.0)
        self.metrics = ReplicaMetrics()
        self._waiting: set[int] = set()
        self._drains: set[asyncio.Task] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._steps = self._decoded_rows = self._largest_batch = 0
        # Groups formed by @serve.batch join the batch that is decoding (continuous batching), up to the
        # configured size; without batching, one request at a time.
        self.batcher = ContinuousBatcher(
            self.engine, batch.max_batch_size if batch.enabled else 1, on_step=self._on_step
        )
        self._running = 0
        self._healthy = False
        self._probe_lock = threading.Lock()
        self._probe()  # a model that cannot run fails the replica start, not the first request
        self._healthy = True
        info = ModelInfo(
            model_id=cfg.model_name or default_model_id(cfg.artifact),
            context_length=self.engine.max_positions,
            vocab_size=int(model.config.vocab_size),
            created=int(time.time()),
        )
        self.service = OpenAIService(
            tokenizer,
            self,
            info,
            cfg.limits,
            api_key=api_key,
            observer=self.metrics,
            ready=lambda: self._healthy,
            stats=self.stats,
        )
        logger.info(
            "raydist replica pid %d serves %s (%s, %s, %d threads) after %.1fs load",
            os.getpid(),
            info.model_id,
            cfg.artifact,
            device,
            threads,
            time.time() - t0,
        )

    def __serve_build_asgi_app__(self):
        return build_fastapi_app(self.service)

    # -- GenerationBackend -------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Queue one request for the next batch and yield its steps up to the one with a finish reason."""
        key = id(request)
        self._waiting.add(key)
        self.metrics.waiting.set(len(self._waiting))
        steps = self._generate_batch(request)
        try:
            async for out in steps:
                yield out
                if out.finish_reason:
                    break
        finally:
            self._waiting.discard(key)
            self.metrics.waiting.set(len(self._waiting))
            # Serve ends a finished request's stream one batch step later; reading that end in the background
            # answers the client now and still consumes the end marker (else asyncio logs it as unretrieved).
            task = asyncio.get_running_loop().create_task(self._drain(steps))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    @staticmethod
    async def _drain(steps: AsyncIterator[StepOutput]) -> None:
        async for _ in steps:
            pass

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=1024)
    async def _generate_batch(self, requests: list[GenerationRequest]):
        """Decode a group of requests that arrived together; yields, per step, one entry per request: its
        StepOutput, or StopIteration once it has finished (Serve's batching then ends that caller's stream).

        Many groups are in flight at once (``max_concurrent_batches``): each joins the running decode batch
        of :class:`ContinuousBatcher` instead of waiting for it to end."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        for r in requests:
            self._waiting.discard(id(r))
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.batch(len(requests))
        self._running += len(requests)
        self.metrics.running.set(self._running)
        try:
            async for outs in self.batcher.submit(requests):
                yield [o if o is not None else StopIteration for o in outs]
        finally:
            self._running -= len(requests)
            self.metrics.running.set(self._running)

    def _on_step(self, rows: int) -> None:
        """Decode thread, after every step: count it (metrics are recorded on the event loop)."""
        self._steps += 1
        self._decoded_rows += rows
        self._largest_batch = max(self._largest_batch, rows)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.metrics.batch_size.observe, rows)

    # -- health ------------------------------------------------------------------------------------
    def _probe(self) -> None:
        """One real forward pass on two tokens; raises if the model fails or returns non-finite logits."""
        import torch

        with self._probe_lock, torch.inference_mode():
            ids = torch.tensor([[self.engine.pad_id, self.engine.pad_id]], device=self.engine.device)
            logits = self.engine.model(input_ids=ids).logits
            if not bool(torch.isfinite(logits).all()):
                raise RuntimeError("health probe: the model returned non-finite logits")

    async def check_health(self) -> None:
        """Serve's periodic health check: runs the model (in a thread, beside any batch in flight)."""
        try:
            await asyncio.to_thread(self._probe)
        except Exception:
            self._healthy = False
            raise
        self._healthy = True

    def stats(self) -> dict[str, Any]:
        """Replica counters for ``GET /stats``."""
        ctx = serve.get_replica_context()
        m = self.metrics
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "replica": ctx.replica_id.unique_id,
            "device": self.device,
            "fast_path": self.engine.fast is not None,
            "torch_threads": self.threads,
            "max_batch_size": self.batcher.max_batch_size,
            "groups": sum(m.batch_sizes.values()),
            "group_sizes": {str(k): v for k, v in sorted(m.batch_sizes.items())},
            "decode_steps": self._steps,
            "decoded_rows": self._decoded_rows,
            "largest_batch": self._largest_batch,
            "decode_busy_s": round(self.batcher.busy_s, 4),
            "waiting": len(self._waiting),
            "running": self._running,
            "completions": m.local["completions"],
            "prompt_tokens": m.local["prompt_tokens"],
            "completion_tokens": m.local["completion_tokens"],
            "responses_by_status": {
                k.removeprefix("status_"): v for k, v in m.local.items() if k.startswith("status_")
            },
            "healthy": self._healthy,
        }
