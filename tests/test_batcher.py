"""The dynamic batcher on its own, with a stand-in model: ordering, batching, timeouts, faults, drain.

What happens when is pinned down with events and barriers, never with wall-clock thresholds that a
busy two-core machine could break: a test waits for a condition (bounded by a generous timeout that
only a broken batcher reaches), not for a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.inference.batcher import BatchFailed, BatchStats, DynamicBatcher, ModelThreads, QueueFull, ShuttingDown


class FakeModel:
    """Doubles its inputs; records every batch; can be slowed down or made to fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_when: int | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a batch is inside the model (held there by ``gate``)

    def __call__(self, xs: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(list(xs))
        if self.fail_when is not None and self.fail_when in xs:
            raise RuntimeError("boom")
        time.sleep(self.delay_s)
        return [2 * x for x in xs]


@pytest.fixture
def executor():
    with ModelThreads(1) as pool:
        yield pool


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Yield to the event loop until ``condition`` holds; the timeout is only a broken batcher's limit."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


def make(model: FakeModel, executor, **kwargs) -> tuple[DynamicBatcher, list[BatchStats]]:
    stats: list[BatchStats] = []
    options = {"max_batch_size": 8, "max_wait_ms": 5.0, "queue_size": 64} | kwargs
    batcher = DynamicBatcher("test", model, executor=executor, on_batch=stats.append, **options)
    batcher.start()
    return batcher, stats


async def test_a_lone_request_does_not_wait_for_a_batch(executor):
    model = FakeModel()
    # A batcher that waited for the batch to fill would answer after ten minutes, not within the 5 s.
    batcher, stats = make(model, executor, max_wait_ms=600_000.0)
    assert await batcher.submit([21], timeout_s=5) == [42]
    assert [s.size for s in stats] == [1]
    await batcher.stop()


async def test_concurrent_requests_share_batches_and_get_their_own_rows(executor):
    model = FakeModel(delay_s=0.01)
    batcher, stats = make(model, executor)
    results = await asyncio.gather(*(batcher.submit([i, 100 + i], timeout_s=5) for i in range(20)))
    assert results == [[2 * i, 2 * (100 + i)] for i in range(20)]
    assert max(s.size for s in stats) > 2  # requests were batched together
    assert all(s.size <= 8 for s in stats)
    assert sum(s.size for s in stats) == 40  # every image ran exactly once
    await batcher.stop()


async def test_a_big_request_is_split_and_reassembled_in_order(executor):
    model = FakeModel()
    batcher, stats = make(model, executor, max_batch_size=4)
    assert await batcher.submit(list(range(10)), timeout_s=5) == [2 * i for i in range(10)]
    assert [s.size for s in stats] == [4, 4, 2]
    await batcher.stop()


async def test_queue_full_refuses_the_whole_request(executor):
    model = FakeModel()
    model.gate.clear()  # the model is stuck: nothing leaves the queue
    batcher, _ = make(model, executor, queue_size=4, max_batch_size=1)
    first = asyncio.create_task(batcher.submit([1], timeout_s=5))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(batcher.submit([2, 3, 4], timeout_s=5))
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull):
        await batcher.submit([5, 6], timeout_s=5)
    model.gate.set()
    assert await first == [2] and await waiting == [4, 6, 8]
    await batcher.stop()


async def test_timed_out_rows_are_dropped_not_run(executor):
    model = FakeModel()
    model.gate.clear()
    batcher, stats = make(model, executor, max_batch_size=1)
    blocker = asyncio.create_task(batcher.submit([1], timeout_s=5))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await batcher.submit([7, 8], timeout_s=0.05)
    model.gate.set()
    await blocker
    assert await batcher.submit([9], timeout_s=5) == [18]
    assert [7] not in model.batches and [8] not in model.batches
    assert sum(s.dropped for s in stats) == 2
    await batcher.stop()


async def test_a_failing_batch_fails_only_its_own_callers(executor):
    model = FakeModel()
    model.fail_when = 13
    batcher, _ = make(model, executor, max_batch_size=1)
    with pytest.raises(BatchFailed, match="RuntimeError: boom"):
        await batcher.submit([13], timeout_s=5)
    assert await batcher.submit([4], timeout_s=5) == [8]
    await batcher.stop()


async def test_stop_finishes_accepted_work_then_refuses(executor):
    model = FakeModel(delay_s=0.02)
    batcher, _ = make(model, executor, max_batch_size=2)
    pending = [asyncio.create_task(batcher.submit([i], timeout_s=5)) for i in range(6)]
    await asyncio.sleep(0.01)
    await batcher.stop()
    assert [await p for p in pending] == [[2 * i] for i in range(6)]
    with pytest.raises(ShuttingDown):
        await batcher.submit([1], timeout_s=5)


