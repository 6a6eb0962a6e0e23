"""Requests' files handed to decode threads in groups, and their outcomes back in groups (:class:`Handoff`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service.decoding.probe import Probe

Files = Sequence[tuple[str, bytes]]
Outcome = tuple[list[Probe], list[torch.Tensor]]


@dataclass
class _Job:
    """One request's files on their way to a decode thread, and what came of them."""

    files: Files
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outcome: Outcome | None = None
    error: BaseException | None = None


class Handoff:
    """Hands requests' files to decode threads in groups, and their outcomes back in groups.

    Why: a decode thread and the event loop share the GIL, and every time either lets go of it (each
    socket call of the loop, each Pillow decode step) while the other waits, the two threads trade it
    with a wake-up each way. A thread hop per request (``run_in_executor``) made that trading cost a
    single 32x32 upload about 300 us of CPU on the 2-core Xeon, three times its decoding; a thread that
    decodes a group back to back, then wakes the loop once for all of it, trades far less.

    How: a thread started for a request takes every request queued by the time it looks, decodes them
    one after another and hands the outcomes back together (after at most ``FLUSH_AFTER_S`` for the
    first of them). A request starts a new thread only when every started one has already looked at
    the queue and fewer than ``threads`` run; otherwise a started thread will take it. Under load the
    loop holds the GIL for many requests in a row, so groups form on their own; at low load a request
    gets a thread at once, and big images still decode side by side on several threads (Pillow lets go
    of the GIL while it decodes).
    """

    FLUSH_AFTER_S = 0.002

    def __init__(self, pool: ThreadPoolExecutor, threads: int, work: Callable[[Files], Outcome]) -> None:
        self._pool = pool
        self._threads = threads
        self._work = work
        self._queue: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._running = 0  # threads started and not finished
        self._unstarted = 0  # of those, the ones that have not looked at the queue yet

    def submit(self, loop: asyncio.AbstractEventLoop, files: Files) -> asyncio.Future:
        job = _Job(files, loop, loop.create_future())
        with self._lock:
            self._queue.append(job)
            start = self._unstarted == 0 and self._running < self._threads
            if start:
                self._running += 1
                self._unstarted += 1
        if start:
            try:
                self._pool.submit(self._drain)
            except RuntimeError:  # the pool is shut down: the service is stopping
                with self._lock:
                    self._running -= 1
                    self._unstarted -= 1
                    self._queue.remove(job)
                raise
        return job.future

    # -- on a decode thread ----------------------------------------------------------------------
    def _drain(self) -> None:
        with self._lock:
            self._unstarted -= 1
        done: list[_Job] = []
        first_done = 0.0
        while True:
            with self._lock:  # taking the last job and leaving happen at once: no job is left behind
                job = self._queue.popleft() if self._queue else None
                if job is None:
                    self._running -= 1
            if job is None:
                break
            if job.future.done():  # the request was cancelled while it waited (a flag, set once)
                continue
            try:
                job.outcome = self._work(job.files)
            except BaseException as exc:  # ImageRejected, or a bug: it belongs to this request alone
                job.error = exc
            if not done:
                first_done = time.monotonic()
            done.append(job)
            if not self._queue or time.monotonic() - first_done >= self.FLUSH_AFTER_S:
                _hand_back(done)
                done = []
        _hand_back(done)


def _hand_back(jobs: list[_Job]) -> None:
    """One wake-up of each event loop for a group of outcomes (one loop per process, outside tests)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in jobs:
        by_loop.setdefault(job.loop, []).append(job)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, group)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            for job in group:
                _discard(job)


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():  # cancelled meanwhile
            _discard(job)
        elif job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.outcome)


def _discard(job: _Job) -> None:
    """A request that no longer waits leaves no image open (its decoded ones are just dropped)."""
    if job.outcome is not None:
        for probe in job.outcome[0]:
            probe.close()
