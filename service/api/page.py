"""The web page: ``GET /`` and its assets, ``service/static`` served at ``/static``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


def mount_static(app: FastAPI) -> None:
    """Mount ``service/static`` (CSS, JS, example images) at ``/static``; calling it twice is harmless."""
    if any(isinstance(route, Mount) and route.path == STATIC_PATH for route in app.routes):
        return
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
