"""Decoding uploads off the event loop, each request within its own limits and all of them within one
memory budget per process.

* Every file of a request is priced from its header first (:func:`service.images.probe_image`); a file
  over the per-image limit, or the one at which the request's total passes the per-request limit, is
  refused with 413 before any pixel of the request is decoded.
* Decoding runs on a small pool of decode threads, never on the event loop, whatever the file's size.
  Requests reach the threads in groups (:class:`_Handoff`): a thread hop per request costs far more
  than its own work on a busy 2-core machine, because each one is a round of GIL hand-overs between
  the event loop and a decode thread (bench/results/bounds.md, section 4).
* Each decode reserves its expected peak memory from a :class:`MemoryBudget` shared by every request
  of the process. A request whose next image does not fit waits up to ``wait_s`` for room, then gets
  :class:`DecodeBusy` (503 with ``Retry-After``).
* After a burst of big decodes the allocator is asked to give the freed pages back
  (:func:`release_free_memory`): glibc keeps them otherwise (bench/results/bounds.md).

One :class:`Decoder` per process (made in the app's lifespan), so every worker process has its own
pool and budget: with N workers, the machine's decode memory is N budgets.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service.images import ImageRejected, Probe, decode_probed, mib, probe_image

log = logging.getLogger("camserve.decoding")

# Trim the allocator once at least this much decode memory was used since the last trim and nothing
# is being decoded: small decodes never pay for it.
TRIM_AFTER_BYTES = 32 * 2**20


class DecodeBusy(Exception):
    """The decode budget stayed full for longer than the request may wait (HTTP 503)."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int  # declared width x height, per image
    max_frames: int  # per animated image
    max_image_bytes: int  # decoded width x height x bands x bytes per sample (after JPEG draft), per image
    max_request_bytes: int  # the same, summed over a request
    wait_s: float  # longest a request waits for room in the budget


class MemoryBudget:
    """Bytes of decode memory in use by this process, taken by decode threads and awaited on the event loop.

    ``try_take`` never blocks (decode threads use it); ``take`` waits on the event loop, woken by every
    ``release``. Not first-come-first-served: a small decode may pass a big one that is waiting, which
    can only shorten waits, and a waiter gives up after its timeout anyway.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    @property
    def in_use(self) -> int:
        return self._used

    def try_take(self, nbytes: int) -> bool:
        with self._lock:
            if self._used + nbytes > self.capacity:
                return False
            self._used += nbytes
            return True

    async def take(self, nbytes: int, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    with self._lock:  # test and register at once: a release in between cannot be missed
                        if self._used + nbytes <= self.capacity:
                            self._used += nbytes
                            return
                        waiter = loop.create_future()
                        self._waiters.append((loop, waiter))
                    await waiter
        except TimeoutError:
            raise DecodeBusy(
                f"decode memory budget busy ({mib(self._used)} of {mib(self.capacity)} in use) for {timeout_s:g} s"
            ) from None

    def release(self, nbytes: int) -> int:
        """Give ``nbytes`` back, wake every waiter to try again; returns what is still in use."""
        with self._lock:
            self._used -= nbytes
            used = self._used
            waiters, self._waiters = self._waiters, deque()
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)
        return used


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only (not musl)


_LIBC = _libc()


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the OS (glibc's ``malloc_trim(0)``).

    Why it is needed: glibc serves a big allocation with its own mmap (returned at ``free``) only until
    the first such block is freed; from then on its dynamic mmap threshold rises to that block's size
    (up to 32 MiB), and later buffers of that size, Pillow's image blocks among them, come from the
    heaps of the decode threads' arenas, which keep them when freed: 16 decodes of a 4000x3000 RGBA
    PNG on 4 threads left a process 247 MiB bigger, 37 MiB after one ``malloc_trim``, which took 6 ms
    (``bench/bounds.py allocator``; bench/results/bounds.md). It hands every whole free page of every
    arena back (``madvise``). Fixing the mmap threshold low instead would make every big torch
    activation a fresh mmap on every forward pass. False where there is no glibc (musl).
    """
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


