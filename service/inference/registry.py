"""The engine registry: which engine new requests are pinned to, and hot reload, where a new bundle is
verified, built and warmed beside the serving one, then swapped in.

Every request is pinned to the engine that was serving when it arrived (:class:`Pinned`): its
images carry that engine through the batcher, so a request in flight finishes on the model it
started with, however long it queued, and its answer's ``model_version`` is that engine's. A batch
that straddles a swap holds images of both engines and runs one forward pass per engine
(:func:`pinned_batch`, which runs the batcher's :data:`~service.inference.contract.BatchFunction`);
outside a swap every batch has one engine and runs as before.

The new engine is built on a model thread (the executor the batches run on), never on the event
loop, so requests keep being parsed and answered meanwhile; the swap itself is a few assignments on
the event loop, between two awaits, so no handler ever sees half of it. A bundle that fails
verification (:func:`camcore.bundle.load_bundle`: format, architecture, sha256) raises
:class:`~camcore.bundle.BundleError` and the serving engine is untouched.

Per process: with several HTTP worker processes, each worker holds its own engine and reloads on
its own SIGHUP or load request.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from camcore.bundle import Bundle, load_bundle
from camcore.network import block_geometry
from service.inference.choice import choose_runtime, gradcam_precision
from service.inference.contract import BatchFunction, Engine
from service.inference.null_engine import NullEngine
from service.inference.torch_engine import TorchEngine
from service.settings import Settings

log = logging.getLogger("camserve.reload")

Payload = TypeVar("Payload")


@dataclass(frozen=True, slots=True)
class Pinned(Generic[Payload]):
    """One image (or Grad-CAM job) and the engine that must answer it."""

    engine: Engine
    payload: Payload


def pin(engine: Engine, payloads: Sequence[Payload]) -> list[Pinned[Payload]]:
    return [Pinned(engine, payload) for payload in payloads]


def pinned_batch(run: BatchFunction) -> Callable[[list[Pinned[Any]]], list[Any]]:
    """A batcher's ``run_batch``: ``run(engine, payloads)`` once per engine present in the batch, rows in order."""

    def run_pinned(items: list[Pinned[Any]]) -> list[Any]:
        first = items[0].engine
        if all(item.engine is first for item in items):  # every batch but those straddling a swap
            return list(run(first, [item.payload for item in items]))
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.engine), []).append(i)
        rows: list[Any] = [None] * len(items)
        for index in groups.values():
            engine = items[index[0]].engine
            for i, row in zip(index, run(engine, [items[i].payload for i in index]), strict=True):
                rows[i] = row
        return rows

    return run_pinned


def build_engine(bundle: Bundle, settings: Settings, device: torch.device, lanes: int = 1) -> Engine:
    """A warm engine for ``bundle``: runtime and precision chosen, traced or compiled, kernels selected.
    Blocking: run it on a model thread.

    The runtime is :func:`~service.inference.choice.choose_runtime`'s: OpenVINO runs /predict with one
    stream per model lane over this process's threads (``lanes`` x torch's intra-op threads), and holds a
    torch engine for Grad-CAM, at the torch precision :func:`~service.inference.choice.gradcam_precision` reads.
    ``CAMSERVE_ENGINE=null`` builds the stand-in that answers without running the network
    (service.inference.null_engine).
    """
    if settings.engine == "null":
        return NullEngine(bundle, settings.null_batch_ms, settings.tta)
    runtime, reason = choose_runtime(settings, device)
    if runtime == "openvino":
        from camcore.openvino_forward import native_bf16
        from service.inference.openvino_engine import OpenVinoEngine  # openvino is imported only where it runs

        torch_precision = gradcam_precision(bundle, settings.precision, native_bf16())
        gradcam = TorchEngine(bundle, device, torch_precision, settings.max_batch_size, trace=False, tta=settings.tta)
        engine: Engine = OpenVinoEngine(
            bundle,
            settings.precision,
            gradcam,
            batch_size=settings.max_batch_size,
            tta=settings.tta,
            streams=lanes,
            threads=lanes * torch.get_num_threads(),
            runtime_reason=reason,
        )
    else:
        engine = TorchEngine(
            bundle, device, settings.precision, settings.max_batch_size, settings.trace, settings.tta, reason
        )
    engine.warm_up()
    return engine


