"""Continuous batching: request groups join the running decode batch between steps, on one decode thread."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional, Sequence

from raydist.serve.engine import BatchGenerator, BatchState, GenerationRequest, StepOutput


class _Group:
    """Requests submitted together, and where their outputs go (an asyncio queue on the caller's loop)."""

    def __init__(self, requests: Sequence[GenerationRequest], loop: asyncio.AbstractEventLoop):
        self.requests = list(requests)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.position = {id(r): i for i, r in enumerate(self.requests)}
        self.open = len(self.requests)

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is left to read this
            for r in self.requests:
                r.cancelled = True


_END = object()


class ContinuousBatcher:
    """Continuous batching on one decode thread: request groups join the running batch between steps.

    A group is prefilled (left-padded) as soon as the running batch has room for it, then merged into the
    batch (:meth:`BatchGenerator.merge`); finished rows leave after every step. So a request never waits
    for an unrelated batch to finish, and the forward pass of every step serves everyone in flight. The
    thread hands each step's outputs to the submitting event loop without waiting for it: a busy loop
    delays delivery, never the next step.

    Args:
        engine: the batch generator (one model; only this thread calls it).
        max_batch_size: most requests decoded together; later groups wait (in order) for room.
        on_step: called in the decode thread after every step with the number of rows decoded.

    Attributes:
        busy_s: seconds the decode thread spent in prefill and decode steps (for ``/stats``).
    """

    def __init__(self, engine: BatchGenerator, max_batch_size: int, on_step=None):
        import threading

        self.engine = engine
        self.max_batch_size = max_batch_size
        self.on_step = on_step
        self._pending: list[_Group] = []
        self.busy_s = 0.0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="raydist-decode", daemon=True)
        self._thread.start()

    async def submit(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[list[Optional[StepOutput]]]:
        """Decode ``requests``; yields, per step, one entry per request (its StepOutput, or None once finished).

        Raises:
            ValueError: a request the engine refuses (empty prompt, beyond the context).
        """
        group = _Group(requests, asyncio.get_running_loop())
        with self._cv:
            self._pending.append(group)
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await group.queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:  # the consumer left: its rows stop at the next step
                for r in group.requests:
                    r.cancelled = True

    def _admit(self, live: int) -> list[_Group]:
        with self._cv:
            while not self._pending and live == 0:
                self._cv.wait()
            admitted = []
            while self._pending and (live == 0 or live + len(self._pending[0].requests) <= self.max_batch_size):
                g = self._pending.pop(0)
                admitted.append(g)
                live += len(g.requests)
            return admitted

    def _dispatch(self, state: BatchState, outs: list[Optional[StepOutput]], owner: dict[int, _Group]) -> None:
        per_group: dict[int, list] = {}
        for req, out in zip(state.requests, outs):
            if out is None:
                continue
            g = owner[id(req)]
            per_group.setdefault(id(g), [g, [None] * len(g.requests)])[1][g.position[id(req)]] = out
            if out.finish_reason:
                g.open -= 1
        for g, group_outs in per_group.values():
            g.post(group_outs)
            if g.open == 0:
                g.post(_END)
                for r in g.requests:
                    owner.pop(id(r), None)

    def _run(self) -> None:
        state: Optional[BatchState] = None
        owner: dict[int, _Group] = {}  # id(request) -> its group
        while True:
            admitted = self._admit(0 if state is None else len(state.rows))
            if admitted:
                requests = [r for g in admitted for r in g.requests]
                t0 = time.perf_counter()
                try:
                    new, outs = self.engine.prefill(requests)
                except BaseException as e:  # noqa: BLE001 - handed to the callers
                    for g in admitted:
                        g.post(e)
                    continue
                self.busy_s += time.perf_counter() - t0
                for g in admitted:
                    for r in g.requests:
                        owner[id(r)] = g
                self._dispatch(new, outs, owner)
                if state is None or state.done:
                    state = new
                else:
                    try:
                        self.engine.merge(state, new)
                    except NotImplementedError:  # cannot join: finish the running batch first, then this one
                        while not state.done:
                            self._dispatch(state, self.engine.step(state), owner)
                        state = new
            if state is None or state.done:
                state = None
                continue
            try:
                rows = len(state.rows)
                t0 = time.perf_counter()
                outs = self.engine.step(state)
                self.busy_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001
                for g in {id(g): g for g in owner.values()}.values():
                    g.post(e)
                owner.clear()
                state = None
                continue
            if self.on_step is not None:
                self.on_step(rows)
            self._dispatch(state, outs, owner)