class Decoder:
    """Prices, budgets and decodes the images of requests, on its own decode threads."""

    def __init__(self, limits: DecodeLimits, *, threads: int, budget_bytes: int, size: int = 32) -> None:
        self.limits = limits
        self.size = size
        self.budget = MemoryBudget(budget_bytes)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camserve-decode")
        self._handoff = _Handoff(self._pool, threads, self._probe_and_decode)
        self._since_trim = 0  # decode memory reserved since the allocator was last trimmed
        self._trim_lock = threading.Lock()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    async def decode(self, files: Sequence[tuple[str, bytes]]) -> list[torch.Tensor]:
        """(filename, bytes) -> uint8 images, in order; raises ImageRejected (4xx) or DecodeBusy (503).

        The common case is one hand-over to a decode thread, which prices every file and decodes as many
        as the budget has room for at once; only when it runs out does the event loop wait for room.
        """
        loop = asyncio.get_running_loop()
        probes, images = await self._handoff.submit(loop, files)
        while len(images) < len(probes):
            need = probes[len(images)].peak_bytes
            try:
                await self.budget.take(need, self.limits.wait_s)
            except BaseException:  # busy, or the request was cancelled: no thread holds these probes now
                for probe in probes[len(images) :]:
                    probe.close()
                raise
            # Submitted at once: from here the decode thread owns the reservation and the probes, and
            # releases and closes them even if this request is cancelled meanwhile.
            pending = loop.run_in_executor(self._pool, self._decode_run, probes, len(images), need)
            images.extend(await pending)
        return images

    # -- on a decode thread ----------------------------------------------------------------------
    def _probe_and_decode(self, files: Sequence[tuple[str, bytes]]) -> tuple[list[Probe], list[torch.Tensor]]:
        probes = self._probe_all(files)
        return probes, self._decode_run(probes, 0, 0)

    def _probe_all(self, files: Sequence[tuple[str, bytes]]) -> list[Probe]:
        limits = self.limits
        probes: list[Probe] = []
        total = 0
        try:
            for name, data in files:
                probe = probe_image(
                    data,
                    name,
                    max_pixels=limits.max_pixels,
                    max_frames=limits.max_frames,
                    max_decoded_bytes=limits.max_image_bytes,
                    size=self.size,
                )
                probes.append(probe)
                total += probe.decoded_bytes
                if total > limits.max_request_bytes:
                    raise ImageRejected(
                        413,
                        name,
                        f"the request's images decode to more than {mib(limits.max_request_bytes)} in all "
                        f"({mib(total)} up to this file)",
                    )
                if probe.peak_bytes > self.budget.capacity:
                    raise ImageRejected(
                        413, name, f"decoding needs {mib(probe.peak_bytes)}, more than the decode memory budget"
                    )
        except BaseException:
            for probe in probes:
                probe.close()
            raise
        return probes

    def _decode_run(self, probes: list[Probe], start: int, reserved: int) -> list[torch.Tensor]:
        """Decode ``probes[start:]`` in order while the budget has room; ``reserved``: the first one's
        share, already taken by the caller. Stops at the first image that does not fit."""
        images: list[torch.Tensor] = []
        for index in range(start, len(probes)):
            probe = probes[index]
            if not reserved and not self.budget.try_take(probe.peak_bytes):
                break
            reserved = 0
            try:
                images.append(decode_probed(probe, self.size))
            except BaseException:
                for rest in probes[index + 1 :]:
                    rest.close()
                raise
            finally:
                self._release(probe.peak_bytes)
        return images

    def _release(self, nbytes: int) -> None:
        in_use = self.budget.release(nbytes)
        with self._trim_lock:
            self._since_trim += nbytes
            if in_use or self._since_trim < TRIM_AFTER_BYTES:
                return
            self._since_trim = 0
        release_free_memory()


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


class _Handoff:
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
