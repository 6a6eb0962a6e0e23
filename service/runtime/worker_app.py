"""The app of one worker process: uvicorn's factory, the worker's slot claimed and published.

Apart from :mod:`service.runtime.slots` (slots and shares) so that the app, which knows its slot, and the
factory, which builds the app, do not import each other.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE

from service.runtime.slots import RUN_DIR_ENV, WorkerSlot, read_service
from service.settings import Settings


def _publishing_lifespan(app: FastAPI, slot: WorkerSlot, precision_reason: str | None):
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            engine = app.state.camserve.engine
            if precision_reason and engine is not None:
                engine.precision_reason = precision_reason
            slot.publish("ready")
            try:
                yield
            finally:
                slot.publish("draining")

    return lifespan


def create_worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process (``service.runtime.worker_app:create_worker_app``).

    A factory that fails would fail the same way in every replacement: it exits with uvicorn's
    STARTUP_FAILURE status, on which the supervisor stops the service instead of restarting forever.
    """
    try:
        return _worker_app()
    except Exception:
        logging.getLogger("camserve.worker").exception("worker cannot start")
        sys.exit(STARTUP_FAILURE)


def _worker_app() -> FastAPI:
    from service.app import create_app  # torch and the app load here, in the worker, not at import
    from service.http.connection import uvicorn_bounds
    from service.inference.cpus import available_cpus
    from service.runtime.logs import configure_logging

    settings = Settings()
    configure_logging(settings)
    run_dir = Path(os.environ[RUN_DIR_ENV])
    service = read_service(run_dir)
    count = service["workers"]
    slot = WorkerSlot.claim(run_dir, count, settings.queue_size, available_cpus())
    # Bounds are the service's, not each worker's: the queue and the decode memory are shared out (a
    # worker can still decode the largest image one may send), and the HTTP limits are set again in
    # this process, which spawning started with the protocol class's defaults.
    decode_share = max(settings.max_image_decode_mb, settings.decode_budget_mb / count)
    worker_settings = settings.model_copy(update={"queue_size": slot.queue_size, "decode_budget_mb": decode_share})
    uvicorn_bounds(worker_settings)
    app = create_app(worker_settings, cpus=slot.cpus, worker=slot)
    app.router.lifespan_context = _publishing_lifespan(app, slot, service.get("precision_reason"))
    return app
