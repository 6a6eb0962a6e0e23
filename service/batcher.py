"""Dynamic batching: many requests' images, one forward pass.

The loop follows LitServe's and Ray Serve's shape with BentoML's adaptive wait:

* an idle worker takes whatever is queued at once (a lone request never sits out a timer);
* while a batch runs, arrivals pile up and form the next, larger batch;
* it waits for more only when arrivals are dense (recent gaps shorter than ``max_wait``), and then
  only until the batch is full, ``max_wait`` has passed, or the stream pauses;
* the model runs in one dedicated thread, off the event loop, which keeps parsing requests;
* each image carries its own future: callers get their own rows back, in order, however their
  images were split across batches; a caller that gave up (timeout, disconnect) has its rows
  dropped before the batch is formed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("camserve.batcher")

Payload = TypeVar("Payload")
Result = TypeVar("Result")


class QueueFull(Exception):
    """More images queued than ``queue_size``: the caller should retry later (HTTP 503)."""


class ShuttingDown(Exception):
    """The service is draining and accepts no new work (HTTP 503)."""


class BatchFailed(Exception):
    """The batch this request's image was in raised; other batches are unaffected."""


@dataclass
class _Item(Generic[Payload]):
    payload: Payload
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What the worker reports for each batch (fed to Prometheus by the app); size 0: all dropped."""

    size: int
    queue_wait_s: list[float]
    run_s: float
    dropped: int


class DynamicBatcher(Generic[Payload, Result]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Payload]], Sequence[Result]],
        *,
        executor: Executor,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item[Payload]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._accepting = False
        self._running = 0  # images in the batch now on the model thread
        self._gap_ewma_s = float("inf")  # smoothed time between arrivals
        self._last_arrival = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, finish everything already accepted, then stop the worker."""
        self._accepting = False
        deadline = time.perf_counter() + drain_timeout_s
        while (self._queue.qsize() or self._running) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():  # only after a drain timeout
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ShuttingDown("service stopped before this image ran"))

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # -- submitting ------------------------------------------------------------------------------
    async def submit(self, payloads: Sequence[Payload], timeout_s: float) -> list[Result]:
        """Queue all images of one request (all or none) and wait for their rows, in order."""
        if not self._accepting:
            raise ShuttingDown("service is shutting down")
        if self._queue.qsize() + len(payloads) > self.queue_size:
            raise QueueFull(f"{self.name} queue is full ({self._queue.qsize()} of {self.queue_size} images)")
        loop = asyncio.get_running_loop()
        items = [_Item(payload, loop.create_future()) for payload in payloads]
        now = time.perf_counter()
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap_ewma_s = gap if self._gap_ewma_s == float("inf") else 0.8 * self._gap_ewma_s + 0.2 * gap
        self._last_arrival = now
        for item in items:
            self._queue.put_nowait(item)
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # timeout or client gone: the worker drops these rows
                if not item.future.done():
                    item.future.cancel()

    # -- the worker ------------------------------------------------------------------------------
    def _take_ready(self, batch: list[_Item[Payload]]) -> None:
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _collect(self) -> list[_Item[Payload]]:
        batch = [await self._queue.get()]
        self._take_ready(batch)
        if len(batch) < self.max_batch_size and self._gap_ewma_s < self.max_wait_s:
            # Dense arrivals: wait a little for more, but stop at the first pause in the stream.
            deadline = time.perf_counter() + self.max_wait_s
            pause = min(self.max_wait_s, 2.0 * self._gap_ewma_s)
            while len(batch) < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(left, pause)):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
                self._take_ready(batch)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [item for item in batch if not item.future.done()]
            if not live:  # every caller gave up: nothing to run, but the drop is reported
                if self._on_batch is not None:
                    self._on_batch(BatchStats(size=0, queue_wait_s=[], run_s=0.0, dropped=len(batch)))
                continue
            started = time.perf_counter()
            self._running = len(live)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [i.payload for i in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch returned {len(results)} rows for {len(live)} images")
            except asyncio.CancelledError:
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(ShuttingDown("service stopped during this batch"))
                raise
            except Exception as exc:
                log.exception("%s batch of %d failed", self.name, len(live))
                error = BatchFailed(f"{type(exc).__name__}: {exc}")
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            finally:
                self._running = 0
                if self._on_batch is not None:
                    self._on_batch(
                        BatchStats(
                            size=len(live),
                            queue_wait_s=[started - i.enqueued for i in live],
                            run_s=time.perf_counter() - started,
                            dropped=len(batch) - len(live),
                        )
                    )
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
