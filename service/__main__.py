"""``python -m service``: validate the bundle, then serve it with uvicorn (graceful on SIGTERM)."""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from camcore.bundle import BundleError, load_bundle
from service.app import create_app
from service.protocol import uvicorn_bounds
from service.settings import Settings


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _setting_problem(error: dict) -> str:
    """One pydantic error as a person reads it: our own validators' messages name the variable already."""
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return f"CAMSERVE_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}"


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(error) for error in exc.errors())
        print(f"camserve: cannot start: {problems}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Request lines are JSON objects already: one per line, nothing in front, for log shippers.
    access = logging.getLogger("camserve.access")
    json_lines = logging.StreamHandler()
    json_lines.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(json_lines)
    access.propagate = False
    try:
        bundle = load_bundle(settings.model_dir)
    except BundleError as exc:
        print(f"camserve: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    app = create_app(settings, bundle=bundle)
    # Uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler installed before it.
    # Ours turns that into exit status 0: a drained shutdown is a clean one, for Docker and k8s alike.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # one JSON line per request comes from RequestContext instead
        timeout_graceful_shutdown=settings.request_timeout_s,
        **uvicorn_bounds(settings),  # header limits, connection deadlines and cap (service/protocol.py)
    )


if __name__ == "__main__":
    main()
