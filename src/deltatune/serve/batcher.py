"""Dynamic batching: requests wait on an asyncio queue and leave it as batches.

A batch closes when it holds ``max_batch`` rows, or when its first request has waited
``max_wait_ms``; while one batch runs on the model (in the one worker thread), the next fills
up, so under load batches fill without waiting. Requests for different adapters share batches.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..tasks.base import Encoded
from .errors import ShuttingDown
from .registry import Registry, Served
from .worker import Job, Stats, failure, run_batch

STOP: Any = object()  # put on the queue by close(): everything queued before it is answered first


class Batcher:
    """Collects requests into batches and runs them, one at a time, on a worker thread."""

    def __init__(self, registry: Registry, max_batch: int = 32, max_wait_ms: float = 10.0):
        self.registry = registry
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.stats = Stats()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-model")
        self._queue: asyncio.Queue[Job] | None = None
        self._held: Job | None = None  # taken from the queue, but too big for the batch it came to
        self._collector: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        """Start collecting (in the running event loop)."""
        self._queue = asyncio.Queue()
        self._collector = asyncio.create_task(self._collect())

    async def close(self) -> None:
        """Answer every request still queued, then stop the worker."""
        self._closing = True
        if self._collector is not None and not self._collector.done():
            self._queue.put_nowait(STOP)
            await self._collector
        self._worker.shutdown(wait=True)

    async def submit(self, served: Served, encoded: Encoded) -> list[dict[str, Any]]:
        """The request's readable rows, once its batch has run.

        Raises:
            ServeError: the error this request alone gets (its adapter was unloaded, the model failed).
        """
        if self._closing or self._collector is None:
            raise ShuttingDown("the server is shutting down.", "send the request again once it is back.")
        loop = asyncio.get_running_loop()
        job = Job(served, encoded, loop.create_future(), loop.time())
        self._queue.put_nowait(job)
        return await job.future

    async def _collect(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._run(batch)

    async def _next_batch(self) -> list[Job] | None:
        """The next batch, or None at STOP; ends at max_batch rows or when its first request
        has waited max_wait."""
        first, self._held = self._held or await self._queue.get(), None
        if first is STOP:
            return None
        batch, rows = [first], first.rows
        while rows < self.max_batch:
            job = await self._next_job(first.queued_at + self.max_wait)
            if job is None:
                break
            if job is STOP or rows + job.rows > self.max_batch:
                self._held = job  # it opens the next batch
                break
            batch.append(job)
            rows += job.rows
        return batch

    async def _next_job(self, deadline: float) -> Job | None:
        """A job already queued, or one that arrives before ``deadline``; None if none does."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self, batch: list[Job]) -> None:
        self._count(batch)
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._worker, run_batch, batch, self.registry, self.stats)
        except Exception as error:  # noqa: BLE001 (a bug in the worker must not leave requests waiting)
            outcomes = [failure(error)] * len(batch)
        for job, outcome in zip(batch, outcomes):
            if job.future.done():  # the client went away
                continue
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _count(self, batch: list[Job]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.requests += len(batch)
        stats.rows += sum(job.rows for job in batch)
        stats.multi_adapter_batches += len({job.served.name for job in batch}) > 1
