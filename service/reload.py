"""Hot reload: a new bundle verified, built and warmed beside the serving one, then swapped in.

Every request is pinned to the engine that was serving when it arrived (:class:`Pinned`): its
images carry that engine through the batcher, so a request in flight finishes on the model it
started with, however long it queued, and its answer's ``model_version`` is that engine's. A batch
that straddles a swap holds images of both engines and runs one forward pass per engine
(:func:`pinned_batch`); outside a swap every batch has one engine and runs as before.

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
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from camcore.bundle import Bundle, load_bundle
from camcore.network import block_geometry
from service.engine import InferenceEngine
from service.settings import Settings

if TYPE_CHECKING:
    from service.state import ServiceState

log = logging.getLogger("camserve.reload")

Payload = TypeVar("Payload")


@dataclass(frozen=True, slots=True)
class Pinned(Generic[Payload]):
    """One image (or Grad-CAM job) and the engine that must answer it."""

    engine: InferenceEngine
    payload: Payload


def pin(engine: InferenceEngine, payloads: Sequence[Payload]) -> list[Pinned[Payload]]:
    return [Pinned(engine, payload) for payload in payloads]


def pinned_batch(method: str) -> Callable[[list[Pinned[Any]]], list[Any]]:
    """The batchers' ``run_batch``: ``engine.<method>`` once per engine present in the batch, rows in order."""

    def run(items: list[Pinned[Any]]) -> list[Any]:
        first = items[0].engine
        if all(item.engine is first for item in items):  # every batch but those straddling a swap
            return list(getattr(first, method)([item.payload for item in items]))
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.engine), []).append(i)
        rows: list[Any] = [None] * len(items)
        for index in groups.values():
            engine = items[index[0]].engine
            for i, row in zip(index, getattr(engine, method)([items[i].payload for i in index]), strict=True):
                rows[i] = row
        return rows

    return run


def build_engine(bundle: Bundle, settings: Settings, device: torch.device) -> InferenceEngine:
    """A warm engine for ``bundle``: precision chosen, traced, kernels selected. Blocking: run it on a model thread."""
    engine = InferenceEngine(bundle, device, settings.precision, settings.max_batch_size, settings.trace, settings.tta)
    engine.warm_up()
    return engine


def load_misclassified(bundle: Bundle) -> list[dict]:
    items = []
    for entry in bundle.metadata.get("misclassified", []):
        path = bundle.path / entry["file"]
        if path.is_file():
            items.append({**entry, "image_png": base64.b64encode(path.read_bytes()).decode("ascii")})
    return items


def install(state: ServiceState, bundle: Bundle, engine: InferenceEngine) -> None:
    """Make ``engine`` the one new requests are pinned to. On the event loop, without awaiting: atomic for handlers."""
    misclassified = load_misclassified(bundle)
    layers = [vars(row) for row in block_geometry(engine.model)]
    state.bundle, state.engine, state.misclassified, state.layers = bundle, engine, misclassified, layers
    state.metrics.model.info(
        {
            "name": bundle.name,
            "version": bundle.version,
            "precision": engine.precision,
            "device": engine.device_name,
        }
    )


async def reload_model(state: ServiceState, executor: Executor | None = None) -> InferenceEngine:
    """Read, verify, build and warm the bundle at ``MODEL_DIR`` again and swap it in.

    Raises :class:`~camcore.bundle.BundleError` (the old engine keeps serving) for a bundle that
    fails verification. Reloads are serialised: a second one waits for the first, then reads the
    directory again.
    """
    executor = executor or state.executor
    loop = asyncio.get_running_loop()
    async with state.reload_lock:
        old = state.engine
        bundle = await loop.run_in_executor(executor, load_bundle, state.settings.model_dir)
        engine = await loop.run_in_executor(executor, build_engine, bundle, state.settings, state.device)
        install(state, bundle, engine)
        log.info(
            "reloaded %s: %s -> %s, precision %s (%s)",
            bundle.name,
            old.bundle.version[:12] if old is not None else "none",
            bundle.version[:12],
            engine.precision,
            engine.precision_reason,
        )
        return engine
