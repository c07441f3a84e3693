"""Micro-batching: concurrent searches share one forward pass of the model.

Each request hands over its photos (or the awaitable that decodes them) and awaits their
descriptors. A single consumer task takes the first waiting request and, while other requests
are still decoding, waits up to `max_wait_s` for them to join (not at all when nobody else is
coming, so a lone request pays no wait); then it runs one `describe` call for the batch on the
compute thread (a one-thread executor), so the event loop keeps serving. While a pass runs, new
requests queue up and form the next batch, so batches grow with load and throughput rises with it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Job:
    photos: list[torch.Tensor]
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """`await batcher.describe(photos)` → (len(photos), dim) descriptors.

    `describe(photos)` is the blocking work, run on `executor` (default: a one-thread executor
    of the batcher's own); `max_batch` photos or more end the gathering of a batch;
    `enabled=False` gives each request its own forward pass (same thread), for comparison;
    `observe(photos, seconds)` is called after every pass with its size and duration (on the
    compute thread, queueing excluded).
    """

    def __init__(
        self,
        describe: Callable[[list[torch.Tensor]], np.ndarray],
        max_wait_s: float = 0.005,
        max_batch: int = 32,
        enabled: bool = True,
        observe: Callable[[int, float], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ):
        self._describe = describe
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self.enabled = enabled
        self._observe = observe
        self._queue: asyncio.Queue[_Job] | None = None
        self._changed: asyncio.Event | None = None
        self._coming = 0  # requests still preparing their photos
        self._consumer: asyncio.Task | None = None
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="netvlad-inference")

    async def start(self) -> None:
        """Start the consumer task on the running event loop."""
        self._queue = asyncio.Queue()
        self._changed = asyncio.Event()
        self._consumer = asyncio.create_task(self._run(), name="netvlad-batcher")

    async def close(self) -> None:
        """Stop the consumer; requests still queued get a `RuntimeError`."""
        if self._consumer is not None:
            self._consumer.cancel()
            try:
                await self._consumer
            except asyncio.CancelledError:
                pass
            self._consumer = None
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def describe(self, photos: list[torch.Tensor] | Awaitable[list[torch.Tensor]]) -> np.ndarray:
        """Descriptors (len(photos), dim) of preprocessed (3, H, W) photos. `photos` may be an
        awaitable producing them (e.g. decoding in a worker thread): while it runs, a batch being
        gathered waits for this request (bounded by `max_wait_s`)."""
        if inspect.isawaitable(photos):
            self._coming += 1
            try:
                photos = await photos
            finally:
                self._coming -= 1
                self._notify()
        if not photos:
            raise ValueError("no photos to describe")
        if not self.enabled:
            return await self._forward(list(photos))
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(list(photos), future))
        self._notify()
        return await future

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _timed_describe(self, photos: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        return self._describe(photos), time.perf_counter() - start

    async def _forward(self, photos: list[torch.Tensor]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        result, seconds = await loop.run_in_executor(self._executor, self._timed_describe, photos)
        if self._observe is not None:
            self._observe(len(photos), seconds)
        return result

    async def _gather(self) -> list[_Job]:
        """The next batch: the first waiting job, plus those queued now or arriving within
        `max_wait_s` while other requests are still preparing, until `max_batch` photos."""
        assert self._queue is not None and self._changed is not None
        jobs = [await self._queue.get()]
        count = len(jobs[0].photos)
        deadline = time.perf_counter() + self.max_wait_s
        while count < self.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                count += len(jobs[-1].photos)
                continue
            remaining = deadline - time.perf_counter()
            if self._coming == 0 or remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = [job for job in await self._gather() if not job.future.done()]  # skip cancelled requests
            if not jobs:
                continue
            try:
                descriptors = await self._forward([photo for job in jobs for photo in job.photos])
            except BaseException as exc:  # the error belongs to the requests, not to the consumer
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("shutting down"))
                if not isinstance(exc, Exception):
                    raise
                continue
            start = 0
            for job in jobs:
                stop = start + len(job.photos)
                if not job.future.done():
                    job.future.set_result(descriptors[start:stop])
                start = stop
