"""Dynamic batching: many requests' images, one forward pass.

The loop follows LitServe's and Ray Serve's shape with BentoML's adaptive wait:

* an idle worker takes whatever is queued at once (a lone request never sits out a timer);
* while a batch runs, arrivals pile up and form the next, larger batch;
* it waits for more only when arrivals are dense (recent gaps shorter than ``max_wait``), and then
  only until the batch is full, ``max_wait`` has passed, or the stream pauses;
* the model runs on dedicated threads ("lanes", the executor's workers), off the event loop, which
  keeps parsing requests; with ``lanes`` > 1 that many batches run at once (see
  :func:`service.app.parallelism` for why a 2-core CPU wants two single-threaded lanes);
* a lane takes only its even share of what is queued while other lanes wait for work, so that
  a burst runs on all cores at once rather than as one large batch on one;
* back to back: when a batch ends and more images are queued, its model thread takes them and runs
  them at once, without a round trip through the event loop (which, busy with HTTP, answered the
  hand-off several milliseconds late, during which the model sat idle); it hands the thread back
  after each batch if other work (the other endpoint's batcher) is waiting for it;
* each image carries its own future: callers get their own rows back, in order, however their
  images were split across batches; a caller that gave up (timeout, disconnect) has its rows
  dropped before the batch is formed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service import tracing

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
    trace: Any = None  # the request's span and queueing time, while tracing is on (service/tracing.py)


@dataclass
class BatchStats:
    """What the worker reports for each batch (fed to Prometheus by the app); size 0: all dropped."""

    size: int
    queue_wait_s: list[float]
    run_s: float
    dropped: int


class ModelThreads(ThreadPoolExecutor):
    """The model threads: a thread pool that knows how many submitted calls have not started yet.

    A batcher running batches back to back asks it whether anyone else (the other endpoint's
    batcher, a warm-up) is waiting for a thread, and hands its thread over if so.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "camserve-model") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def started() -> Any:
            with self._lock:
                self._waiting -= 1
            return fn(*args, **kwargs)

        with self._lock:
            self._waiting += 1
        try:
            return super().submit(started)
        except BaseException:  # shut down: the call will never start
            with self._lock:
                self._waiting -= 1
            raise


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
        lanes: int = 1,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._on_batch = on_batch
        self.lanes = lanes
        # Appended to on the event loop; taken from by the worker tasks, and by the model threads while
        # they run batches back to back. deque's append and popleft are thread-safe.
        self._queue: deque[_Item[Payload]] = deque()
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task] = []  # one per lane
        self._accepting = False
        self._stopping = False  # read by the model threads: take no further batches
        self._running = 0  # lanes now running this batcher's batches
        self._current: dict[int, list[_Item[Payload]]] = {}  # model thread id -> the batch it runs now
        self._gap_ewma_s = float("inf")  # smoothed time between arrivals
        self._last_arrival = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._loop(), name=f"batcher-{self.name}-{i}") for i in range(self.lanes)]

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, finish everything already accepted, then stop the workers."""
        self._accepting = False
        deadline = time.perf_counter() + drain_timeout_s
        while (self._queue or self._running) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        self._stopping = True
        for worker in self._workers:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._queue:  # only after a drain timeout
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ShuttingDown("service stopped before this image ran"))

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def free(self) -> int:
        """Images the queue can take now: a request finding none is refused before its body is read."""
        return self.queue_size - len(self._queue)

    # -- submitting ------------------------------------------------------------------------------
    async def submit(self, payloads: Sequence[Payload], timeout_s: float) -> list[Result]:
        """Queue all images of one request (all or none) and wait for their rows, in order."""
        if not self._accepting:
            raise ShuttingDown("service is shutting down")
        if len(self._queue) + len(payloads) > self.queue_size:
            raise QueueFull(f"{self.name} queue is full ({len(self._queue)} of {self.queue_size} images)")
        loop = asyncio.get_running_loop()
        trace = tracing.waiting()
        items = [_Item(payload, loop.create_future(), trace=trace) for payload in payloads]
        now = time.perf_counter()
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap_ewma_s = gap if self._gap_ewma_s == float("inf") else 0.8 * self._gap_ewma_s + 0.2 * gap
        self._last_arrival = now
        self._queue.extend(items)
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):
                if len(items) == 1:  # a single image, the common request: no gathering future to build
                    return [await items[0].future]
                return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # timeout or client gone: the worker drops these rows
                if not item.future.done():
                    item.future.cancel()

    # -- the worker ------------------------------------------------------------------------------
    def _take_ready(self, batch: list[_Item[Payload]], idle_lanes: int = 0) -> None:
        """Move queued images into ``batch``: up to ``max_batch_size``, or while ``idle_lanes`` other
        lanes of this batcher wait for work, only this lane's even share of what is queued.

        Taking everything would leave the idle lanes nothing: one lane then runs a large batch on its
        one core while the other core idles, and every image in it waits for the whole batch.
        """
        limit = self.max_batch_size
        if idle_lanes > 0:
            limit = min(limit, max(1, math.ceil((len(batch) + len(self._queue)) / (1 + idle_lanes))))
        while len(batch) < limit:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                return

    def _idle_lanes(self, me_running: bool) -> int:
        """Lanes of this batcher waiting for work, not counting the caller's own."""
        return max(0, self.lanes - self._running - (0 if me_running else 1))

    async def _next_arrival(self, timeout_s: float | None = None) -> bool:
        """Wait until something is queued; False if ``timeout_s`` passed first."""
        while not self._queue:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait()
            except TimeoutError:
                return bool(self._queue)
        return True

    async def _collect(self) -> list[_Item[Payload]]:
        await self._next_arrival()
        batch: list[_Item[Payload]] = []
        idle_lanes = self._idle_lanes(me_running=False)
        self._take_ready(batch, idle_lanes)
        if idle_lanes == 0 and len(batch) < self.max_batch_size and self._gap_ewma_s < self.max_wait_s:
            # Every other lane is busy and arrivals are dense: wait a little for more, but stop at the
            # first pause in the stream. (With a lane idle, waiting would only keep work from it.)
            deadline = time.perf_counter() + self.max_wait_s
            pause = min(self.max_wait_s, 2.0 * self._gap_ewma_s)
            while len(batch) < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0 or not await self._next_arrival(min(left, pause)):
                    break
                self._take_ready(batch)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._running += 1
            try:
                await loop.run_in_executor(self._executor, self._run_back_to_back, batch, loop)
            except asyncio.CancelledError:
                for item in [i for items in self._current.values() for i in items]:
                    if not item.future.done():
                        item.future.set_exception(ShuttingDown("service stopped during this batch"))
                raise
            finally:
                self._running -= 1

    def _executor_idle(self) -> bool:
        """Nothing else waits for a model thread (known for a :class:`ModelThreads`; otherwise assumed)."""
        return getattr(self._executor, "waiting", 0) == 0

    def _run_back_to_back(self, batch: list[_Item[Payload]], loop: asyncio.AbstractEventLoop) -> None:
        """On the model thread: run ``batch``, then whatever queued meanwhile, until the queue is empty.

        Results go back to the event loop with ``call_soon_threadsafe``; a caller that gave up is seen
        through its future's ``done()`` (a plain read) and its rows are dropped.
        """
        while batch:
            live = [item for item in batch if not item.future.done()]
            self._current[threading.get_ident()] = live
            stats = BatchStats(size=0, queue_wait_s=[], run_s=0.0, dropped=len(batch))
            results: Sequence[Result] | None = None
            error: BatchFailed | None = None
            if live:
                traced = [item.trace for item in live if item.trace is not None]
                started_ns = time.time_ns() if traced else 0
                started = time.perf_counter()
                try:
                    results = self._run_batch([item.payload for item in live])
                    if len(results) != len(live):
                        raise RuntimeError(f"batch returned {len(results)} rows for {len(live)} images")
                except Exception as exc:
                    log.exception("%s batch of %d failed", self.name, len(live))
                    error, results = BatchFailed(f"{type(exc).__name__}: {exc}"), None
                if traced:
                    tracing.record_batch(self.name, traced, len(live), started_ns, time.time_ns())
                stats = BatchStats(
                    size=len(live),
                    queue_wait_s=[started - item.enqueued for item in live],
                    run_s=time.perf_counter() - started,
                    dropped=len(batch) - len(live),
                )
            try:
                loop.call_soon_threadsafe(self._deliver, live, results, error, stats)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                return
            if self._stopping or not self._executor_idle():
                return
            batch = []
            self._take_ready(batch, self._idle_lanes(me_running=True))

    def _deliver(
        self,
        live: list[_Item[Payload]],
        results: Sequence[Result] | None,
        error: BatchFailed | None,
        stats: BatchStats,
    ) -> None:
        """On the event loop: answer the callers still waiting, then report the batch."""
        if results is not None:
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        else:
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error or BatchFailed("batch failed"))
        if self._on_batch is not None:
            self._on_batch(stats)
