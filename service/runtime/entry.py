"""The entry point (``python -m service``): settings and bundle checked, then one process serving, or a
supervisor of N worker processes (service/runtime/supervisor.py). Graceful on SIGTERM.

Kept light at import: every worker process imports it again (multiprocessing's spawn re-imports the
main module, ``service.__main__``, which imports this) before it answers its supervisor's health
checks; torch and the app are imported inside :func:`main`.
"""

from __future__ import annotations

import signal
import sys

import uvicorn
from pydantic import ValidationError

from service.http.connection import uvicorn_bounds
from service.settings import Settings


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _setting_problem(error: dict) -> str:
    """One pydantic error as a person reads it: our own validators' messages name the variable already."""
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return f"CAMSERVE_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}"


def uvicorn_config(settings: Settings, app: object, **options: object) -> uvicorn.Config:
    """THE uvicorn configuration, for the one-process service and every worker alike."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # one JSON line per request comes from service.http.front.Front instead
        timeout_graceful_shutdown=settings.request_timeout_s,
        **uvicorn_bounds(settings),  # header limits, connection deadlines and cap (service/http/connection.py)
        **options,
    )


def main() -> None:
    from camcore.bundle import BundleError, load_bundle
    from service.inference.cpus import available_cpus
    from service.runtime.logs import configure_logging
    from service.runtime.supervisor import worker_count

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(error) for error in exc.errors())
        print(f"camserve: cannot start: {problems}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings)
    try:
        bundle = load_bundle(settings.model_dir)
    except BundleError as exc:
        print(f"camserve: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    workers = worker_count(settings.workers, available_cpus())
    if workers > 1:
        from service.runtime.supervisor import serve_workers

        sys.exit(serve_workers(settings, bundle, workers, uvicorn_config))

    from service.app import create_app

    app = create_app(settings, bundle=bundle)
    # Uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler installed before it.
    # Ours turns that into exit status 0: a drained shutdown is a clean one, for Docker and k8s alike.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    server = uvicorn.Server(uvicorn_config(settings, app))
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
