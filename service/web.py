"""The web page's assets: ``service/static`` served at ``/static`` (the page itself is ``GET /``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/static"


def mount_static(app: FastAPI) -> None:
    """Mount ``service/static`` (CSS, JS, example images) at ``/static``; calling it twice is harmless."""
    if any(isinstance(route, Mount) and route.path == STATIC_PATH for route in app.routes):
        return
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
