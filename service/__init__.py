"""camserve's HTTP service: FastAPI app, dynamic batcher, engine and web page, on :mod:`camcore`."""

from __future__ import annotations

from service.app import create_app

__all__ = ["create_app"]