def load_misclassified(bundle: Bundle) -> list[dict]:
    """The gallery's PNGs, base64; each path checked again to stay inside the bundle (load_bundle did, but
    the directory may have changed since), and one that is gone skipped."""
    items = []
    for entry in bundle.metadata.get("misclassified", []):
        path = bundle.file(entry["file"])
        if path.is_file():
            items.append({**entry, "image_png": base64.b64encode(path.read_bytes()).decode("ascii")})
    return items


@dataclass(frozen=True)
class Serving:
    """What answers now: one bundle, its engine, and what /health and /misclassified show of it.

    Replaced whole on a swap, so a reader that took it once sees one model throughout."""

    bundle: Bundle
    engine: Engine
    misclassified: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)  # Grad-CAM targets and their geometry


class EngineRegistry:
    """The serving engine and its replacement by another, built off the event loop.

    ``on_install`` is told of every engine made current (the service's metrics record its name,
    version and precision). ``release_memory`` runs after each swap, on a model thread: the service
    passes glibc's ``malloc_trim``, so the pages of the engines replaced so far go back to the OS
    (without it the first reload's build left RSS ~90 MB higher for good, reused by later ones but
    never returned). Reloads are serialised: a second one waits for the first, then reads the
    directory again.
    """

    def __init__(
        self,
        settings: Settings,
        on_install: Callable[[Bundle, Engine], None] | None = None,
        release_memory: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.current: Serving | None = None
        self.device: torch.device | None = None
        self.executor: Executor | None = None  # the model threads: batches, and reloads' build and warm-up
        self.lanes = 1  # how many of them run batches at once
        self._on_install = on_install
        self._release_memory = release_memory
        self._lock = asyncio.Lock()

    async def start(self, bundle: Bundle, device: torch.device, executor: Executor, lanes: int = 1) -> Engine:
        """Build and install the first engine on a model thread."""
        self.device, self.executor, self.lanes = device, executor, lanes
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(executor, build_engine, bundle, self.settings, device, lanes)
        self.install(bundle, engine)
        return engine

    def install(self, bundle: Bundle, engine: Engine) -> None:
        """Make ``engine`` the one new requests are pinned to. On the event loop, without awaiting: atomic for
        handlers."""
        layers = [vars(row) for row in block_geometry(engine.model)]
        self.current = Serving(bundle, engine, load_misclassified(bundle), layers)
        if self._on_install is not None:
            self._on_install(bundle, engine)

    async def reload(self) -> Engine:
        """Read, verify, build and warm the bundle at ``MODEL_DIR`` again and swap it in.

        Raises :class:`~camcore.bundle.BundleError` (the old engine keeps serving) for a bundle that
        fails verification.
        """
        loop = asyncio.get_running_loop()
        async with self._lock:
            old = self.current
            bundle = await loop.run_in_executor(self.executor, load_bundle, self.settings.model_dir)
            engine = await loop.run_in_executor(
                self.executor, build_engine, bundle, self.settings, self.device, self.lanes
            )
            self.install(bundle, engine)
            log.info(
                "reloaded %s: %s -> %s, %s, precision %s (%s)",
                bundle.name,
                old.bundle.version[:12] if old is not None else "none",
                bundle.version[:12],
                engine.runtime,
                engine.precision,
                engine.precision_reason,
            )
            del old
            await loop.run_in_executor(self.executor, self._release)
            return engine

    def _release(self) -> None:
        """The replaced engine is garbage once its last request is answered; collect what is already
        (cycles in torch's module wrappers) and return the allocator's free pages."""
        gc.collect()
        if self._release_memory is not None:
            self._release_memory()