async def test_queued_batches_run_back_to_back_on_the_model_thread(executor):
    """Once a batch ends, the model thread itself takes what queued meanwhile: no event-loop round trip."""
    fourth_done = threading.Event()

    class Recording(FakeModel):
        def __call__(self, xs: list[int]) -> list[int]:
            result = super().__call__(xs)
            if len(self.batches) == 4:
                fourth_done.set()
            return result

    model = Recording()
    model.gate.clear()
    batcher, stats = make(model, executor, max_batch_size=1)
    tasks = [asyncio.create_task(batcher.submit([i], timeout_s=5)) for i in range(4)]
    await until(model.entered.is_set)  # [0] is on the model thread, held at the gate; [1], [2], [3] are queued
    model.gate.set()
    # Block the event loop: only the model thread can move the queue now, and it must run all four.
    assert fourth_done.wait(5), f"the model thread stopped after {model.batches}"
    assert model.batches == [[0], [1], [2], [3]]
    assert await asyncio.gather(*tasks) == [[0], [2], [4], [6]]
    assert [s.size for s in stats] == [1, 1, 1, 1]
    await batcher.stop()


async def test_back_to_back_batches_leave_the_model_thread_to_another_batcher(executor):
    """A batcher that always has work hands the shared model thread over between two of its batches."""
    order: list[str] = []
    release = threading.Event()

    class Flooded(FakeModel):
        def __call__(self, xs: list[int]) -> list[int]:
            order.append("flooded")
            if len(order) == 3:
                release.wait(5)  # hold the third batch until the other batcher's call waits for the thread
            return super().__call__(xs)

    class Other(FakeModel):
        def __call__(self, xs: list[int]) -> list[int]:
            order.append("other")
            return super().__call__(xs)

    busy, other = Flooded(), Other()
    flooded, _ = make(busy, executor, max_batch_size=1)
    second, _ = make(other, executor)
    flood = [asyncio.create_task(flooded.submit([i], timeout_s=10)) for i in range(60)]
    await until(lambda: len(order) == 3)
    answer = asyncio.create_task(second.submit([5], timeout_s=5))
    await until(lambda: executor.waiting == 1)  # the other batcher's batch waits for the model thread
    release.set()
    assert await answer == [10]
    assert await asyncio.gather(*flood) == [[2 * i] for i in range(60)]
    # Handed over between two batches (right after the held one), not after all 60.
    assert order.index("other") == 3, order[:6]
    await flooded.stop()
    await second.stop()


async def test_two_lanes_run_two_batches_at_once():
    both_inside = threading.Barrier(2, timeout=5)  # passes only when two batches are in the model together

    def model(xs: list[int]) -> list[int]:
        both_inside.wait()
        return [2 * x for x in xs]

    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher("test", model, executor=pool, max_batch_size=1, max_wait_ms=0.0, queue_size=8, lanes=2)
        batcher.start()
        assert await asyncio.gather(batcher.submit([1], 5), batcher.submit([2], 5)) == [[2], [4]]
        await batcher.stop()


async def test_idle_lanes_share_the_queue_evenly():
    # Ten images queued at once with both lanes idle: no lane takes more than its even share (five),
    # rather than one lane taking a full batch of eight and the other the remaining two. On a quiet
    # machine that is two batches of five; on a busy one a lane that wakes late finds less queued and
    # the rest splits finer ([1, 1, 3, 5] was seen), never into a batch over the share.
    model = FakeModel()
    with ModelThreads(2) as pool:
        batcher, stats = make(model, pool, max_batch_size=8, lanes=2)
        assert await batcher.submit(list(range(10)), timeout_s=5) == [2 * i for i in range(10)]
        await batcher.stop()
    sizes = [s.size for s in stats]
    assert max(sizes) <= 5 and sum(sizes) == 10, sizes
    assert sorted(x for batch in model.batches for x in batch) == list(range(10))


def test_model_threads_count_the_calls_waiting_for_a_thread():
    release, started = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(5)

    with ModelThreads(1) as pool:
        running = pool.submit(hold)
        assert started.wait(5)
        queued = [pool.submit(int, "7") for _ in range(3)]
        assert pool.waiting == 3  # the first call holds the only thread
        release.set()
        assert [f.result(5) for f in queued] == [7, 7, 7] and running.result(5)
        assert pool.waiting == 0
