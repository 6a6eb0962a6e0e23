"""The FastAPI application: factory, lifespan, and the wiring of model, batchers and routes."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from camcore.bundle import Bundle, load_bundle
from service.auth import document_security
from service.batcher import DynamicBatcher, ModelThreads
from service.cpus import available_cpus
from service.decoding import DecodeBusy, DecodeLimits, Decoder
from service.engine import resolve_device
from service.images import ImageRejected
from service.metrics import ServiceMetrics
from service.middleware import BodyLimit, BodyTimeout, BodyTooLarge, RelativeRedirects, RequestContext
from service.oip import install_oip
from service.oip import router as oip_router
from service.reload import build_engine, install, pinned_batch, reload_model
from service.routes import router
from service.settings import Settings
from service.state import ServiceState
from service.web import mount_static
from service.worker import WorkerSlot

log = logging.getLogger("camserve")


def parallelism(settings: Settings, device: torch.device, cpus: int | None = None) -> tuple[int, int | None]:
    """(model lanes, torch intra-op threads; None: torch's default) for this device.

    On a CPU, two lanes of cpus/2 intra-op threads each: two batches run at once, each
    single-threaded on 2 cores, so no OpenMP barrier waits on a worker that the event loop preempted
    (one lane of 2 threads left ~20% of both cores idle at c=32, measured in
    bench/results/serve_tuning.md). On a GPU, one lane: its kernels queue on one stream anyway.
    ``cpus``: what this process may use (a worker's share); default: the affinity mask capped by the
    cgroup CPU quota (service/cpus.py), so a container limited to 2 CPUs on a 64-core node counts 2.
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
            await reload_model(state)
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
        # The model threads ("lanes"), shared by both endpoints: at most `lanes` batches at once.
        executor = ModelThreads(max_workers=lanes)
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(executor, build_engine, bundle, settings, device)
        state.executor, state.device = executor, device
        common = {
            "executor": executor,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "queue_size": settings.queue_size,
            "lanes": lanes,
        }
        state.predict_batcher = DynamicBatcher(
            "predict", pinned_batch("predict"), on_batch=state.metrics.batch_observer("/predict"), **common
        )
        state.gradcam_batcher = DynamicBatcher(
            "gradcam", pinned_batch("gradcam"), on_batch=state.metrics.batch_observer("/gradcam"), **common
        )
        for name, batcher in (("/predict", state.predict_batcher), ("/gradcam", state.gradcam_batcher)):
            state.metrics.track_queue_depth(name, lambda b=batcher: b.depth)
            batcher.start()
        state.decoder = decoder(settings)
        state.metrics.track_decode_memory(lambda: state.decoder.budget.in_use)
        install(state, bundle, engine)
        state.lanes, state.torch_threads = lanes, torch.get_num_threads()
        # Everything loaded so far (torch, the app, the model) lives as long as the process: moved out
        # of the collector's sight, a full collection no longer walks it. Under load at c=32 those
        # full collections had paused the event loop ~110 ms each, 4 times in 10 s.
        gc.collect()
        gc.freeze()
        state.ready, state.draining = True, False  # an app served again after a stop is ready again
        log.info(
            "serving %s (%s) on %s, precision %s: %s; TTA %s; %d model lane(s) of %d thread(s), trace %s",
            bundle.metadata.get("name"),
            bundle.version[:12],
            engine.device_name,
            engine.precision,
            engine.precision_reason,
            engine.tta,
            lanes,
            state.torch_threads,
            engine.trace_reason,
        )
        del engine, bundle  # state.engine is the one serving from now on: a reload must be able to free these
        hangup = _reload_on_sighup(state)
        try:
            yield
        finally:
            hangup()
            # Uvicorn has stopped accepting and finished open requests; drain whatever is queued.
            state.ready = False
            state.draining = True
            await state.predict_batcher.stop(settings.request_timeout_s)
            await state.gradcam_batcher.stop(settings.request_timeout_s)
            executor.shutdown(wait=True)
            state.decoder.shutdown()
            gc.unfreeze()  # an app torn down in a longer-lived process (tests) can be collected again
            log.info("stopped")

    return lifespan


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, exc: ImageRejected) -> JSONResponse:
        app.state.camserve.metrics.rejections.labels(f"image_{exc.status_code}").inc()
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(DecodeBusy)
    async def decode_busy(request: Request, exc: DecodeBusy) -> JSONResponse:
        state: ServiceState = app.state.camserve
        state.metrics.rejections.labels("decode_busy").inc()
        return JSONResponse(
            {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)}
        )

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        app.state.camserve.metrics.rejections.labels("body_too_large").inc()
        return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        app.state.camserve.metrics.rejections.labels("slow_body").inc()
        return JSONResponse({"detail": str(exc)}, status_code=408, headers={"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up before its body arrived: nobody to answer, and no server error (no 500,
        # no traceback). 499 is nginx's "client closed request": it is what metrics and the log record.
        app.state.camserve.metrics.rejections.labels("client_disconnected").inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        request_id = request.scope.get("state", {}).get("request_id", "")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); request id {request_id}"}, 500)


def create_app(
    settings: Settings | None = None,
    bundle: Bundle | None = None,
    *,
    cpus: int | None = None,
    worker: WorkerSlot | None = None,
) -> FastAPI:
    """Build the service. ``bundle`` lets a caller that already loaded (and validated) it skip a reload;
    ``cpus`` and ``worker``: one worker process of several (service/worker.py)."""
    settings = settings or Settings()
    metrics = ServiceMetrics(multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") if worker else None)
    app = FastAPI(
        title="camserve",
        summary="CIFAR-10 ResNet predictions and Grad-CAM explanations, dynamically batched.",
        version="0.1.0",
        lifespan=_lifespan(bundle, cpus),
    )
    app.state.camserve = ServiceState(settings=settings, metrics=metrics, worker=worker)
    _error_handlers(app)
    app.include_router(router)
    install_oip(app)
    document_security(app, [router, oip_router])
    mount_static(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID"],
        )
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RelativeRedirects)
    app.add_middleware(RequestContext, metrics=metrics, log_requests=settings.log_requests)
    return app
