"""Decoding uploads off the event loop, each request within its own limits and all of them within one
memory budget per process.

* Every file of a request is priced from its header first (:func:`service.decoding.probe.probe_image`); a file
  over the per-image limit, or the one at which the request's total passes the per-request limit, is
  refused with 413 before any pixel of the request is decoded.
* Decoding runs on a small pool of decode threads, never on the event loop, whatever the file's size.
  Requests reach the threads in groups (:class:`service.decoding.handoff.Handoff`): a thread hop per
  request costs far more than its own work on a busy 2-core machine, because each one is a round of GIL
  hand-overs between the event loop and a decode thread (bench/results/bounds.md, section 4).
* Each decode reserves its expected peak memory from a :class:`MemoryBudget` shared by every request
  of the process. A request whose next image does not fit waits up to ``wait_s`` for room, then gets
  :class:`DecodeBusy` (503 with ``Retry-After``).
* After a burst of big decodes the allocator is asked to give the freed pages back
  (:func:`service.decoding.budget.release_free_memory`): glibc keeps them otherwise (bench/results/bounds.md).

One :class:`Decoder` per process (made in the app's lifespan), so every worker process has its own
pool and budget: with N workers, the machine's decode memory is N budgets.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service import tracing
from service.decoding.budget import MemoryBudget, release_free_memory
from service.decoding.handoff import Handoff
from service.decoding.probe import ImageRejected, Probe, decode_probed, mib, probe_image

log = logging.getLogger("camserve.decoding")

# Trim the allocator once at least this much decode memory was used since the last trim and nothing
# is being decoded: small decodes never pay for it.
TRIM_AFTER_BYTES = 32 * 2**20


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int  # declared width x height, per image
    max_frames: int  # per animated image
    max_image_bytes: int  # decoded width x height x bands x bytes per sample (after JPEG draft), per image
    max_request_bytes: int  # the same, summed over a request
    wait_s: float  # longest a request waits for room in the budget


class Decoder:
    """Prices, budgets and decodes the images of requests, on its own decode threads."""

    def __init__(self, limits: DecodeLimits, *, threads: int, budget_bytes: int, size: int = 32) -> None:
        self.limits = limits
        self.size = size
        self.budget = MemoryBudget(budget_bytes)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camserve-decode")
        self._handoff = Handoff(self._pool, threads, self._probe_and_decode)
        self._since_trim = 0  # decode memory reserved since the allocator was last trimmed
        self._trim_lock = threading.Lock()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    async def decode(self, files: Sequence[tuple[str, bytes]]) -> list[torch.Tensor]:
        """(filename, bytes) -> uint8 images, in order; raises ImageRejected (4xx) or DecodeBusy (503).

        The common case is one hand-over to a decode thread, which prices every file and decodes as many
        as the budget has room for at once; only when it runs out does the event loop wait for room.
        """
        with tracing.span("decode", **{"camserve.images": len(files)}):
            return await self._decode(files)

    async def _decode(self, files: Sequence[tuple[str, bytes]]) -> list[torch.Tensor]:
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
