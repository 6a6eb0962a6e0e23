"""This process's decode memory: a budget that decode threads take from and the event loop waits on,
and the allocator trim that gives freed pages back after a burst of big decodes."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections import deque

from service.decoding.probe import mib


class DecodeBusy(Exception):
    """The decode budget stayed full for longer than the request may wait (HTTP 503)."""


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
    """The C library this process runs on, from its own symbols: ``ctypes.util.find_library`` would run
    ``ldconfig`` (a subprocess at import time) to find a file the process has already loaded."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)


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
