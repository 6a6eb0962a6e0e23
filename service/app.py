"""The app factory: composes the JSON API and the Open Inference Protocol on the HTTP layer, and the
lifespan that loads the model, starts the batchers and drains them at the end.

Adding an endpoint that queues images: its handler (a module of :mod:`service.api` or
:mod:`service.oip`) and one :class:`BatcherRegistration` in :data:`BATCHERS`.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from camcore.bundle import Bundle, load_bundle
from service import tracing
from service.api.openapi import document_limits as api_limits
from service.api.page import mount_static
from service.api.predict import DirectPredict
from service.api.routes import ROUTERS as API_ROUTERS
from service.decoding.budget import release_free_memory
from service.decoding.pool import DecodeLimits, Decoder
from service.grpc.server import GrpcServer
from service.http.auth import document_security
from service.http.errors import install_error_handlers
from service.http.front import Front
from service.inference.batcher import DynamicBatcher, ModelThreads
from service.inference.contract import BatchFunction, run_gradcam, run_predict
from service.inference.cpus import available_cpus
from service.inference.registry import EngineRegistry, pinned_batch
from service.inference.torch_engine import resolve_device
from service.metrics import ServiceMetrics
from service.oip.routes import ROUTERS as OIP_ROUTERS
from service.oip.schemas import document_limits as oip_limits
from service.settings import Settings
from service.state import ServiceState, WorkerView

log = logging.getLogger("camserve")


@dataclass(frozen=True)
class BatcherRegistration:
    """A dynamic batcher: its name (what handlers submit to), its metrics label, and what runs a batch."""

    name: str
    endpoint: str
    run: BatchFunction


BATCHERS = (
    BatcherRegistration("predict", "/predict", run_predict),  # also the protocol's infer
    BatcherRegistration("gradcam", "/gradcam", run_gradcam),
)


def parallelism(settings: Settings, device: torch.device, cpus: int | None = None) -> tuple[int, int | None]:
    """(model lanes, torch intra-op threads; None: torch's default) for this device.

    On a CPU, two lanes of cpus/2 intra-op threads each: two batches run at once, each
    single-threaded on 2 cores, so no OpenMP barrier waits on a worker that the event loop preempted
    (one lane of 2 threads left ~20% of both cores idle at c=32, measured in
    bench/results/serve_tuning.md). On a GPU, one lane: its kernels queue on one stream anyway.
    ``cpus``: what this process may use (a worker's share); default: the affinity mask capped by the
    cgroup CPU quota (service/inference/cpus.py), so a container limited to 2 CPUs on a 64-core node counts 2.
    """
    cores = cpus if cpus is not None else available_cpus()
    threads = settings.torch_threads
    lanes = settings.model_lanes
    if lanes is None:  # never more threads than cores: TORCH_THREADS=2 alone on 2 cores keeps one lane
        lanes = max(1, min(2, cores // (threads or 1))) if device.type == "cpu" else 1
    if threads is None and device.type == "cpu":
        threads = max(1, cores // lanes)
    return lanes, threads


def decoder(settings: Settings) -> Decoder:
    """This process's decode threads and budget (each worker process has its own)."""
    limits = DecodeLimits(
        max_pixels=settings.max_image_pixels,
        max_frames=settings.max_image_frames,
        max_image_bytes=int(settings.max_image_decode_mb * 2**20),
        max_request_bytes=int(settings.max_request_decode_mb * 2**20),
        wait_s=settings.decode_wait_s,
    )
    return Decoder(limits, threads=settings.decode_threads, budget_bytes=int(settings.decode_budget_mb * 2**20))


def _reload_on_sighup(state: ServiceState) -> Callable[[], None]:
    """SIGHUP reloads the bundle (as ``POST /v2/repository/models/<name>/load`` does); returns the undo.

    Only where this loop may handle signals (the main thread of ``python -m service``); an app run by
    a test's event loop in another thread, or on Windows, simply has no SIGHUP reload.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def reload_logged() -> None:
        try:
            await state.registry.reload()
        except Exception as exc:  # a bad bundle: the old one keeps serving, the operator reads why here
            log.error("SIGHUP reload refused, still serving %s: %s", state.bundle.version[:12], exc)

    def on_hangup() -> None:
        task = loop.create_task(reload_logged())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _lifespan(preloaded: Bundle | None, cpus: int | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.camserve
        settings = state.settings
        device = resolve_device(settings.device)
        lanes, threads = parallelism(settings, device, cpus)
        if threads:
            torch.set_num_threads(threads)
        bundle = preloaded or await run_in_threadpool(load_bundle, settings.model_dir)
        # The model threads ("lanes"), shared by every batcher: at most `lanes` batches at once.
        executor = ModelThreads(max_workers=lanes)
        engine = await state.registry.start(bundle, device, executor, lanes)
        for registration in BATCHERS:
            batcher = DynamicBatcher(
                registration.name,
                pinned_batch(registration.run),
                on_batch=state.metrics.batch_observer(registration.endpoint),
                executor=executor,
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                queue_size=settings.queue_size,
                lanes=lanes,
            )
            state.batchers[registration.name] = batcher
            state.metrics.track_queue_depth(registration.endpoint, lambda b=batcher: b.depth)
            batcher.start()
        state.decoder = decoder(settings)
        state.metrics.track_decode_memory(lambda: state.decoder.budget.in_use)
        state.lanes, state.torch_threads = lanes, torch.get_num_threads()
        # Everything loaded so far (torch, the app, the model) lives as long as the process: moved out
        # of the collector's sight, a full collection no longer walks it. Under load at c=32 those
        # full collections had paused the event loop ~110 ms each, 4 times in 10 s.
        gc.collect()
        gc.freeze()
        tracing.start(app.version)  # only where OTEL_EXPORTER_OTLP_ENDPOINT asks for it (service/tracing.py)
        # The Open Inference Protocol over gRPC, on this loop, in this process (every worker binds the port).
        grpc_server = GrpcServer(state, app.version) if settings.grpc_port else None
        if grpc_server is not None:
            await grpc_server.start()
        state.ready, state.draining = True, False  # an app served again after a stop is ready again
        log.info(
            "serving %s (%s) on %s, %s (%s), precision %s: %s; TTA %s; %d model lane(s) of %d thread(s), trace %s",
            bundle.metadata.get("name"),
            bundle.version[:12],
            engine.device_name,
            engine.runtime,
            engine.runtime_reason,
            engine.precision,
            engine.precision_reason,
            engine.tta,
            lanes,
            state.torch_threads,
            engine.trace_reason,
        )
        del engine, bundle  # the registry holds the one serving from now on: a reload must be able to free these
        hangup = _reload_on_sighup(state)
        try:
            yield
        finally:
            hangup()
            # Uvicorn has stopped accepting and finished open requests; drain whatever is queued.
            state.ready = False
            state.draining = True
            if grpc_server is not None:  # new calls get UNAVAILABLE; the ones in flight finish on the batchers
                await grpc_server.stop(settings.request_timeout_s)
            for batcher in state.batchers.values():
                await batcher.stop(settings.request_timeout_s)
            executor.shutdown(wait=True)
            state.decoder.shutdown()
            tracing.stop()  # exports the spans still buffered
            gc.unfreeze()  # an app torn down in a longer-lived process (tests) can be collected again
            log.info("stopped")

    return lifespan


def _document_limits(app: FastAPI, state: ServiceState) -> None:
    """``/openapi.json`` says what the model now serving accepts (its layers, classes, name; the image limit):
    FastAPI's document, built once from the routes, with those values written into a copy per request."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        if state.engine is None:
            return schema
        schema = copy.deepcopy(schema)
        api_limits(schema, state)
        oip_limits(schema, state)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class CamserveApp(FastAPI):
    """FastAPI with :class:`service.http.front.Front` outside all of its middleware, Starlette's
    ``ServerErrorMiddleware`` included: a direct route passes no layer it does not need, and even the 500 of
    an unexpected error gets the request id, the security headers, its metrics and its log line."""

    front: Front | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None:
            await super().__call__(scope, receive, send)
        else:
            await self.front(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    bundle: Bundle | None = None,
    *,
    cpus: int | None = None,
    worker: WorkerView | None = None,
) -> CamserveApp:
    """Build the service. ``bundle`` lets a caller that already loaded (and validated) it skip a reload;
    ``cpus`` and ``worker``: one worker process of several (service/runtime/worker_app.py)."""
    settings = settings or Settings()
    metrics = ServiceMetrics(multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") if worker else None)
    app = CamserveApp(
        title="camserve",
        summary="CIFAR-10 ResNet predictions and Grad-CAM explanations, dynamically batched.",
        version="0.1.0",
        lifespan=_lifespan(bundle, cpus),
    )
    registry = EngineRegistry(settings, on_install=metrics.model_installed, release_memory=release_free_memory)
    app.state.camserve = ServiceState(settings=settings, metrics=metrics, registry=registry, worker=worker)
    install_error_handlers(app, metrics, settings.retry_after_s)
    for router in (*API_ROUTERS, *OIP_ROUTERS):
        app.include_router(router)
    document_security(app, [*API_ROUTERS, *OIP_ROUTERS])
    _document_limits(app, app.state.camserve)
    mount_static(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID"],
        )
    app.front = Front(
        partial(FastAPI.__call__, app),
        metrics=metrics,
        max_body_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
        log_requests=settings.log_requests,
        # CORS answers from a middleware inside the front: with it on, every request takes the FastAPI routes.
        direct=() if settings.cors_origins else (DirectPredict(app.state.camserve),),
        exception_handlers=app.exception_handlers,  # the one error path, filled by install_error_handlers
    )
    return app
